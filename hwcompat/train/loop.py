"""The training recipe, top to bottom: setup -> train -> evaluate -> finish. Runs in the worker process.

    hwcompat train config.yaml                 # launcher: profile env set, then this
    hwcompat train config.yaml --resume        # continue from the last checkpoint
    hwcompat train config.yaml --devices all   # torchrun, one process per identical device

The recipe owns the schedule, accumulation, clipping, loss scaling, checkpoints, signals, logging and the
distributed engine (``distributed``: torchrun + DDP). *What* is learned — the data, the batch shape, the
loss and the eval metrics — belongs to the objective (``objectives``: SFT today). The hardware policy
(dtype, attention, compile, env) arrives resolved in the run spec; this module never re-decides it.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwcompat.errors import HwcompatError, InputError
from hwcompat.fsutil import Terminated, atomic_dir, atomic_write_json, atomic_write_text
from hwcompat.data import metrics
from hwcompat.probe import malloc
from hwcompat.train import batching, checkpoint, diskspace, distributed, objectives
from hwcompat.train import trackers as trackers_mod
from hwcompat.train.distributed import Dist, log
from hwcompat.train.model import load_model
from hwcompat.train.optim import make_optimizer
from hwcompat.train.objectives.sft import ResponseLoss, evaluate_loss, generate, task_metrics  # noqa: F401 (API)
from hwcompat.train.rewards import RewardError
from hwcompat.train.rundir import record_written
from hwcompat.train.spec import RunSpec, load_spec
from hwcompat import envvars
from hwcompat.train.stopping import (NONFINITE_STEPS, SecondInterrupt, Signals,  # noqa: F401 (worker's API)
                                     divergence_advice, oom_advice)


@dataclass
class Recipe:
    """Everything setup built, that train, evaluate and finish share."""

    spec: RunSpec
    run_dir: Path
    dist: Dist
    device: Any  # a torch.device (torch is imported only once the run starts)
    objective: objectives.Objective
    model: Any  # the peft model: saved, evaluated
    engine: Any  # what the loss runs through: DDP over the objective's loss, or that loss itself
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    mode: str  # batching mode
    per_rank: int  # micro-batches per epoch for each process
    total_steps: int
    start_step: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {"eval": []})
    t_start: float = 0.0
    train_seconds: float = 0.0
    tokens: int = 0
    last_loss: float = float("nan")
    trackers: Any = field(default_factory=lambda: trackers_mod.Trackers())  # report_to (writer process only)
    reserve: Any = None  # one checkpoint's disk, claimed at the start (diskspace.Reserve; writer process only)
    step: int = 0  # the last completed step, for what a stop says
    step_tokens: int = 0  # this process's tokens at the last completed step (a stop mid-step drops the rest)
    step_seconds: float = 0.0  # this process's training seconds at that step
    prior: dict[str, float] = field(default_factory=dict)  # the run's totals before this process (a resume)

    @property
    def cfg(self):
        return self.spec.config

    @property
    def host(self):
        """The host-RAM optimizer side of a full fine-tune (train/host_optim.py), or None."""
        return getattr(self.model, "hwcompat_host", None)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


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
    except _Full as exc:  # a record in the first or the final eval
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
                                                        checkpoint.size_estimate(weights(r))))


def _identity(spec: RunSpec) -> dict[str, str]:
    """What every process of one run must share: the profile family's choices and the training settings."""
    settings = {k: v for k, v in spec.config.to_dict().items() if k not in ("output_dir", "num_threads")}
    p = spec.profile
    return {"profile": p.name, "dtype": p.dtype, "attention": p.attention, "compile_backend": p.compile_backend,
            "config": json.dumps(settings, sort_keys=True)}


# --- setup ------------------------------------------------------------------------------------------------

