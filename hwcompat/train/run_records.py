"""What a run folder says about itself, read defensively: metrics.jsonl, summary.json, run.json and
model.export.json as the report draws them. A record a hand edit or a crash left damaged is an InputError naming
the file ("FILE: damaged …"), never a traceback or a hang; a number no float holds becomes None.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwcompat import summary as summary_file
from hwcompat.errors import InputError
from hwcompat.summary import Summary


@dataclass
class Run:
    """What a run folder says about itself."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    summary: Summary | None = None  # None: the run has not finished
    spec: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)  # GRPO: sampled completions at each eval

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        if self.summary:
            return f"finished: {self.summary.steps} steps"
        total = (self.spec.get("config") or {}).get("max_steps")
        last = self.train[-1]["step"] if self.train else 0
        return f"stopped at step {last}" + (f" of {total}" if total else "") + " (resume with --resume)"


def load_run(path: str | Path) -> Run:
    """A run folder's records; a folder that is not a run is an InputError naming what it lacks, a damaged or
    hand-edited record one naming the file ("FILE: damaged …"), never a traceback."""
    p = Path(path)
    if not (p / "run.json").is_file():
        raise InputError(f"{p}: not a run folder (no run.json); give the output_dir of a `hwcompat train` run")
    run = Run(p, spec=_json(p / "run.json"), summary=_summary(p / summary_file.NAME),
              export=_json(p / "model.export.json"))
    for line in _lines(p / "metrics.jsonl"):
        kind = line.get("kind")
        if kind == "train":
            run.train.append(line)
        elif kind == "eval":
            run.evals.append(line)
        elif kind == "resume":
            run.resumes.append(line["step"])
        elif kind == "samples" and isinstance(line.get("samples"), list):
            run.samples.append(line)
    return run


#: The most bytes of one run record the report reads (metrics.jsonl of a very long run is a few MB).
MAX_RECORD = 256 << 20


def _text(path: Path) -> str | None:
    """A run file's text, read as a regular file with a bound (a FIFO or /dev/zero planted there is refused, not
    waited on); None when it is absent."""
    import os

    from hwcompat.userfile import read_regular

    if not os.path.lexists(path):
        return None
    try:
        return read_regular(path, "run record", limit=MAX_RECORD).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(damaged(path, f"not UTF-8 at byte {exc.start}")) from None
    except InputError as exc:
        raise InputError(damaged(path, str(exc).removeprefix(f"run record {path}: "))) from None


def damaged(path: Path, why: str) -> str:
    return (f"{path}: damaged ({why}); the report reads it as the run wrote it: restore it, or move it away to "
            "report without it")


def _json(path: Path) -> dict[str, Any]:
    text = _text(path)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(damaged(path, "nested too deeply")) from None
    except ValueError as exc:
        raise InputError(damaged(path, f"not JSON: {str(exc)[:100]}")) from None
    if not isinstance(data, dict):
        raise InputError(damaged(path, f"expected a JSON object, got {type(data).__name__}"))
    return _sane(data)


def _summary(path: Path) -> Summary | None:
    data = _json(path)
    try:
        return summary_file.parse(data) if data else None
    except ValueError as exc:
        raise InputError(damaged(path, str(exc))) from None


def _sane(value: Any, depth: int = 0) -> Any:
    """A record's values as the page can draw them: numbers finite and within float range (a hand-edited 1e999 or
    a 400-digit integer becomes None), containers at most 32 deep."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        try:
            return value if math.isfinite(float(value)) else None
        except OverflowError:
            return None
    if depth > 32:
        return None
    if isinstance(value, dict):
        return {str(k): _sane(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_sane(v, depth + 1) for v in value]
    return None


def _lines(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line cut short by a kill (the last one), or not a record, is skipped."""
    text = _text(path)
    if text is None:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = _sane(json.loads(line))
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and _is_step(rec.get("step")):
            out.append(rec)
    return out


def _is_step(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**12


def num_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
