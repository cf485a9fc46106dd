"""A run's setup: device, data, model, objective, optimizer, schedule and, on --resume, the checkpoint.

``setup`` builds the ``Recipe`` that the step loop (loop.py), the records (records.py) and the outputs
(outputs.py) share; the hardware policy arrives resolved in the run spec and is never re-decided here.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwcompat import envvars
from hwcompat.errors import HwcompatError, InputError
from hwcompat.train import batching, checkpoint, diskspace, distributed, objectives, records
from hwcompat.train import trackers as trackers_mod
from hwcompat.train.distributed import Dist, log
from hwcompat.train.model import accelerator, load_model
from hwcompat.train.optim import make_optimizer
from hwcompat.train.rundir import record_written
from hwcompat.train.spec import RunSpec
from hwcompat.choices import Finetune, Schedule


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

    def weights(self) -> dict[str, Any]:
        """What a checkpoint keeps of the model, by parameter name: the fp32 masters, wherever they live."""
        if self.host is not None:
            return self.host.named_masters()
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def stepped(self) -> list:
        """The tensors the optimizer steps: the host masters (optimizer_offload: host), else the trainable
        parameters."""
        if self.host is not None:
            return self.host.masters
        return [p for p in self.model.parameters() if p.requires_grad]


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
    per_rank = len(batching.plan_batches(objective.lengths(), items_per_batch(objective, cfg), mode, cfg.seed)) // dist.world
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
                               fused_cpu=cfg.finetune == Finetune.full)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_schedule, int(cfg.warmup_ratio * total), total))
    scaler = torch.amp.GradScaler(device.type, enabled=profile.dtype == "float16")  # a no-op unless fp16
    r = Recipe(spec, run_dir, dist, device, objective, model, None, tokenizer, optimizer, scheduler, scaler, mode,
               per_rank, total)
    _restore(r, resume)  # before DDP: its construction broadcasts rank 0's weights to the group
    r.step = r.start_step
    if dist.writer:  # a nearly full disk is said now, before the first step (diskspace.py)
        r.reserve = diskspace.Reserve(run_dir, checkpoint.size_estimate(r.weights()))
    r.engine = _engine(model, objective, dist, device)
    if dist.writer and cfg.report_to:
        # recorded before the libraries write (some create their folder at the first log): the launcher refused
        # a user's folder at these names, so what appears there is theirs on our behalf
        record_written(run_dir, *trackers_mod.run_folders(cfg.report_to, run_dir, os.environ), planned=True)
        r.trackers = trackers_mod.Trackers.open(cfg.report_to, run_dir, _tracked_params(spec), r.start_step,
                                                lambda m: log(dist, m))
    return r


def items_per_batch(objective, cfg) -> int:
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
    if cfg.finetune != Finetune.full:
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
        if schedule == Schedule.constant:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == Schedule.linear:
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
        r.prior = {k: prior.get(k, 0) for k in records.TOTALS}
        r.history["totals"] = {**prior, "sessions": [*prior.get("sessions", []), r.start_step]}
    if r.dist.writer and r.metrics_path.exists():
        records.trim_metrics(r)
    if r.dist.writer:
        records.append_jsonl(r.metrics_path, {"step": r.start_step, "kind": "resume"})  # report.html marks it on the curves
    log(r.dist, f"resumed from {ck} at step {r.start_step}/{r.total_steps}")


def _load_checkpoint(r: Recipe) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that loads; a damaged one is named and the one before it used."""
    import pickle

    skipped = []
    for ck in checkpoint.candidates(r.run_dir):
        why = checkpoint.problem(ck)
        if why is None:
            try:
                state = checkpoint.load(ck, r.weights(), r.optimizer, r.scheduler, r.scaler)
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
