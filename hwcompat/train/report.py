"""``report.html``: one self-contained page per run (and one that compares runs), from the run folder's own files.

Loss curves (train and eval) with resumes marked, learning rate, tokens/s and memory over steps, task metrics
before/after with the regression guard's verdict, DPO reward accuracy/margin, the hardware and the profile's
choices with their reasons, the plan's predicted peak beside the measured one, and the export's ``--verify``
figures. Plots are inline SVG drawn here: no script, no font, no request leaves the page, so it opens offline
and in any browser years later. Reads ``metrics.jsonl``, ``summary.json``, ``run.json``, ``profile.json`` and
``model.export.json``; a run still going (or stopped) gets a page too. No torch import here.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwcompat import summary as summary_file
from hwcompat.errors import InputError
from hwcompat.summary import Summary

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
W, H, PAD = 560, 220, 56  # one plot's size and margin, in SVG units
SCORES = ("eval_loss", "reward_accuracy", "reward_margin", "reward", "exact_match", "accuracy", "json_valid",
          "field_precision", "field_recall", "field_f1")


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
        raise InputError(_damaged(path, f"not UTF-8 at byte {exc.start}")) from None
    except InputError as exc:
        raise InputError(_damaged(path, str(exc).removeprefix(f"run record {path}: "))) from None


def _damaged(path: Path, why: str) -> str:
    return (f"{path}: damaged ({why}); the report reads it as the run wrote it: restore it, or move it away to "
            "report without it")


def _json(path: Path) -> dict[str, Any]:
    text = _text(path)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError(_damaged(path, "nested too deeply")) from None
    except ValueError as exc:
        raise InputError(_damaged(path, f"not JSON: {str(exc)[:100]}")) from None
    if not isinstance(data, dict):
        raise InputError(_damaged(path, f"expected a JSON object, got {type(data).__name__}"))
    return _sane(data)


def _summary(path: Path) -> Summary | None:
    data = _json(path)
    try:
        return summary_file.parse(data) if data else None
    except ValueError as exc:
        raise InputError(_damaged(path, str(exc))) from None


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


def _num_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# --- plots -------------------------------------------------------------------------------------------------------

@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str
    dots: bool = False  # eval points: few, shown as markers on the line


def chart(title: str, series: list[Series], marks: list[int] | None = None, unit: str = "") -> str:
    """One line chart as inline SVG: axes with min/max ticks, a legend, dashed lines at ``marks`` (resumes)."""
    pts = [p for s in series for p in s.points if all(math.isfinite(v) for v in p)]
    if not pts:
        return f'<figure class="plot empty" data-title="{_e(title)}"><figcaption>{_e(title)}: no data yet</figcaption></figure>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0 = min(0.0, y0)  # from zero: a learning rate of 0.000172-0.0002 must not look like a fall to nothing
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - PAD + (y - y0) / (y1 - y0) * (2 * PAD - H)

    body = [_axes(x0, x1, y0, y1, unit)]
    body += [f'<line class="resume" x1="{sx(m):.1f}" x2="{sx(m):.1f}" y1="{PAD / 2}" y2="{H - PAD}"/>'
             f'<text x="{sx(m) + 3:.1f}" y="{PAD / 2 + 10}" class="small">resumed @ {m}</text>'
             for m in (marks or []) if x0 <= m <= x1]
    for s in series:
        good = [p for p in s.points if all(math.isfinite(v) for v in p)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(good))
        body.append(f'<path class="series" d="{path}" stroke="{s.color}"/>')
        if s.dots:
            body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}"/>' for x, y in good]
    legend = "".join(f'<span style="color:{s.color}">&#9632; {_e(s.label)}</span> ' for s in series)
    return (f'<figure class="plot" data-title="{_e(title)}"><figcaption>{_e(title)} {legend}</figcaption>'
            f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{_e(title)}">'
            + "".join(body) + "</svg></figure>")


def _axes(x0: float, x1: float, y0: float, y1: float, unit: str) -> str:
    b, t = H - PAD, PAD / 2
    return (f'<line class="axis" x1="{PAD}" y1="{b}" x2="{W - PAD}" y2="{b}"/>'
            f'<line class="axis" x1="{PAD}" y1="{t}" x2="{PAD}" y2="{b}"/>'
            f'<text x="{PAD}" y="{b + 16}" class="small">{_num(x0)}</text>'
            f'<text x="{W - PAD}" y="{b + 16}" class="small" text-anchor="end">step {_num(x1)}</text>'
            f'<text x="{PAD - 4}" y="{b}" class="small" text-anchor="end">{_num(y0)}{unit}</text>'
            f'<text x="{PAD - 4}" y="{t + 8}" class="small" text-anchor="end">{_num(y1)}{unit}</text>')


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _points(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(r["step"], r[key] * scale) for r in records if _num_or_none(r.get(key)) is not None]


def run_charts(run: Run) -> list[str]:
    """The per-run plots: loss (train and eval), DPO rewards when there are any, learning rate, tokens/s, memory."""
    c0, c1 = COLORS[0], COLORS[1]
    out = [chart("loss", [Series("train", _points(run.train, "loss"), c0),
                          Series("eval", _points(run.evals, "eval_loss"), c1, dots=True)], run.resumes)]
    rewards = [Series(k, _points(run.evals, k), COLORS[i + 2], dots=True)
               for i, k in enumerate(("reward_accuracy", "reward_margin")) if _points(run.evals, k)]
    if rewards:
        out.append(chart("DPO rewards (eval)", rewards, run.resumes))
    out += grpo_charts(run)
    out.append(chart("learning rate", [Series("lr", _points(run.train, "lr"), c0)], run.resumes))
    out.append(chart("tokens/s", [Series("tokens/s", _points(run.train, "tokens_per_s"), c0)], run.resumes))
    out.append(chart("memory (peak so far)", [Series(run.summary.peak_memory_kind if run.summary else "memory",
                                                     _points(run.train, "memory_bytes", 2**-30), c0)],
                     run.resumes, " GiB"))
    return out


def grpo_charts(run: Run) -> list[str]:
    """GRPO: the total reward per step (train) and at each eval, each reward's mean, the completions' lengths."""
    train = _points(run.train, "reward")
    if not train:
        return []
    names = sorted({k.split("/")[1] for r in run.train for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    each = [Series(n, _points(run.train, f"rewards/{n}/mean"), COLORS[(i + 2) % len(COLORS)])
            for i, n in enumerate(names)]
    return [chart("GRPO reward", [Series("train (sampled)", train, COLORS[0]),
                                  Series("eval (greedy)", _points(run.evals, "reward"), COLORS[1], dots=True)] + each,
                  run.resumes),
            chart("completion length (tokens)", [Series("mean", _points(run.train, "completion_length"), COLORS[0]),
                                                 Series("max", _points(run.train, "completion_length_max"),
                                                        COLORS[1])], run.resumes)]


# --- tables ------------------------------------------------------------------------------------------------------

def samples_table(run: Run) -> str:
    """GRPO: a few eval prompts with their G sampled completions and rewards, at the first and the last eval."""
    if not run.samples:
        return ""
    shown = [run.samples[0]] + ([run.samples[-1]] if len(run.samples) > 1 else [])
    rows = []
    for rec in shown:
        for s in rec["samples"][:4]:
            if not isinstance(s, dict):
                continue
            for c, r in zip(s.get("completions", [])[:8], s.get("rewards", [])[:8]):
                rows.append([rec.get("step", "?"), str(s.get("prompt", ""))[-160:], str(c)[:240], _fmt(r)])
    return "<h2>Sampled completions (GRPO)</h2>" + _table(["step", "prompt (end)", "completion", "reward"], rows)



def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Markup) else _e(c)}</td>" for c in r) + "</tr>"
                  for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


class Markup(str):
    """Text already escaped (a verdict with its colour), passed through ``_table`` as is."""


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def metrics_table(run: Run) -> str:
    """Before and after, with the guard's verdict. A run that stopped has no after: its latest eval past step 0
    is shown as that (no guard verdict on it), and a run stopped before any such eval shows before only."""
    before, after = (run.summary.eval_before, run.summary.eval_after) if run.summary else ({}, {})
    head = "after"
    if not run.summary and run.evals:
        before = run.evals[0] if run.evals[0]["step"] == 0 else {}
        later = [e for e in run.evals if e["step"] > 0]
        after, head = (later[-1], f"step {later[-1]['step']}") if later else ({}, "after")
    keys = [k for k in SCORES if k in after or k in before]
    keys += sorted(k for k in {**before, **after} if k.startswith("reward_") and k not in keys)  # GRPO's rewards
    regressed = {x.metric for x in run.summary.regressed} if run.summary else set()
    finished = run.summary is not None

    def guard(k: str) -> Any:
        if not finished:
            return "-"
        return Markup('<b class="bad">regressed</b>' if k in regressed else '<span class="ok">ok</span>')

    rows = [[k, _fmt(before.get(k)), _fmt(after.get(k)), guard(k)] for k in keys]
    tol = (run.spec.get("config") or {}).get("regression_tolerance")
    if finished:
        verdict = ("no metric fell" if not regressed else f"{len(regressed)} metric(s) fell") + (
            f" by more than {tol:g} points (regression_tolerance)" if isinstance(tol, (int, float)) else "")
    else:
        verdict = (f"{run.status}: no after yet, so no guard verdict"
                   + (f"; the latest eval ({head}) is shown" if head != "after" else ""))
    return f"<h2>Task metrics, before and after</h2><p class=\"verdict\">{_e(verdict)}</p>" + _table(
        ["metric", "before", head, "guard"], rows, "metrics")


def hardware_table(run: Run) -> str:
    prof, dev, s = run.spec.get("profile") or {}, run.spec.get("device") or {}, run.summary or Summary()
    reasons = prof.get("reasons") or {}
    rows = [["device", dev.get("name", "?"), f"{dev.get('kind', '?')}{' (emulated)' if dev.get('emulated') else ''}"],
            ["profile", prof.get("name", "?"), reasons.get("profile", "")]]
    rows += [[k, prof.get(k, "?"), reasons.get(k, "")] for k in ("dtype", "attention", "compile_backend")]
    if s.cpu_allocator:
        rows.append(["malloc", s.cpu_allocator, ""])
    gib = 2**30
    plan, peak = run.spec.get("planned_peak_bytes"), s.peak_memory_bytes
    rows.append(["memory: planned peak", f"{plan / gib:.2f} GiB" if plan else "-", "the plan, before the run"])
    rows.append(["memory: measured peak", f"{peak / gib:.2f} GiB" if peak else "-",
                 s.peak_memory_kind if run.summary else ""])
    if s.first_step_peak_bytes:
        rows.append(["memory: costliest micro-batch", f"{s.first_step_peak_bytes / gib:.2f} GiB",
                     "probed before the first step"])
    rows.append(["speed", f"{s.tokens_per_s:,.0f} tokens/s" if s.tokens_per_s else "-",
                 f"{s.train_seconds:.1f} s of training" if run.summary else ""])
    return "<h2>Hardware, profile and plan</h2>" + _table(["", "value", "why / what"], rows, "hardware")


def export_table(run: Run) -> str:
    x = run.export
    if not x:
        return ""
    if not x.get("verified", True) or x.get("passed") is None:
        return (f"<h2>Export</h2><p>{_e(x.get('gguf', 'model.gguf'))} ({_e(x.get('qtype', '?'))}): not verified in "
                f"llama.cpp ({_e(x.get('why_not', ''))})</p>")
    d, g, t = x.get("distributions") or {}, x.get("generations") or {}, x.get("tokenization") or {}
    rows = [["verdict", "PASS" if x.get("passed") else "FAIL: " + "; ".join(x.get("failures", [])[:2])],
            ["type", x.get("qtype", "?")], ["tokenization", f"{t.get('mismatches', '?')} mismatches in "
                                                            f"{t.get('strings', '?')} strings"],
            ["next-token KL (mean)", _fmt(d.get("mean_kl"))], ["top-1 agreement", _fmt(d.get("top1_agreement"))],
            ["greedy answers identical", f"{g.get('identical', '?')}/{g.get('prompts', '?')}"]]
    return "<h2>Export, verified in llama.cpp</h2>" + _table(["", ""], rows, "export")


# --- pages -------------------------------------------------------------------------------------------------------

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 6px}.sub{color:#666}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plot{margin:0;border:1px solid #ddd;padding:6px}
figcaption{font-weight:600;font-size:13px}figcaption span{font-weight:400;margin-left:8px}
svg .axis{stroke:#888}svg .series{fill:none;stroke-width:1.6}svg .resume{stroke:#999;stroke-dasharray:4 3}
svg .small{font-size:10px;fill:#555}table{border-collapse:collapse;margin:4px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
.bad{color:#b00}.ok{color:#070}.verdict{margin:2px 0}"""


