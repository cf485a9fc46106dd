"""What a finished run leaves: the trained weights (adapter/ or a full model/), summary.json and report.html.

The loop (loop.py) decides when; this module says what each output holds and how the run reports itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwcompat import envvars
from hwcompat.data import metrics
from hwcompat.errors import HwcompatError
from hwcompat.probe import malloc
from hwcompat.summary import Regression, Summary
from hwcompat.train import records
from hwcompat.train.model import accelerator
from hwcompat.choices import Finetune

if TYPE_CHECKING:
    from hwcompat.train.recipe import Recipe


def output_name(cfg) -> str:
    """The run's trained weights: ``adapter/`` (LoRA) or ``model/`` (a full fine-tune: a whole model folder)."""
    return "model" if cfg.finetune == Finetune.full else "adapter"


def save_full(r: Recipe, folder: Path) -> None:
    """A full fine-tune as a model folder transformers loads as is (sharded safetensors, config, generation
    config), in the dtype its source folder stores; the weights are the fp32 masters (on the host when offloaded),
    tied weights kept as one tensor."""
    import torch

    host = r.host
    dtype = getattr(torch, getattr(r.model, "hwcompat_source_dtype", "float32"))
    masters = {w.data_ptr(): m for w, m in zip(host.working, host.masters)} if host else {}
    sources = {**_stored_frozen(r), **masters}  # by the working tensor's address: what to save in its place
    cast: dict[int, Any] = {}
    state = {}
    for name, t in r.model.state_dict().items():
        if t.data_ptr() not in cast:  # tied weights: one tensor under two names
            cast[t.data_ptr()] = sources.get(t.data_ptr(), t).detach().to("cpu", dtype).contiguous()
        state[name] = cast[t.data_ptr()]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per save of a few seconds is noise beside the run's own lines
    try:
        r.model.save_pretrained(str(folder), state_dict=state, safe_serialization=True, max_shard_size="2GB")
    finally:
        hf_logging.enable_progress_bar()
    conf = folder / "config.json"  # transformers writes the trained module's dtype (fp32): say the weights' own
    data = json.loads(conf.read_text(encoding="utf-8"))
    data["dtype"] = str(dtype).removeprefix("torch.")
    conf.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _stored_frozen(r: Recipe) -> dict[int, Any]:
    """The frozen weights (those ``trainable`` leaves out) as the source folder stores them, by the address of the
    copy in the model: that copy is in the profile's dtype, and an fp32 source saved from a bf16 copy would come
    out rounded although it never trained."""
    from hwcompat import weights

    source = getattr(r.model, "hwcompat_source_dtype", "float32")
    frozen = {p.data_ptr() for p in r.model.parameters()
              if not p.requires_grad and str(p.dtype).removeprefix("torch.") != source}  # the others are exact
    names = {n: t.data_ptr() for n, t in r.model.state_dict().items() if t.data_ptr() in frozen}
    return {names[n]: t for n, t in weights.originals(Path(r.cfg.model), set(names)).items()}


def summarize(r: Recipe, final: dict[str, Any]) -> Summary:
    """The run's summary.json: what it trained, how fast, in how much memory, on what, and the guard's flags."""
    import peft
    import torch
    import transformers

    from hwcompat import __version__

    p = r.spec.profile
    t = records.totals(r, finished=True)
    first = r.history["eval"][0] if r.history["eval"] and r.history["eval"][0]["step"] == 0 else {}
    return Summary(
        steps=r.total_steps, total_steps=r.total_steps, objective=r.objective.name, finetune=r.cfg.finetune,
        output=output_name(r.cfg), optimizer_offload="host" if r.host is not None else "none",
        train_rows=len(r.objective.train), eval_rows=len(r.objective.evals), final_train_loss=r.last_loss,
        eval_before=first, eval_after=final, tokens_per_s=t["tokens"] / max(t["train_seconds"], 1e-9),
        train_seconds=t["train_seconds"], wall_seconds=t["wall_seconds"],
        resumes=len(r.history.get("totals", {}).get("sessions", [])), peak_memory_bytes=int(t["peak_memory_bytes"]),
        peak_memory_kind=(f"torch.{r.device.type}.max_memory_allocated" if accelerator(r.device.type)
                          else "process max RSS"),
        cpu_allocator=malloc.in_use() if r.device.type == "cpu" else None,
        first_step_peak_bytes=r.history.get("first_step_peak_bytes"),
        planned_peak_bytes=r.spec.planned_peak_bytes, planned_allocated_bytes=r.spec.planned_allocated_bytes,
        world_size=r.dist.world, nnodes=r.dist.nnodes, batching=r.mode,
        profile_env_applied=all(envvars.get(k) == v for k, v in p.env.items()), cpu_emulation=r.spec.cpu_emulation,
        profile=p.name, env_seen={k: envvars.get(k) for k in p.env}, dtype=p.dtype, attention=p.attention,
        compile_backend=p.compile_backend,
        versions={"hwcompat": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                  "peft": peft.__version__, "python": sys.version.split()[0]},
        regressed=tuple(Regression(**x) for x in metrics.regressions(first, final, r.cfg.regression_tolerance)))


def write_report(run_dir: Path, say) -> None:
    """report.html of a finished or stopped run (the export chain rebuilds it with its figures). A page that cannot
    be drawn is said, never a lost run."""
    from hwcompat.train.report import write_run_report

    try:
        path = write_run_report(run_dir)
    except (HwcompatError, OSError, ValueError, KeyError, TypeError) as exc:
        say(f"warning: {run_dir / 'report.html'} was not written ({exc}); `hwcompat report {run_dir}` rebuilds it")
        return
    say(f"report: {path}")


def regression_text(regressed: tuple[Regression, ...], tolerance: float) -> str:
    rows = "\n".join(f"  {x.metric:16} {x.before:.3f} -> {x.after:.3f}  (-{x.drop_points:.1f} points)"
                     for x in regressed)
    return (f"\n!!! REGRESSION: {len(regressed)} task metric(s) fell by more than {tolerance:g} points during this "
            f"run (regression_tolerance):\n{rows}\nThe model is worse at its task than before this run; "
            "summary.json lists it under \"regressed\". For DPO, more diverse preference pairs usually help.")


def summary_text(s: Summary, run_dir: Path) -> str:
    """The run's last lines: speed, memory, each metric before and after, where the weights are."""
    before, after = s.eval_before, s.eval_after
    lines = [f"done: {s.steps} steps in {s.train_seconds:.1f}s, {s.tokens_per_s:,.0f} tokens/s, "
             f"peak memory {s.peak_memory_bytes / 2**30:.2f} GiB"]
    keys = [k for k in ("eval_loss", "reward_accuracy", "reward_margin", "reward", "exact_match", "accuracy",
                        "json_valid", "field_precision", "field_recall", "field_f1") if k in after]
    if "reward" in keys:  # GRPO: each reward beside the total
        at = keys.index("reward") + 1
        keys[at:at] = sorted(k for k in after if k.startswith("reward_") and k not in keys)
    if keys:
        lines.append(f"{'metric':16} {'before':>8} {'after':>8}")
        for k in keys:
            b = before.get(k)
            shown = "-" if b is None else f"{b:.3f}"
            lines.append(f"{k:16} {shown:>8} {after[k]:8.3f}")
    lines.append(f"{s.output}: {run_dir / s.output}")
    return "\n".join(lines)