def setup(spec: RunSpec, run_dir: Path, dist: Dist, resume: bool) -> Recipe:
    """Device, data, model, objective, optimizer and schedule; the checkpoint when resuming."""
    import torch

    cfg, profile = spec.config, spec.profile
    _warn_missing_env(spec, dist)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = _bind_device(spec, dist)
    objective = objectives.create(cfg.method, cfg, profile, device)
    tokenizer = _tokenizer(cfg)
    objective.load(tokenizer, lambda m: log(dist, m))  # data checks and tokenisation, before the model loads
    if device.type != "cpu" and cfg.numerics_check:  # every rank its own card, before the model takes its memory
        from hwcompat.train import numerics

        numerics.check(device, profile.dtype, profile.attention, cfg.model, f"{spec.device.name} ({device})",
                       lambda m: log(dist, m))
    model = load_model(cfg, profile, device)
    streamer = getattr(model, "hwcompat_streamer", None)
    # compiling through the streamer's per-layer autograd Function would only add graph breaks
    objective.bind(model, "eager" if streamer else profile.compile_backend)
    mode = batching.resolve_batching(cfg.batching, profile.attention, getattr(objective, "auto_batching", None))
    _log_model(dist, spec, model, mode)
    per_rank = len(batching.plan_batches(objective.lengths(), _items(objective, cfg), mode, cfg.seed)) // dist.world
    if per_rank == 0:
        raise InputError(f"{len(objective.lengths())} training rows are too few for "
                         f"micro_batch_size={cfg.micro_batch_size} on {dist.world} process(es)")
    # GRPO's num_iterations: each generation's window is stepped on that many times
    steps_per_epoch = max(1, per_rank // cfg.gradient_accumulation) * getattr(objective, "iterations", 1)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    host = getattr(model, "hwcompat_host", None)
    if host is not None and dist.world > 1:
        raise InputError(f"optimizer_offload=host runs on one process; this run has {dist.world}: set "
                         "optimizer_offload=none (each card then holds its optimizer), or train on one device")
    trainable = host.masters if host else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, trainable, cfg.learning_rate, cfg.weight_decay, profile,
                               fused_cpu=cfg.finetune == "full")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_schedule, int(cfg.warmup_ratio * total), total))
    scaler = torch.amp.GradScaler(device.type, enabled=profile.dtype == "float16")  # a no-op unless fp16
    r = Recipe(spec, run_dir, dist, device, objective, model, None, tokenizer, optimizer, scheduler, scaler, mode,
               per_rank, total)
    _restore(r, resume)  # before DDP: its construction broadcasts rank 0's weights to the group
    r.step = r.start_step
    if dist.writer:  # a nearly full disk is said now, before the first step (diskspace.py)
        r.reserve = diskspace.Reserve(run_dir, checkpoint.size_estimate(weights(r)))
    r.engine = _engine(model, objective, dist, device)
    if dist.writer and cfg.report_to:
        # recorded before the libraries write (some create their folder at the first log): the launcher refused
        # a user's folder at these names, so what appears there is theirs on our behalf
        record_written(run_dir, *trackers_mod.run_folders(cfg.report_to, run_dir, os.environ), planned=True)
        r.trackers = trackers_mod.Trackers.open(cfg.report_to, run_dir, _tracked_params(spec), r.start_step,
                                                lambda m: log(dist, m))
    return r


def _items(objective, cfg) -> int:
    """Rows per micro-batch: the config's, or the objective's own count (GRPO: prompts, micro_batch_size / G)."""
    return getattr(objective, "micro_batch", cfg.micro_batch_size)


def _tracked_params(spec: RunSpec) -> dict[str, Any]:
    p = spec.profile
    profile = {"name": p.name, "dtype": p.dtype, "attention": p.attention, "compile_backend": p.compile_backend,
               "device": spec.device.name}
    return trackers_mod.flat_params(spec.config.to_dict(), profile)


def _warn_missing_env(spec: RunSpec, dist: Dist) -> None:
    missing = {k: v for k, v in spec.profile.env.items() if envvars.get(k) != v}
    if missing:
        log(dist, f"warning: profile environment not applied in this process: {missing}; "
                  "start training through `hwcompat train`")


