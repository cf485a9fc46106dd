"""The training recipe, top to bottom: setup -> train -> evaluate -> finish. Runs in the worker process.

    hwcompat train config.yaml                 # launcher: profile env set, then this
    hwcompat train config.yaml --resume        # continue from the last checkpoint
    hwcompat train config.yaml --devices all   # torchrun, one process per identical device

The recipe owns the schedule, accumulation, clipping, loss scaling, checkpoints, signals, logging and the
distributed engine (``distributed``: torchrun + DDP). *What* is learned — the data, the batch shape, the
loss and the eval metrics — belongs to the objective (``objectives``). The hardware policy (dtype, attention,
compile, env) arrives resolved in the run spec; this module never re-decides it. Setup is recipe.py, the
metrics lines and totals records.py, what a finished run leaves outputs.py; this module drives them.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat import summary as summary_file
from hwcompat.data import metrics
from hwcompat.errors import HwcompatError, InputError
from hwcompat.fsutil import Terminated, atomic_dir
from hwcompat.train import batching, checkpoint, diskspace, distributed, records
from hwcompat.train.distributed import log
from hwcompat.train.model import accelerator
from hwcompat.train.outputs import (output_name, regression_text, save_full, summarize, summary_text,
                                    write_report)
from hwcompat.train.recipe import Recipe, items_per_batch, setup
from hwcompat.train.rewards import RewardError
from hwcompat.train.rundir import record_written
from hwcompat.train.spec import RunSpec, load_spec
from hwcompat.train.stopping import NONFINITE_STEPS, Signals, divergence_advice, oom_advice
from hwcompat.choices import Export, Finetune


def run(run_dir: Path, resume: bool = False, signals: Signals | None = None) -> int:
    """Train as described by ``run_dir/run.json``; returns the process exit code.

    One ``Signals`` handler lives from the first line to the last write, so SIGINT, SIGTERM and SIGHUP in any
    phase (load, eval, steps, checkpoint, adapter) end with what exists saved and a true message. The worker
    passes its own, which then also covers the export that follows.
    """
    t_start = time.time()
    owned = signals is None
    signals = signals or Signals()
    r = None
    try:
        spec = load_spec(run_dir / "run.json")
        dist = distributed.init(spec.device.kind)
        distributed.check_same_run(dist, _identity(spec))
        with signals.at_once():  # before the first step there is nothing new to save: stop where it is
            r = setup(spec, run_dir, dist, resume)
            r.t_start = t_start
            if r.dist.writer and r.start_step == 0 and r.cfg.eval_at_start:
                evaluate(r, 0, with_tasks=True)
        distributed.barrier(dist)
        code = train(r, signals)
        if code == 0:
            code = finish(r, signals)
        distributed.close(dist)
        return code
    except records.Full as exc:  # a record in the first or the final eval
        raise _saved_on_full(r, r.step, exc.what) from None
    except (MemoryError, OSError, RuntimeError) as exc:
        if r is None and diskspace.memory_exhausted(exc):  # the model or the data did not fit while loading
            raise diskspace.HostMemoryExhausted(diskspace.memory_message(
                run_dir, 0, 0, "loading the data and the model", "nothing was trained yet", exc)) from None
        if r is None or not (diskspace.memory_exhausted(exc) or diskspace.disk_full(exc)):
            raise
        raise _exhausted(r, exc, "the stop's own writes" if signals.received else "training") from None
    finally:
        if r is not None:
            r.trackers.close()  # flushed on every way out: a signal, an error, the end
            if r.reserve is not None:
                r.reserve.release()
        if owned:
            signals.restore()


def _exhausted(r: Recipe, exc: BaseException, phase: str) -> HwcompatError:
    """Memory or disk ran out outside the step loop's own handling: what ran out, where, what is kept."""
    ck = checkpoint.latest(r.run_dir)
    kept = f"kept: the checkpoint of step {ck.name.removeprefix(checkpoint.PREFIX).lstrip('0') or 0}" if ck else (
        "no checkpoint was written yet")
    if diskspace.memory_exhausted(exc):
        return diskspace.HostMemoryExhausted(diskspace.memory_message(r.run_dir, r.step, r.total_steps, phase, kept,
                                                                      exc))
    return diskspace.DiskFull(diskspace.stopped_message(r.run_dir, r.step, r.total_steps, phase, kept,
                                                        checkpoint.size_estimate(r.weights())))


