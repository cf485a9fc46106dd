"""The report's line charts as numbers: where each point, tick and resume mark goes in an inline SVG.

The geometry only; the markup is the template's (templates/report.html.j2, autoescaped), so no text a run
recorded reaches the page unescaped. No script, no font, no request: the page opens offline years later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
W, H, PAD = 560, 220, 56  # one plot's size and margin, in SVG units


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str
    dots: bool = False  # eval points: few, shown as markers on the line


@dataclass(frozen=True)
class Line:
    """One series as drawn: its SVG path and, for eval points, its markers."""

    label: str
    color: str
    path: str
    dots: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Chart:
    """One plot: its lines, the dashed resume marks and the min/max tick labels; no lines: no data yet."""

    title: str
    lines: tuple[Line, ...] = ()
    marks: tuple[tuple[str, str, int], ...] = ()  # (line x, label x, step)
    ticks: tuple[str, str, str, str] = ("", "", "", "")  # x min, x max, y min, y max


def chart(title: str, series: list[Series], marks: list[int] | None = None, unit: str = "") -> Chart:
    """Axes from the data (y from zero: a learning rate of 0.000172-0.0002 must not look like a fall to nothing),
    dashed lines at ``marks`` (resumes) inside the x range."""
    pts = [p for s in series for p in s.points if all(math.isfinite(v) for v in p)]
    if not pts:
        return Chart(title)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - PAD + (y - y0) / (y1 - y0) * (2 * PAD - H)

    lines = []
    for s in series:
        good = [p for p in s.points if all(math.isfinite(v) for v in p)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(good))
        dots = tuple((f"{sx(x):.1f}", f"{sy(y):.1f}") for x, y in good) if s.dots else ()
        lines.append(Line(s.label, s.color, path, dots))
    shown = tuple((f"{sx(m):.1f}", f"{sx(m) + 3:.1f}", m) for m in (marks or []) if x0 <= m <= x1)
    return Chart(title, tuple(lines), shown, (_num(x0), _num(x1), f"{_num(y0)}{unit}", f"{_num(y1)}{unit}"))


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


#: The fixed numbers of every plot's frame, for the template.
FRAME = {"W": W, "H": H, "PAD": PAD, "bottom": H - PAD, "top": PAD / 2, "right": W - PAD}