def _bind_device(spec: RunSpec, dist: Dist):
    """The launcher chose the device kind; here each process takes its local GPU."""
    import torch

    if spec.device.kind == "cpu":
        if spec.cpu_emulation:
            log(dist, f"cpu emulation: running the {spec.profile.name} profile on the CPU (plumbing, not the card)")
        return torch.device("cpu")
    backend = accelerator(spec.device.kind)  # torch.cuda (CUDA and ROCm) or torch.xpu (Intel)
    if backend is None or not backend.is_available():
        raise HwcompatError(f"the {spec.profile.name} profile needs a GPU, but this torch ({torch.__version__}) sees "
                            "none; run `hwcompat doctor` for the install command, or use the "
                            f"{spec.profile.image} image")
    backend.set_device(dist.local_rank)
    device = torch.device(spec.device.kind, dist.local_rank)
    if spec.config.memory_limit_gib:
        _limit_memory(backend, device, spec.config.memory_limit_gib, dist)
    return device


def _limit_memory(backend, device, limit_gib: float, dist: Dist) -> None:
    """memory_limit_gib: the allocator refuses beyond it, as a card of that size would (the plan used it too)."""
    total = backend.get_device_properties(device).total_memory
    if not hasattr(backend, "set_per_process_memory_fraction"):
        raise HwcompatError(f"memory_limit_gib: this torch cannot cap {device.type} memory; set memory_limit_gib=0")
    backend.set_per_process_memory_fraction(min(1.0, limit_gib * 2**30 / total), device)
    log(dist, f"memory limit: {limit_gib:g} GiB of this card's {total / 2**30:.1f} GiB")


def accelerator(kind: str):
    """torch's module for a device kind ("cuda" covers ROCm builds too); None for the CPU or a torch without it."""
    import torch

    return getattr(torch, kind, None) if kind in ("cuda", "xpu") else None


def _tokenizer(cfg):
    from hwcompat import hfload

    source = cfg.tokenizer or cfg.model
    if Path(source).exists() or not cfg.allow_network:
        tokenizer = hfload.tokenizer(source, "tokenizer", trust_remote_code=cfg.trust_remote_code)
    else:  # a hub id the user allowed (the launcher checked it)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _log_model(dist: Dist, spec: RunSpec, model, mode: str) -> None:
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    p, cfg = spec.profile, spec.config
    log(dist, f"model: {cfg.model} | {p.dtype} | attention {p.attention} | compile {p.compile_backend} | "
              f"batching {mode} | {_what_trains(cfg, model)} trains {n_trainable:,} of {n_total:,} parameters"
              f"{f' | {dist.world} processes on {dist.nnodes} machine(s), DDP' if dist.world > 1 else ''}"
              f"{_stream_note(model)}")


def _what_trains(cfg, model) -> str:
    if cfg.finetune != "full":
        return f"LoRA r={cfg.lora_r}"
    host = getattr(model, "hwcompat_host", None)
    where = (f"fp32 masters + AdamW in host RAM ({host.host_bytes() / 2**30:.2f} GiB), the card a working copy"
             if host else "fp32 weights + AdamW resident")
    return f"full fine-tune ({where})"


def _stream_note(model) -> str:
    s = getattr(model, "hwcompat_streamer", None)
    if s is None:
        return ""
    return (f" | offload=layers: {s.n} decoder layers streamed from host memory, {s.layer_bytes / 2**20:.0f} MiB each, "
            f"{len(s.slots)} on the device at a time")


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _restore(r: Recipe, resume: bool) -> None:
    """--resume: the last checkpoint's weights, optimizer, schedule and RNG; never a step backwards."""
    if not resume:
        if r.dist.writer:
            r.metrics_path.unlink(missing_ok=True)
        return
    ck, state = _load_checkpoint(r)
    r.start_step = state["step"]
    if r.start_step > r.total_steps:
        raise InputError(f"--resume: the run already made {r.start_step} steps, but these settings give "
                         f"{r.total_steps} in all; a resume never moves a run backwards (raise epochs or "
                         "max_steps, or start a new run)")
    r.history = state.get("history", r.history)
    prior = r.history.get("totals")
    if prior:  # the run so far: this process's counts add to it (a resumed run's summary is the whole run's)
        r.prior = {k: prior.get(k, 0) for k in TOTALS}
        r.history["totals"] = {**prior, "sessions": [*prior.get("sessions", []), r.start_step]}
    if r.dist.writer and r.metrics_path.exists():
        _trim_metrics(r)
    if r.dist.writer:
        _append_jsonl(r.metrics_path, {"step": r.start_step, "kind": "resume"})  # report.html marks it on the curves
    log(r.dist, f"resumed from {ck} at step {r.start_step}/{r.total_steps}")


