"""What to change when a run does not fit, and the ``offload: auto`` / ``optimizer_offload: auto`` decisions: each
candidate is estimated again, the fits are offered smallest change first."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hwcompat.choices import Finetune, Method, Offload, Optimizer, OptimizerOffload, PlanMethod, Vendor
from hwcompat.errors import InputError
from hwcompat.plan.shape import GIB, ModelShape
from hwcompat.plan.inputs import Host, PlanInput
from hwcompat.plan.estimate import Plan, RUNTIME_CONTEXT, Suggestion, estimate


#: Shorter than this, a max_seq_len suggested beside other changes is no fine-tune worth suggesting.
MIN_SUGGESTED_SEQ = 256


@dataclass(frozen=True)
class MemoryChoice:
    """What ``offload: auto`` settled on: the offload, the checkpointing, that plan, and what changed and why."""

    offload: str  # none | layers
    gradient_checkpointing: bool
    plan: Plan
    changed: str = ""  # '' when the run is as configured
    optimizer_offload: str = "none"  # full fine-tuning: none | host


def decide_offload(shape: ModelShape, inp: PlanInput, setting: str, run, may_checkpoint: bool = True,
                   may_stream: bool = True, optimizer_offload: str = "none") -> MemoryChoice:
    """``offload: auto`` takes the cheapest change that fits, in ``--suggest``'s order: gradient checkpointing
    (recomputes activations on the card) before streaming (recomputes them too, and copies every layer over PCIe
    twice per micro-step; never on a unified-memory device, ``may_stream``). ``may_checkpoint`` is False when the user wrote ``gradient_checkpointing: false``: then
    neither is chosen (streaming implies checkpointing) and the run is refused with the suggestion instead.

    ``run(PlanInput) -> Plan`` estimates on the card. A full fine-tune's choice is ``optimizer_offload``'s
    (``decide_optimizer_offload``)."""
    if inp.method == PlanMethod.full:
        return decide_optimizer_offload(inp, optimizer_offload, run, may_checkpoint,
                                        may_stream and setting != "none")
    resident = run(replace(inp, offload="none"))
    if setting == "none" or (setting == "auto" and resident.fits):
        return MemoryChoice("none", inp.gradient_checkpointing, resident)
    if setting == "auto" and not inp.gradient_checkpointing and may_checkpoint:
        checkpointed = run(replace(inp, offload="none", gradient_checkpointing=True))
        if checkpointed.fits:
            return MemoryChoice("none", True, checkpointed, "gradient_checkpointing=true (offload: auto): the resident "
                                "run does not fit without it and does with it, which is cheaper than streaming")
    no_stream = inp.method != PlanMethod.lora or not may_stream
    if no_stream or (setting == "auto" and not inp.gradient_checkpointing and not may_checkpoint):
        return MemoryChoice("none", inp.gradient_checkpointing, resident)
    streamed = run(replace(inp, offload="layers"))
    if setting == Offload.layers or streamed.fits:
        why = ("" if setting == Offload.layers else "offload=layers (offload: auto): the resident run does not fit, "
               "even with gradient checkpointing, and the streamed one does")
        if why and not inp.gradient_checkpointing:
            why += "; each layer is recomputed in backward (gradient checkpointing implied)"
        return MemoryChoice("layers", inp.gradient_checkpointing, streamed, why)
    return MemoryChoice("none", inp.gradient_checkpointing, resident)


def decide_optimizer_offload(inp: PlanInput, setting: str, run, may_checkpoint: bool = True,
                             may_stream: bool = True) -> MemoryChoice:
    """``optimizer_offload: auto`` for a full fine-tune, cheapest first: resident; resident with gradient
    checkpointing; the optimizer in host RAM (a host -> device copy of every weight per step, the AdamW step on
    the CPU); the same with checkpointing. ``none`` / ``host`` are planned as written."""
    ckpt = inp.gradient_checkpointing
    if setting == OptimizerOffload.host:  # with offload=layers written beside it: streamed as written
        return MemoryChoice(inp.offload, ckpt, run(replace(inp, optimizer_offload="host")), optimizer_offload="host")
    resident = run(replace(inp, optimizer_offload="none", offload="none"))
    if setting == "none" or (setting == "auto" and resident.fits):
        return MemoryChoice("none", ckpt, resident)
    tries = [(ckpt, "none", "none")] + ([(True, "none", "none")] if not ckpt and may_checkpoint else [])
    tries += [(ckpt, "host", "none")] + ([(True, "host", "none")] if not ckpt and may_checkpoint else [])
    tries += [(True, "host", "layers")] if may_stream and (ckpt or may_checkpoint) else []
    for gc, where, layers in tries[1:]:
        p = run(replace(inp, gradient_checkpointing=gc, optimizer_offload=where, offload=layers))
        if p.fits:
            why = [] if gc == ckpt or layers == Offload.layers else ["gradient_checkpointing=true"]
            if where == OptimizerOffload.host:
                why.append(f"optimizer_offload=host (the fp32 masters and AdamW state in "
                           f"{p.host_optimizer.host_bytes / GIB:.1f} GiB of host RAM)")
            if layers == Offload.layers:
                why.append("offload=layers (the working copy streamed a layer at a time)")
            return MemoryChoice(layers, gc, p, " and ".join(why) + " (optimizer_offload: auto): the resident full "
                                "fine-tune does not fit" + ("" if where == "none" else ", the offloaded one does"),
                                optimizer_offload=where)
    hosted = run(replace(inp, gradient_checkpointing=ckpt or may_checkpoint, optimizer_offload="host"))
    if hosted.peak_bytes <= hosted.device_bytes and setting == "auto":  # the card would hold it; the host does not
        resident.notes.extend(n for n in hosted.notes if n.startswith("optimizer_offload=host"))
    return MemoryChoice("none", ckpt, resident)


#: PlanInput field -> the `hwcompat train` config key it is (suggestions speak the config's language).
CONFIG_KEYS = {"seq_len": "max_seq_len", "batch_size": "micro_batch_size", "gradient_checkpointing":
               "gradient_checkpointing", "optimizer": "optimizer", "lora_rank": "lora_r"}


def _fix(settings: dict[str, Any], p: Plan, note: str = "") -> Suggestion:
    """One suggestion: ``settings`` are config keys for `hwcompat train` (key=value); ``change`` shows them."""
    text = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())
    return Suggestion(text + (f" ({note})" if note else ""), settings, p.peak_bytes, p.fits)


def _candidates(inp: PlanInput, quant_ok: bool, optim8_ok: bool, can_stream: bool = False
                ) -> list[tuple[dict[str, Any], PlanInput, str]]:
    """Single memory-saving changes, least disruptive first: (config settings, planner input, note)."""
    out = []
    if not inp.gradient_checkpointing:
        out.append(({"gradient_checkpointing": True}, replace(inp, gradient_checkpointing=True), ""))
    group = max(1, inp.generations)  # grpo: a micro-batch holds whole groups of G completions
    if inp.batch_size > group:
        out.append(({"micro_batch_size": group, "gradient_accumulation": inp.batch_size // group},
                    replace(inp, batch_size=group), "same effective batch" + (", one prompt's G completions per "
                                                                             "micro-batch" if inp.generations else "")))
    if inp.generations and inp.completion_len > 64:
        half = inp.completion_len // 2
        out.append(({"max_completion_length": half, "max_seq_len": inp.seq_len - half},
                    replace(inp, completion_len=half, seq_len=inp.seq_len - half), "shorter completions"))
    lora_resident = inp.method == PlanMethod.lora and inp.offload == Offload.none
    if can_stream and lora_resident and not inp.generations:  # a slower step
        out.append(({"offload": "layers"}, replace(inp, offload="layers"),
                    "stream the frozen base from host RAM, one layer at a time"))
    if inp.method == PlanMethod.lora and quant_ok:
        out.append(({"qlora": True}, replace(inp, method="qlora"), ""))
    if inp.method == PlanMethod.full:
        out.append(({"qlora": False}, replace(inp, method="lora"), "LoRA instead of full fine-tuning: what "
                                                                     "hwcompat train trains"))
    if inp.optimizer == Optimizer.adamw and optim8_ok:
        out.append(({"optimizer": "adamw_8bit"}, replace(inp, optimizer="adamw_8bit"), ""))
    return out


def _with_shorter_sequences(combined, seq_len: int, run) -> list[Suggestion]:
    """Each change set (none included) that does not fit at ``seq_len``, with the longest max_seq_len that fits
    with it: on an 8 GB RX 6600 a 7B fits streamed at 1664 tokens, though no change fits at 2048."""
    out = []
    for settings, new in combined:
        if run(new).fits:
            continue
        seq = _round(_largest(lambda v: run(replace(new, seq_len=v)).fits, 64 + new.completion_len, seq_len))
        if seq and (seq >= MIN_SUGGESTED_SEQ or not settings):
            out.append(_fix({**settings, "max_seq_len": seq}, run(replace(new, seq_len=seq))))
    return out


def _minimal(out: list[Suggestion], seq_len: int) -> list[Suggestion]:
    """Drop a fitting suggestion when another fits with a subset of its changes and no shorter sequences (streaming
    already recomputes each layer, so checkpointing on top of it adds nothing); and a change that still does not fit
    once something does, unless it is a single change (the table of what each one saves)."""
    def parts(x):
        rest = {k: v for k, v in x.settings.items() if k != "max_seq_len"}
        return set(rest.items()), x.settings.get("max_seq_len", seq_len)

    fitting = [x for x in out if x.fits]
    keep = []
    for x in out:
        changes, seq = parts(x)
        if x.fits:
            if any(y is not x and parts(y)[0] <= changes and parts(y)[1] >= seq and
                   (parts(y)[0] < changes or parts(y)[1] > seq or id(y) < id(x)) for y in fitting):
                continue
        elif fitting and len(changes - {("gradient_accumulation", v) for _, v in changes}) > 1:
            continue
        keep.append(x)
    return keep


def _largest_settings(shape: ModelShape, inp: PlanInput, run) -> list[Suggestion]:
    """A plan that fits: the longest max_seq_len, the largest micro_batch_size (whole GRPO groups) and, for GRPO,
    the longest completions that still fit."""
    seq = _round(_largest(lambda v: run(replace(inp, seq_len=v)).fits, inp.seq_len, shape.max_positions),
                 inp.seq_len)
    group = max(1, inp.generations)
    batch = _largest(lambda v: run(replace(inp, batch_size=v * group)).fits, inp.batch_size // group, 1024)
    batch = batch * group if batch else batch
    per = f", {batch // group} prompt(s) x num_generations={group}" if inp.generations and batch else ""
    largest = [_fix({"max_seq_len": seq}, run(replace(inp, seq_len=seq)),
                    f"largest at micro_batch_size={inp.batch_size}"),
               _fix({"micro_batch_size": batch}, run(replace(inp, batch_size=batch)),
                    f"largest at max_seq_len={inp.seq_len}{per}")]
    if inp.generations and seq:  # the completion budget the longest sequence leaves, prompts unchanged
        longest = inp.completion_len + seq - inp.seq_len
        largest.append(_fix({"max_completion_length": longest, "max_seq_len": seq},
                            run(replace(inp, seq_len=seq, completion_len=longest)),
                            f"largest completions at micro_batch_size={inp.batch_size}"))
    return largest


def suggest(shape: ModelShape, plan: Plan, vendor: str, quant_ok: bool, optim8_ok: bool = False,
            host: Host | None = None) -> list[Suggestion]:
    """If it does not fit: the cheapest changes that make it fit. If it fits: the largest seq / batch.

    Every suggestion carries ``settings``: keys and values `hwcompat train` accepts, nothing else."""
    import itertools

    inp = plan.inputs

    def run(new: PlanInput) -> Plan:
        return estimate(shape, new, plan.dtype, plan.attention, vendor, plan.device_bytes, quant_ok, host,
                        plan.max_allocation)

    out: list[Suggestion] = []
    if plan.fits:
        return _largest_settings(shape, inp, run)
    candidates = _candidates(inp, quant_ok, optim8_ok, can_stream=vendor != Vendor.cpu)
    out += [_fix(settings, run(new), note) for settings, new, note in candidates]
    combined: list[tuple[dict[str, Any], PlanInput]] = [({}, inp)] + [(s_, new) for s_, new, _ in candidates]
    for k in range(2, len(candidates) + 1):  # combinations of 2, 3 … changes
        for combo in itertools.combinations(candidates, k):
            settings, new = {}, inp
            for s_, cand, _ in combo:
                settings.update(s_)
                new = replace(new, **{f: getattr(cand, f) for f in PlanInput.__dataclass_fields__
                                      if getattr(cand, f) != getattr(inp, f)})
            try:
                out.append(_fix(settings, run(new)))
            except InputError:  # a combination that cannot run together (offload=layers with qlora)
                continue
            combined.append((settings, new))
    out = _minimal(out + _with_shorter_sequences(combined, inp.seq_len, run), inp.seq_len)
    # cheapest first: single changes before combinations, in the order tried (least disruptive first)
    order = {id(x): i for i, x in enumerate(out)}
    out.sort(key=lambda x: (not x.fits, len(x.settings) - ("gradient_accumulation" in x.settings), order[id(x)]))
    for s_ in out:  # a streamed suggestion that fails on host RAM says so
        if "offload" in s_.settings and not s_.fits:
            streamed = run(replace(inp, offload="layers"))
            if streamed.stream and not streamed.stream.host_fits and streamed.peak_bytes <= plan.device_bytes:
                s_.change += (f" (fits the card, but needs {streamed.stream.host_bytes / GIB:.1f} GiB host RAM of "
                                 f"{streamed.stream.host_ram_bytes / GIB:.1f}: host RAM is the limit)")
    fixed = plan.breakdown["base_weights"] + plan.breakdown.get("quant_constants", 0) + RUNTIME_CONTEXT.get(vendor, 0)
    if not any(s.fits for s in out) and fixed > plan.device_bytes:
        out.append(Suggestion("a smaller model or a card with more memory: the base weights alone need "
                              f"{fixed / GIB:.1f} GiB here" + ("" if quant_ok else " and this card cannot run QLoRA"),
                              {}, fixed, False))
    return out


def plan_input(cfg, method: str | None = None, logit_fraction: float = 1.0) -> PlanInput:
    """The planner's input from a `hwcompat train` config (TrainConfig): one function, so the two agree."""
    full = cfg.finetune == Finetune.full
    return PlanInput(method=method or ("full" if full else "qlora" if cfg.qlora else "lora"), seq_len=cfg.max_seq_len,
                     batch_size=cfg.micro_batch_size, gradient_accumulation=cfg.gradient_accumulation,
                     lora_rank=cfg.lora_r, lora_targets=list(cfg.lora_target_modules),
                     gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer,
                     lora_dropout=cfg.lora_dropout > 0, logit_fraction=logit_fraction,
                     sequences_per_row=2 if cfg.method == Method.dpo else 1,
                     generations=cfg.num_generations if cfg.method == Method.grpo else 0,
                     completion_len=cfg.max_completion_length if cfg.method == Method.grpo else 0,
                     offload="layers" if cfg.offload == Offload.layers else "none", prefetch=cfg.offload_prefetch,
                     optimizer_offload="host" if full and cfg.optimizer_offload == OptimizerOffload.host else "none")


def _largest(ok, lo: int, hi: int) -> int | None:
    """Largest v in [lo, hi] with ok(v) (ok is monotone decreasing), or None."""
    if not ok(lo):
        return None
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _round(v: int | None, floor: int = 64) -> int | None:
    """Round a length down to a multiple of 64 (kernels and users like round numbers)."""
    if v is None:
        return None
    return max(floor, v - v % 64) if v >= 64 else v