def _identity(spec: RunSpec) -> dict[str, str]:
    """What every process of one run must share: the profile family's choices and the training settings."""
    settings = {k: v for k, v in spec.config.to_dict().items() if k not in ("output_dir", "num_threads")}
    p = spec.profile
    return {"profile": p.name, "dtype": p.dtype, "attention": p.attention, "compile_backend": p.compile_backend,
            "config": json.dumps(settings, sort_keys=True)}


# --- setup ------------------------------------------------------------------------------------------------


# --- train --------------------------------------------------------------------------------------------------

def micro_batches(r: Recipe, start_micro: int):
    """This rank's deterministic stream of (epoch, micro-batch) from a position; one batch plan per epoch."""
    lengths = r.objective.lengths()
    m, planned, mine = start_micro, None, []
    mu, ga = getattr(r.objective, "iterations", 1), r.cfg.gradient_accumulation
    while True:
        window, i = divmod(m, ga)  # GRPO's num_iterations: mu steps on one window of data, then the next
        d = (window // mu) * ga + i
        epoch, pos = divmod(d, r.per_rank)
        if epoch != planned:
            mine, planned = _epoch_plan(r, lengths, epoch), epoch
        if hasattr(r.objective, "seek"):  # an objective that samples (GRPO) seeds it from the batch's place
            r.objective.seek(d, r.dist.rank, window % mu)
        yield epoch, r.objective.collate(mine[pos], r.mode, r.tokenizer.pad_token_id)
        m += 1


def _epoch_plan(r: Recipe, lengths: list[int], epoch: int) -> list[list[int]]:
    """This process's micro-batches of one epoch, in the seed's shuffled order (never reordered by cost: putting
    the longest DPO pairs first raised held-out eval loss on 4 of 4 seeds, by 0.095 on average,
    bench/results/dpo-order.json)."""
    plan = batching.plan_batches(lengths, items_per_batch(r.objective, r.cfg), r.mode, r.cfg.seed + epoch)
    return plan[r.dist.rank::r.dist.world][:r.per_rank]


def probe_memory(r: Recipe) -> None:
    """Before a fresh run's first step on a GPU: this process's costliest micro-batch goes forward and backward
    once, its gradients dropped and no step taken, so a run that will run out of memory does so now, not hours in,
    and its peak (``first_step_peak_bytes``) stands beside the plan. Not for an objective that samples (GRPO: its
    rollouts are planned, and sampling them would move its random stream) nor with the optimizer in host RAM (its
    gradients stream to the host during backward)."""
    backend = accelerator(r.device.type)
    if backend is None or r.start_step or hasattr(r.objective, "seek") or r.host is not None:
        return
    lengths = r.objective.lengths()
    costliest = max(_epoch_plan(r, lengths, 0), key=lambda b: batching.batch_cost(b, lengths, r.mode))
    batch = r.objective.collate(costliest, r.mode, r.tokenizer.pad_token_id)
    with _autocast(r):
        loss = r.engine(batch, max(1.0, float(batch["n_target"])))
    r.scaler.scale(loss).backward()
    r.optimizer.zero_grad(set_to_none=True)
    r.history["first_step_peak_bytes"] = backend.max_memory_allocated()
    log(r.dist, f"memory probe: the costliest micro-batch ({batching.batch_cost(costliest, lengths, r.mode)} token "
                f"positions) ran forward and backward at {r.history['first_step_peak_bytes'] / 2**30:.2f} GiB peak")


def train(r: Recipe, signals: Signals) -> int:
    """Optimizer steps until ``total_steps``, or a signal (checkpoint, exit 130/143/129); returns the exit code."""
    import torch

    from hwcompat.progress import Progress

    stream = micro_batches(r, r.start_step * r.cfg.gradient_accumulation)
    bar = Progress(r.total_steps, initial=r.start_step, enabled=r.dist.writer)
    step, diverged, t_loop = r.start_step, 0, time.time()
    r.model.train()
    try:
        probe_memory(r)
        while step < r.total_steps:
            rng_at_step = checkpoint.rng_state()  # a stop inside this step resumes from here, bit for bit
            try:
                out = _step(r, stream, signals)
            except RewardError as exc:  # the user's reward failed on a rollout: keep what was trained, then say it
                raise _kept(r, step, rng_at_step, exc) from None
            if out.signalled_at is not None:  # signalled inside the step: the partial step is dropped
                return _interrupted(r, step, signals, rng_at_step, mid_step=out.signalled_at)
            loss, grad_norm, epoch = out.loss, out.grad_norm, out.epoch
            diverged = 0 if out.overflow or (math.isfinite(loss) and math.isfinite(grad_norm)) else diverged + 1
            if diverged >= NONFINITE_STEPS:
                raise HwcompatError(divergence_advice(r.cfg, r.spec.profile, step + 1, loss, grad_norm))
            r.scheduler.step()
            r.optimizer.zero_grad(set_to_none=True)
            step, r.last_loss = step + 1, loss
            r.step = step
            r.train_seconds = time.time() - t_loop
            r.step_tokens, r.step_seconds = r.tokens, r.train_seconds
            _log_step(r, bar, step, loss, grad_norm, epoch)
            stop = distributed.any_rank(r.dist, signals.received is not None, r.device)
            if r.cfg.eval_every and step % r.cfg.eval_every == 0 and step < r.total_steps and r.dist.writer:
                try:
                    with _at_once(r, signals):  # an eval with generation can take minutes: stop inside it
                        evaluate(r, step, with_tasks=True)
                except Terminated:
                    return _interrupted(r, step, signals, during="the eval after it")
            if stop:
                return _interrupted(r, step, signals)
            if r.cfg.checkpoint_every and step % r.cfg.checkpoint_every == 0 and step < r.total_steps:
                _save(r, step)
    except torch.OutOfMemoryError:
        raise HwcompatError(oom_advice(r.cfg, r.spec.profile, step)) from None
    except (OSError, RuntimeError, records.Full) as exc:
        if not (isinstance(exc, records.Full) or diskspace.disk_full(exc)):
            raise
        raise _saved_on_full(r, step, getattr(exc, "what", "a checkpoint")) from None
    finally:
        bar.close()
    r.train_seconds = time.time() - t_loop
    return 0


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step gave: its loss, gradient norm and epoch, and whether fp16 loss scaling skipped it;
    or, when a signal arrived inside it, the micro-batch it arrived at (``signalled_at``; the step is dropped)."""

    loss: float = math.nan
    grad_norm: float = math.nan
    epoch: int = 0
    overflow: bool = False
    signalled_at: int | None = None


def _step(r: Recipe, stream, signals: Signals) -> StepResult:
    """One optimizer step over ``gradient_accumulation`` micro-batches."""
    import torch

    window = []
    for _ in range(r.cfg.gradient_accumulation):  # one process: a signal also ends the collation
        if r.dist.world == 1 and signals.received is not None:
            return StepResult(signalled_at=len(window))
        window.append(next(stream))
    # Normalise by the global token count, so every rank's loss (and DDP's average) is the whole window's.
    n_target = distributed.all_sum(r.dist, sum(b["n_target"] for _, b in window), r.device)
    loss_sum = 0.0
    for i, (epoch, b) in enumerate(window):
        if i and distributed.any_rank(r.dist, signals.received is not None, r.device):  # mid-accumulation
            r.optimizer.zero_grad(set_to_none=True)
            return StepResult(signalled_at=i)
        last = i == len(window) - 1
        with (r.engine.no_sync() if r.dist.world > 1 and not last else nullcontext()):  # reduce once, at the end
            with _autocast(r):
                loss = r.engine(b, max(1.0, n_target) / r.dist.world)
            r.scaler.scale(loss).backward()
        if r.host is not None:  # this micro-batch's gradients, all on the host in fp32
            r.host.flush()
        loss_sum += loss.detach().float().item()
        r.tokens += b["n_tokens"]
    loss_sum = distributed.all_sum(r.dist, loss_sum, r.device)
    r.scaler.unscale_(r.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(r.stepped(), r.cfg.max_grad_norm).item()
    scale = r.scaler.get_scale()
    r.scaler.step(r.optimizer)
    r.scaler.update()
    if r.host is not None:  # the stepped masters become the card's working copy
        r.host.push()
    overflow = r.scaler.is_enabled() and r.scaler.get_scale() < scale  # fp16 overflow: the step was skipped, by design
    return StepResult(loss_sum, grad_norm, epoch, overflow)


def _autocast(r: Recipe):
    from hwcompat.train.model import autocast

    return autocast(r.device, r.spec.profile.dtype)


def _log_step(r: Recipe, bar, step: int, loss: float, grad_norm: float, epoch: int) -> None:
    t = records.totals(r)
    tps = t["tokens"] / max(t["train_seconds"], 1e-9)
    extra = r.objective.step_metrics() if hasattr(r.objective, "step_metrics") else {}  # GRPO: rewards, lengths
    extra = distributed.all_average(r.dist, extra, r.device, summed=("completions",),
                                    maxed=("completion_length_max",))  # the whole group's step, not rank 0's
    if r.dist.writer:
        records.record(r, {"step": step, "kind": "train", "loss": loss,
                                       "lr": r.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                       "epoch": epoch, "tokens_per_s": tps, "tokens": t["tokens"],
                                       "train_seconds": t["train_seconds"], "memory_bytes": t["peak_memory_bytes"],
                                       **extra})
    bar.update(1, loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", **({"reward": f"{extra['reward']:.3f}"} if
                                                               "reward" in extra else {}))
    r.trackers.log(step, {"train/loss": loss, "train/learning_rate": r.scheduler.get_last_lr()[0],
                          "train/grad_norm": grad_norm, "train/tokens_per_s": tps, "train/epoch": epoch,
                          "train/memory_gib": t["peak_memory_bytes"] / 2**30,  # the device's peak, or max RSS
                          **{f"train/{k}": v for k, v in extra.items()}})


def _save(r: Recipe, step: int, rng: dict[str, Any] | None = None) -> Path | None:
    """Every machine's writer keeps its own checkpoint (the replicas are identical); then the group waits."""
    path = None
    r.history["totals"] = records.totals(r) | {"sessions": r.history.get("totals", {}).get("sessions", [])}
    if r.dist.writer:
        path = checkpoint.save(r.run_dir, step, r.weights(), r.optimizer, r.scheduler, r.scaler,
                               {"history": r.history, "total_steps": r.total_steps}, r.cfg.keep_checkpoints, rng=rng,
                               objective=r.objective.state() if hasattr(r.objective, "state") else None)
    distributed.barrier(r.dist)
    return path


def _kept(r: Recipe, step: int, rng: dict[str, Any], exc: Exception) -> InputError:
    """An input error inside a step (a reward function): the steps done are saved, the error says how to go on."""
    path = _save(r, step, rng)
    if r.dist.writer:
        write_report(r.run_dir, lambda m: log(r.dist, m))
    return type(exc)(f"{exc}\nkept: the checkpoint of step {step}/{r.total_steps} ({path}); after the fix, resume "
                     f"with: hwcompat train {r.run_dir / 'config.yaml'} --resume")


def _at_once(r: Recipe, signals: Signals):
    """A phase that stops where it is on a signal. One process only: in a DDP group the writer must not leave
    for the checkpoint barrier while the others wait in a step's collective; there the flag acts next step."""
    return signals.at_once() if r.dist.world == 1 else nullcontext()


def _interrupted(r: Recipe, step: int, signals: Signals, rng: dict[str, Any] | None = None,
                 mid_step: int | None = None, during: str | None = None) -> int:
    """A signal: save the last completed step (a partial one is redone on resume), say how to resume."""
    path = _save(r, step, rng)
    where = "" if mid_step is None else (f" (micro-batch {mid_step} of {r.cfg.gradient_accumulation}; that step is "
                                         "redone on resume)")
    if during:
        where += f" (during {during}; it is redone on resume)"
    then = " (all steps are done: the resume runs the final eval and writes the adapter)" if (
        step >= r.total_steps) else ""
    if r.dist.writer:
        write_report(r.run_dir, lambda m: log(r.dist, m))
    log(r.dist, f"\ninterrupted at step {step}/{r.total_steps}{where}: checkpoint saved to {path}\n"
                f"resume with: hwcompat train {r.run_dir / 'config.yaml'} --resume{then}")
    return signals.exit_code()


# --- evaluate ----------------------------------------------------------------------------------------------

def evaluate(r: Recipe, step: int, with_tasks: bool) -> dict[str, Any]:
    """The objective's metrics now, appended to metrics.jsonl and the run's history (writers only)."""
    rec: dict[str, Any] = {"step": step, "kind": "eval", **r.objective.evaluate(r.model, with_tasks)}
    samples = rec.pop("samples", None)  # GRPO: sampled completions with their rewards, a record of their own
    records.record(r, rec)
    if samples:
        records.record(r, {"step": step, "kind": "samples", "samples": samples})
    r.history["eval"].append(rec)
    r.trackers.log(step, {f"eval/{k.removeprefix('eval_')}": v for k, v in _scores(rec).items()})
    loss = f"loss {rec['eval_loss']:.4f} " if "eval_loss" in rec else ""
    reward = f"reward {rec['reward']:.3f} " if "reward" in rec else ""
    log(r.dist, f"eval @ step {step}: {loss}{reward}{metrics.headline(rec)}")
    return rec


def _scores(rec: dict[str, Any]) -> dict[str, Any]:
    """An eval record's metrics, without its bookkeeping (step, kind, row count)."""
    return {k: v for k, v in rec.items() if k not in ("step", "kind", "n")}


def _saved_on_full(r: Recipe, step: int, what: str) -> HwcompatError:
    """The disk filled at ``step``: the reserve's space takes the checkpoint of the steps done so far."""
    if r.reserve is not None:
        r.reserve.release()
    try:
        path = _save(r, step)
        kept = f"kept: every step up to {step}, in the checkpoint {path} (written into the space reserved at the start)"
    except (OSError, RuntimeError) as exc:
        if not diskspace.disk_full(exc):
            raise
        ck = checkpoint.latest(r.run_dir)
        kept = f"kept: the checkpoint {ck}; the steps after it are lost" if ck else "no checkpoint could be written"
    if r.dist.writer:
        write_report(r.run_dir, lambda m: log(r.dist, m))
    return diskspace.DiskFull(diskspace.stopped_message(r.run_dir, step, r.total_steps, what, kept,
                                                        checkpoint.size_estimate(r.weights())))


# --- finish ------------------------------------------------------------------------------------------------

def finish(r: Recipe, signals: Signals) -> int:
    """Final eval, the adapter and summary.json, on each machine's writer; returns the exit code. The recipe
    ends here: an export is the pipeline's next step (``hwcompat.pipeline.worker``), from these files. A signal
    in the final eval saves a checkpoint at the last step; during the (short) adapter and summary writes it
    waits."""
    if not r.dist.writer:
        return 0
    try:
        with _at_once(r, signals):
            final = evaluate(r, r.total_steps, with_tasks=True)
    except Terminated:
        return _interrupted(r, r.total_steps, signals, during="the final eval")
    out = output_name(r.cfg)
    try:
        with atomic_dir(r.run_dir / out) as tmp:
            if r.cfg.finetune == Finetune.full:
                save_full(r, tmp)
            else:
                r.model.save_pretrained(str(tmp), safe_serialization=True)
            r.tokenizer.save_pretrained(str(tmp))
    except (OSError, RuntimeError) as exc:
        if not diskspace.disk_full(exc):
            raise
        raise _saved_on_full(r, r.total_steps, f"the {out} (the resume evaluates and writes it again)") from None
    record_written(r.run_dir, out)
    summary = summarize(r, final)
    summary_file.write(r.run_dir, summary)
    record_written(r.run_dir, summary_file.NAME)
    log(r.dist, summary_text(summary, r.run_dir))
    r.trackers.summary({**{f"before/{k}": v for k, v in _scores(summary.eval_before).items()},
                        **{f"after/{k}": v for k, v in _scores(final).items()}, "regressed": len(summary.regressed),
                        "tokens_per_s": summary.tokens_per_s, "peak_memory_gib": summary.peak_memory_bytes / 2**30})
    r.trackers.close()
    if summary.regressed:
        log(r.dist, regression_text(summary.regressed, r.cfg.regression_tolerance))
    write_report(r.run_dir, lambda m: log(r.dist, m))
    if signals.received is not None:
        log(r.dist, "interrupted after the run finished: the adapter and summary.json are saved"
                    + ("; the export was not started" if r.cfg.export == Export.gguf else ""))
        return signals.exit_code()
    return 0