def _load_checkpoint(r: Recipe) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that loads; a damaged one is named and the one before it used."""
    import pickle

    skipped = []
    for ck in checkpoint.candidates(r.run_dir):
        why = checkpoint.problem(ck)
        if why is None:
            try:
                state = checkpoint.load(ck, weights(r), r.optimizer, r.scheduler, r.scaler)
                if r.host is not None:  # the restored masters become the card's working copy
                    r.host.push()
                if state.get("objective") and hasattr(r.objective, "load_state"):  # GRPO's kept rollouts
                    r.objective.load_state(state.pop("objective"))
                return ck, state
            except InputError:
                raise  # the checkpoint is sound but belongs to other settings: said as it is
            except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
                why = f"it does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
        skipped.append(f"{ck.name}: {why}")
        log(r.dist, f"warning: checkpoint {ck} is damaged ({why}); trying the one before it")
    if skipped:
        raise InputError(f"--resume: no usable checkpoint in {checkpoint.checkpoint_dir(r.run_dir)} ("
                         f"{'; '.join(skipped)}); start the run again with --overwrite")
    raise InputError(f"--resume: no checkpoint in {checkpoint.checkpoint_dir(r.run_dir)}; start without --resume")


def _trim_metrics(r: Recipe) -> None:
    """Keep the log up to the resumed step; a torn or blank line (a crash mid-write) is dropped and said."""
    kept, torn = [], 0
    for ln in r.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(ln)
            step = rec.get("step", 0) if isinstance(rec, dict) else None
        except ValueError:
            step = None
        if not isinstance(step, int):
            torn += 1
        elif step <= r.start_step:
            kept.append(ln)
    if torn:
        log(r.dist, f"note: {r.metrics_path}: dropped {torn} torn or blank line(s) (an interrupted write)")
    atomic_write_text(r.metrics_path, "".join(ln + "\n" for ln in kept))


def _engine(model, objective, dist: Dist, device):
    """The module the loss runs through. DDP needs one whose forward *is* the loss: the objective computes it
    from the model's parts (SFT runs the decoder and the LM head separately), not from ``model.forward``."""
    import torch

    class ObjectiveLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # registered, so DDP finds the trainable parameters

        def forward(self, batch: dict[str, Any], n_items: float):
            return objective.loss(batch, n_items)

    return distributed.wrap(ObjectiveLoss(), dist, device)


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
    plan = batching.plan_batches(lengths, _items(r.objective, r.cfg), r.mode, r.cfg.seed + epoch)
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
    except (OSError, RuntimeError, _Full) as exc:
        if not (isinstance(exc, _Full) or diskspace.disk_full(exc)):
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
    grad_norm = torch.nn.utils.clip_grad_norm_(stepped(r), r.cfg.max_grad_norm).item()
    scale = r.scaler.get_scale()
    r.scaler.step(r.optimizer)
    r.scaler.update()
    if r.host is not None:  # the stepped masters become the card's working copy
        r.host.push()
    overflow = r.scaler.is_enabled() and r.scaler.get_scale() < scale  # fp16 overflow: the step was skipped, by design
    return StepResult(loss_sum, grad_norm, epoch, overflow)


def stepped(r: Recipe) -> list:
    """The tensors the optimizer steps: the host masters (optimizer_offload: host), else the trainable parameters."""
    if r.host is not None:
        return r.host.masters
    return [p for p in r.model.parameters() if p.requires_grad]


def weights(r: Recipe) -> dict[str, Any]:
    """What a checkpoint keeps of the model, by parameter name: the fp32 masters, wherever they live."""
    if r.host is not None:
        return r.host.named_masters()
    return {n: p for n, p in r.model.named_parameters() if p.requires_grad}


def _autocast(r: Recipe):
    from hwcompat.train.model import autocast

    return autocast(r.device, r.spec.profile.dtype)


