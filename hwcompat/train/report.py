"""``report.html``: one self-contained page per run (and one that compares runs), from the run folder's own files.

Loss curves (train and eval) with resumes marked, learning rate, tokens/s and memory over steps, task metrics
before/after with the regression guard's verdict, DPO reward accuracy/margin, the hardware and the profile's
choices with their reasons, the plan's predicted peak beside the measured one, and the export's ``--verify``
figures. Plots are inline SVG (charts.py): no script, no font, no request leaves the page, so it opens offline
and in any browser years later. The records are read by run_records.py; a run still going (or stopped) gets a page
too. The page is templates/report.html.j2 through Jinja2, autoescaped. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat.choices import Finetune
from hwcompat.errors import InputError
from hwcompat.summary import Summary
from hwcompat.train.charts import COLORS, Chart, Series, chart
from hwcompat.train.run_records import Run, damaged, load_run, num_or_none

SCORES = ("eval_loss", "reward_accuracy", "reward_margin", "reward", "exact_match", "accuracy", "json_valid",
          "field_precision", "field_recall", "field_f1")


def _points(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
    return [(r["step"], r[key] * scale) for r in records if num_or_none(r.get(key)) is not None]


def run_charts(run: Run) -> list[Chart]:
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


def grpo_charts(run: Run) -> list[Chart]:
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

@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[Any]]  # text cells, or a Verdict
    cls: str = ""


@dataclass(frozen=True)
class Verdict:
    """A table cell with its colour: the guard's verdict on one metric."""

    text: str
    cls: str  # bad | ok
    tag: str = "span"


@dataclass(frozen=True)
class Section:
    """One part of the page under its heading: a verdict line, a paragraph, a table."""

    title: str
    table: Table | None = None
    verdict: str = ""
    text: str = ""


def samples_table(run: Run) -> list[Section]:
    """GRPO: a few eval prompts with their G sampled completions and rewards, at the first and the last eval."""
    if not run.samples:
        return []
    shown = [run.samples[0]] + ([run.samples[-1]] if len(run.samples) > 1 else [])
    rows = []
    for rec in shown:
        for s in rec["samples"][:4]:
            if not isinstance(s, dict):
                continue
            for c, r in zip(s.get("completions", [])[:8], s.get("rewards", [])[:8]):
                rows.append([rec.get("step", "?"), str(s.get("prompt", ""))[-160:], str(c)[:240], _fmt(r)])
    return [Section("Sampled completions (GRPO)", Table(["step", "prompt (end)", "completion", "reward"], rows))]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


def metrics_table(run: Run) -> Section:
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
        return Verdict("regressed", "bad", "b") if k in regressed else Verdict("ok", "ok")

    rows = [[k, _fmt(before.get(k)), _fmt(after.get(k)), guard(k)] for k in keys]
    tol = (run.spec.get("config") or {}).get("regression_tolerance")
    if finished:
        verdict = ("no metric fell" if not regressed else f"{len(regressed)} metric(s) fell") + (
            f" by more than {tol:g} points (regression_tolerance)" if isinstance(tol, (int, float)) else "")
    else:
        verdict = (f"{run.status}: no after yet, so no guard verdict"
                   + (f"; the latest eval ({head}) is shown" if head != "after" else ""))
    return Section("Task metrics, before and after", Table(["metric", "before", head, "guard"], rows, "metrics"),
                   verdict)


def hardware_table(run: Run) -> Section:
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
    return Section("Hardware, profile and plan", Table(["", "value", "why / what"], rows, "hardware"))


def export_table(run: Run) -> list[Section]:
    x = run.export
    if not x:
        return []
    if not x.get("verified", True) or x.get("passed") is None:
        return [Section("Export", text=f"{x.get('gguf', 'model.gguf')} ({x.get('qtype', '?')}): not verified in "
                                       f"llama.cpp ({x.get('why_not', '')})")]
    d, g, t = x.get("distributions") or {}, x.get("generations") or {}, x.get("tokenization") or {}
    rows = [["verdict", "PASS" if x.get("passed") else "FAIL: " + "; ".join(x.get("failures", [])[:2])],
            ["type", x.get("qtype", "?")], ["tokenization", f"{t.get('mismatches', '?')} mismatches in "
                                                            f"{t.get('strings', '?')} strings"],
            ["next-token KL (mean)", _fmt(d.get("mean_kl"))], ["top-1 agreement", _fmt(d.get("top1_agreement"))],
            ["greedy answers identical", f"{g.get('identical', '?')}/{g.get('prompts', '?')}"]]
    return [Section("Export, verified in llama.cpp", Table(["", ""], rows, "export"))]


# --- pages -------------------------------------------------------------------------------------------------------

def _page(title: str, sub: str, charts: list[Chart], sections: list[Section], note: str = "") -> str:
    """The page through templates/report.html.j2, autoescaped: a run's text is text, never markup."""
    import jinja2

    from hwcompat.train.charts import FRAME

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.tests["verdict"] = lambda c: isinstance(c, Verdict)
    return env.get_template("report.html.j2").render(title=title, sub=sub, charts=charts, sections=sections,
                                                     note=note, F=FRAME)


def _name(path: Any) -> str:
    """A file or folder by its own name: the page is shared, the folders of the machine that ran it are not its
    business (config.yaml in the run folder keeps the full paths)."""
    return Path(str(path)).name or str(path)


def render_run(run: Run) -> str:
    cfg = run.spec.get("config") or {}
    trained = "full fine-tune" if cfg.get("finetune") == Finetune.full else f"LoRA r={cfg.get('lora_r', '?')}"
    sub = (f"{run.status} · {cfg.get('method', 'sft')} on {', '.join(_name(p) for p in cfg.get('train_data', []))}"
           f" · model {_name(cfg.get('model', '?'))} · {trained}"
           + (f" · resumed at step {', '.join(map(str, run.resumes))}" if run.resumes else ""))
    sections = [metrics_table(run), *samples_table(run), hardware_table(run), *export_table(run)]
    return _page(f"hwcompat run: {run.name}", sub, run_charts(run), sections)


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
                only: str | None = None) -> Chart:
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
    note = (f"These runs use different methods ({', '.join(methods)}): their losses measure different things and "
            "are shown apart; compare them by the task metrics." if len(methods) > 1 else "")
    return _page(f"hwcompat: {len(runs)} runs compared", " · ".join(str(r.path) for r in runs), plots,
                 [Section("After training, side by side", Table(["metric"] + names, rows, "compare"))], note)


def _per(value: Any, fmt: str, scale: float = 1.0) -> str:
    v = num_or_none(value)
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
            raise InputError(damaged(run.path / name, f"a value of a shape hwcompat never writes; {why}"))
    raise InputError(f"{', '.join(str(r.path) for r in runs)}: damaged run records ({why})")


def write_run_report(run_dir: str | Path) -> Path:
    """``RUN/report.html``, rebuilt from the run's files (atomic; listed in the folder's ledger as ours)."""
    from hwcompat.fsutil import atomic_write_text, record_written

    run = load_run(run_dir)
    target = run.path / "report.html"
    atomic_write_text(target, rendered(render_run, [run]))
    record_written(run.path, "report.html")
    return target