def _page(title: str, sub: str, body: str) -> str:
    # a CSP that forbids every fetch: the page cannot reach a network even if a value in it tried to
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class=\"sub\">{_e(sub)}</p>{body}</body></html>\n")


def _name(path: Any) -> str:
    """A file or folder by its own name: the page is shared, the folders of the machine that ran it are not its
    business (config.yaml in the run folder keeps the full paths)."""
    return Path(str(path)).name or str(path)


def render_run(run: Run) -> str:
    cfg = run.spec.get("config") or {}
    trained = "full fine-tune" if cfg.get("finetune") == "full" else f"LoRA r={cfg.get('lora_r', '?')}"
    sub = (f"{run.status} · {cfg.get('method', 'sft')} on {', '.join(_name(p) for p in cfg.get('train_data', []))}"
           f" · model {_name(cfg.get('model', '?'))} · {trained}"
           + (f" · resumed at step {', '.join(map(str, run.resumes))}" if run.resumes else ""))
    body = (f'<h2>Curves</h2><div class="plots">{"".join(run_charts(run))}</div>' + metrics_table(run)
            + samples_table(run) + hardware_table(run) + export_table(run))
    return _page(f"hwcompat run: {run.name}", sub, body)


#: What each method's eval_loss measures: two methods' losses are different quantities, never one row or curve.
LOSS_MEANING = {"sft": "token NLL of the answers", "dpo": "DPO sigmoid loss of the pairs",
                "grpo": "GRPO clipped surrogate (about 0 on-policy: the reward curves are its progress)"}