def _log_step(r: Recipe, bar, step: int, loss: float, grad_norm: float, epoch: int) -> None:
    t = totals(r)
    tps = t["tokens"] / max(t["train_seconds"], 1e-9)
    extra = r.objective.step_metrics() if hasattr(r.objective, "step_metrics") else {}  # GRPO: rewards, lengths
    extra = distributed.all_average(r.dist, extra, r.device, summed=("completions",),
                                    maxed=("completion_length_max",))  # the whole group's step, not rank 0's
    if r.dist.writer:
        _record(r, {"step": step, "kind": "train", "loss": loss,
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
    r.history["totals"] = totals(r) | {"sessions": r.history.get("totals", {}).get("sessions", [])}
    if r.dist.writer:
        path = checkpoint.save(r.run_dir, step, weights(r), r.optimizer, r.scheduler, r.scaler,
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
    _record(r, rec)
    if samples:
        _record(r, {"step": step, "kind": "samples", "samples": samples})
    r.history["eval"].append(rec)
    r.trackers.log(step, {f"eval/{k.removeprefix('eval_')}": v for k, v in _scores(rec).items()})
    loss = f"loss {rec['eval_loss']:.4f} " if "eval_loss" in rec else ""
    reward = f"reward {rec['reward']:.3f} " if "reward" in rec else ""
    log(r.dist, f"eval @ step {step}: {loss}{reward}{metrics.headline(rec)}")
    return rec


def _scores(rec: dict[str, Any]) -> dict[str, Any]:
    """An eval record's metrics, without its bookkeeping (step, kind, row count)."""
    return {k: v for k, v in rec.items() if k not in ("step", "kind", "n")}


class _Full(Exception):
    """A metrics line that could not be written for lack of disk, written after all into the reserve's space:
    the loop saves a checkpoint there too and stops."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _record(r: Recipe, record: dict[str, Any]) -> None:
    try:
        _append_jsonl(r.metrics_path, record)
    except OSError as exc:
        if not diskspace.disk_full(exc) or r.reserve is None or not r.reserve.release():
            raise
        _append_jsonl(r.metrics_path, record)  # the line goes in; then the run stops with a checkpoint
        raise _Full(f"{r.metrics_path.name} (step {record['step']}'s record)") from None


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
                                                        checkpoint.size_estimate(weights(r))))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    from hwcompat.fsutil import append_line

    new = not os.path.lexists(path)
    append_line(path, json.dumps(record))
    if new:
        record_written(path.parent, path.name)


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
            if r.cfg.finetune == "full":
                _save_full(r, tmp)
            else:
                r.model.save_pretrained(str(tmp), safe_serialization=True)
            r.tokenizer.save_pretrained(str(tmp))
    except (OSError, RuntimeError) as exc:
        if not diskspace.disk_full(exc):
            raise
        raise _saved_on_full(r, r.total_steps, f"the {out} (the resume evaluates and writes it again)") from None
    record_written(r.run_dir, out)
    summary = _summary(r, final)
    summary["regressed"] = metrics.regressions(summary["eval_before"], final, r.cfg.regression_tolerance)
    atomic_write_json(r.run_dir / "summary.json", summary)
    record_written(r.run_dir, "summary.json")
    log(r.dist, _summary_text(summary, r.run_dir))
    r.trackers.summary({**{f"before/{k}": v for k, v in _scores(summary["eval_before"]).items()},
                        **{f"after/{k}": v for k, v in _scores(final).items()}, "regressed": len(summary["regressed"]),
                        "tokens_per_s": summary["tokens_per_s"], "peak_memory_gib": summary["peak_memory_bytes"] / 2**30})
    r.trackers.close()
    if summary["regressed"]:
        log(r.dist, _regression_text(summary["regressed"], r.cfg.regression_tolerance))
    write_report(r.run_dir, lambda m: log(r.dist, m))
    if signals.received is not None:
        log(r.dist, "interrupted after the run finished: the adapter and summary.json are saved"
                    + ("; the export was not started" if r.cfg.export == "gguf" else ""))
        return signals.exit_code()
    return 0


def output_name(cfg) -> str:
    """The run's trained weights: ``adapter/`` (LoRA) or ``model/`` (a full fine-tune: a whole model folder)."""
    return "model" if cfg.finetune == "full" else "adapter"


def _save_full(r: Recipe, folder: Path) -> None:
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


def _summary(r: Recipe, final: dict[str, Any]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from hwcompat import __version__

    p = r.spec.profile
    t = totals(r, finished=True)
    first = r.history["eval"][0] if r.history["eval"] and r.history["eval"][0]["step"] == 0 else {}
    backend = accelerator(r.device.type)
    return {
        "steps": r.total_steps, "total_steps": r.total_steps, "objective": r.objective.name,
        "finetune": r.cfg.finetune, "output": output_name(r.cfg),
        "optimizer_offload": "host" if r.host is not None else "none",
        "train_rows": len(r.objective.train), "eval_rows": len(r.objective.evals),
        "final_train_loss": r.last_loss, "eval_before": first, "eval_after": final,
        "tokens_per_s": t["tokens"] / max(t["train_seconds"], 1e-9), "train_seconds": t["train_seconds"],
        "wall_seconds": t["wall_seconds"], "resumes": len(r.history.get("totals", {}).get("sessions", [])),
        "peak_memory_bytes": t["peak_memory_bytes"],
        "peak_memory_kind": f"torch.{r.device.type}.max_memory_allocated" if backend else "process max RSS",
        "cpu_allocator": malloc.in_use() if r.device.type == "cpu" else None,  # what the process really ran on
        "first_step_peak_bytes": r.history.get("first_step_peak_bytes"),  # GPU: the costliest micro-batch's peak
        "planned_peak_bytes": r.spec.planned_peak_bytes,  # the plan's, beside it
        "planned_allocated_bytes": r.spec.planned_allocated_bytes,  # the plan's allocator side (max_memory_allocated)
        "world_size": r.dist.world, "nnodes": r.dist.nnodes, "batching": r.mode,
        "profile_env_applied": all(envvars.get(k) == v for k, v in p.env.items()),
        "cpu_emulation": r.spec.cpu_emulation, "profile": p.name, "env_seen": {k: envvars.get(k) for k in p.env},
        "dtype": p.dtype, "attention": p.attention, "compile_backend": p.compile_backend,
        "versions": {"hwcompat": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": sys.version.split()[0]},
    }


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


TOTALS = ("tokens", "train_seconds", "wall_seconds", "peak_memory_bytes")


def totals(r: Recipe, finished: bool = False) -> dict[str, float]:
    """The whole run's counts: those before a resume (``r.prior``, kept in the checkpoint's history) plus this
    process's up to its last completed step (or now, when ``finished``), so a resumed run's speed, time and peak
    are the run's, not its last part's, and the memory curve does not drop at the resume."""
    p = r.prior
    tokens = r.tokens if finished else r.step_tokens
    seconds = r.train_seconds if finished else r.step_seconds
    return {"tokens": p.get("tokens", 0) + tokens * r.dist.world,
            "train_seconds": p.get("train_seconds", 0.0) + seconds,
            "wall_seconds": p.get("wall_seconds", 0.0) + (time.time() - r.t_start),
            "peak_memory_bytes": max(int(p.get("peak_memory_bytes", 0)), _memory_now(r))}


def _memory_now(r: Recipe) -> int:
    """The peak so far: the device allocator's on a GPU, the process's max RSS on the CPU."""
    backend = accelerator(r.device.type)
    return backend.max_memory_allocated() if backend else _rss_peak_bytes()


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _regression_text(regressed: list[dict[str, Any]], tolerance: float) -> str:
    rows = "\n".join(f"  {x['metric']:16} {x['before']:.3f} -> {x['after']:.3f}  (-{x['drop_points']:.1f} points)"
                     for x in regressed)
    return (f"\n!!! REGRESSION: {len(regressed)} task metric(s) fell by more than {tolerance:g} points during this "
            f"run (regression_tolerance):\n{rows}\nThe model is worse at its task than before this run; "
            "summary.json lists it under \"regressed\". For DPO, more diverse preference pairs usually help.")


def _summary_text(s: dict[str, Any], run_dir: Path) -> str:
    before, after = s["eval_before"], s["eval_after"]
    lines = [f"done: {s['steps']} steps in {s['train_seconds']:.1f}s, {s['tokens_per_s']:,.0f} tokens/s, "
             f"peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB"]
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
    out = s.get("output", "adapter")
    lines.append(f"{out}: {run_dir / out}")
    return "\n".join(lines)