def labels(runs: list[Run]) -> list[str]:
    """A distinct column name per run: its folder's name, or (two ``runs/latest`` links, two ``demo`` folders)
    the real folder's name, then as much of the path as tells them apart."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    real = [r.path.resolve() for r in runs]
    for depth in range(1, 1 + max(len(p.parts) for p in real)):
        tails = ["/".join(p.parts[-depth:]) for p in real]
        if len(set(tails)) == len(tails):
            return [t if n == t else f"{n} ({t})" for n, t in zip(names, tails)]
    return [str(p) for p in real]


def _method(run: Run) -> str:
    return str((run.spec.get("config") or {}).get("method") or "sft")


def render_compare(runs: list[Run]) -> str:
    """Several runs: their curves overlaid, their metrics and costs side by side (the check before promoting).
    Each column says the model, method and data it trained on; losses of different methods are kept apart."""
    names = labels(runs)
    methods = sorted({_method(r) for r in runs})

    def overlay(title: str, records: str, key: str, dots: bool = False, scale: float = 1.0, unit: str = "",
                only: str | None = None) -> str:
        return chart(title, [Series(n, _points(getattr(r, records), key, scale), COLORS[i % len(COLORS)], dots)
                             for i, (r, n) in enumerate(zip(runs, names)) if only in (None, _method(r))], unit=unit)

    plots = []
    for m in methods:
        tag = f" — {m}: {LOSS_MEANING.get(m, m)}" if len(methods) > 1 else ""
        plots += [overlay(f"train loss{tag}", "train", "loss", only=m if tag else None),
                  overlay(f"eval loss{tag}", "evals", "eval_loss", dots=True, only=m if tag else None)]
    plots += [overlay("tokens/s", "train", "tokens_per_s"),
              overlay("memory (peak so far)", "train", "memory_bytes", scale=2**-30, unit=" GiB")]
    cfgs = [r.spec.get("config") or {} for r in runs]
    rows = [["model"] + [c.get("model", "?") for c in cfgs], ["method"] + [_method(r) for r in runs],
            ["train data"] + [", ".join(map(str, c.get("train_data") or [])) or "?" for c in cfgs]]
    after = [r.summary.eval_after if r.summary else {} for r in runs]
    keys = [k for k in SCORES if any(k in a for a in after)]
    for k in keys:
        for m in (methods if k == "eval_loss" and len(methods) > 1 else [None]):
            label = f"eval_loss ({m}: {LOSS_MEANING.get(m, m)})" if m else k
            rows.append([label] + [_fmt(a.get(k)) if m in (None, _method(r)) else "-" for r, a in zip(runs, after)])
    rows.append(["regressed"] + [", ".join(x.metric for x in r.summary.regressed) or "none" if r.summary else "-"
                                 for r in runs])
    rows.append(["tokens/s"] + [_per(r.summary and r.summary.tokens_per_s, "{:,.0f}") for r in runs])
    rows.append(["peak memory"] + [_per(r.summary and r.summary.peak_memory_bytes, "{:.2f} GiB", 2**-30)
                                   for r in runs])
    rows.append(["profile"] + [f"{(r.spec.get('profile') or {}).get('name', '?')} on "
                               f"{(r.spec.get('device') or {}).get('name', '?')}" for r in runs])
    rows.append(["status"] + [r.status for r in runs])
    note = (f"<p class=\"verdict\">These runs use different methods ({', '.join(methods)}): their losses measure "
            "different things and are shown apart; compare them by the task metrics.</p>" if len(methods) > 1 else "")
    body = (f'{note}<h2>Curves</h2><div class="plots">{"".join(plots)}</div><h2>After training, side by side</h2>'
            + _table(["metric"] + names, rows, "compare"))
    return _page(f"hwcompat: {len(runs)} runs compared", " · ".join(str(r.path) for r in runs), body)


def _per(value: Any, fmt: str, scale: float = 1.0) -> str:
    v = _num_or_none(value)
    return "-" if v is None else fmt.format(v * scale)


def rendered(render, runs: list[Run]) -> str:
    """``render(runs…)``, or, when a record has a shape hwcompat never writes (a hand edit: a string where a number
    goes, a list for a mapping), an InputError naming the file: each record is set aside in turn until the page
    renders, and the one whose absence fixed it is the one named."""
    try:
        return render(*runs)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        why = f"{type(exc).__name__}: {str(exc)[:80]}"
    for run in runs:
        for name, attr, empty in (("summary.json", "summary", None), ("run.json", "spec", {}),
                                  ("model.export.json", "export", {}), ("metrics.jsonl", "train", []),
                                  ("metrics.jsonl", "evals", [])):
            kept = getattr(run, attr)
            setattr(run, attr, empty)
            try:
                render(*runs)
            except Exception:
                continue
            finally:
                setattr(run, attr, kept)
            raise InputError(_damaged(run.path / name, f"a value of a shape hwcompat never writes; {why}"))
    raise InputError(f"{', '.join(str(r.path) for r in runs)}: damaged run records ({why})")


def write_run_report(run_dir: str | Path) -> Path:
    """``RUN/report.html``, rebuilt from the run's files (atomic; listed in the folder's ledger as ours)."""
    from hwcompat.fsutil import atomic_write_text, record_written

    run = load_run(run_dir)
    target = run.path / "report.html"
    atomic_write_text(target, rendered(render_run, [run]))
    record_written(run.path, "report.html")
    return target
