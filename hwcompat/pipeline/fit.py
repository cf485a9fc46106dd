"""Will the run fit: the planner's verdict on this config, card and host, before any model load.

``plan_run`` is a question: it reads the config and returns a typed ``PlanVerdict`` (the note for the log, the
refusal when it will not fit, and each setting the plan decides: ``offload: auto``, ``optimizer_offload: auto``,
gradient checkpointing the user did not write, cpu_bf16's attention where its S^2 term does not fit).
``apply_plan`` is the one place those decisions enter the config, each with its origin, so --print-config and
the run's spec say why. `hwcompat plan` shares ``memory_choice`` and ``device_memory``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from hwcompat.choices import Attention, Finetune, Offload, OptimizerOffload, Vendor
from hwcompat.errors import HwcompatError, InputError
from hwcompat.resolve import HostPlan, ResolvedDevice, ResolvedProfile
from hwcompat.train.config import ORIGIN_DEFAULT, LoadedConfig


@dataclass(frozen=True)
class PlanVerdict:
    """What the plan says of one run: a line for the log, the refusal (None when it fits or force is set), the
    settings it decides (key -> (value, origin)) and its peak (None: the planner does not know the model)."""

    note: str
    refusal: str | None = None
    decided: dict[str, tuple[Any, str]] = field(default_factory=dict)
    peak_bytes: int | None = None
    allocated_bytes: int | None = None


def device_memory(cfg, device: ResolvedDevice) -> int:
    """The memory this run may use on its card: the whole card, or ``memory_limit_gib`` of it (GPU only)."""
    card = device.reading.memory_bytes
    if not cfg.memory_limit_gib or device.reading.vendor == Vendor.cpu:
        return card
    limit = int(cfg.memory_limit_gib * 2**30)
    if card and limit > card:
        raise InputError(f"memory_limit_gib={cfg.memory_limit_gib:g}: {device.reading.name} has only "
                         f"{card / 2**30:.1f} GiB; give a smaller limit, or 0 for the whole card")
    return limit


def check_memory_limit(cfg, device: ResolvedDevice, cpu_emulation: bool) -> None:
    """A limit is enforced by the GPU's allocator; on the CPU nothing would hold the run to it, so say so."""
    if cfg.memory_limit_gib and (device.reading.vendor == Vendor.cpu or cpu_emulation):
        raise InputError(f"memory_limit_gib={cfg.memory_limit_gib:g} caps a GPU's memory, but this run trains on "
                         "the CPU, where nothing enforces it; set memory_limit_gib=0")
    device_memory(cfg, device)


def memory_choice(loaded: LoadedConfig, shape, inp, run, vendor: str, unified: bool = False):
    """`offload: auto` as train and plan both decide it; a ``gradient_checkpointing`` the user wrote is kept."""
    from hwcompat import plan as planner

    cfg = loaded.config
    if vendor == Vendor.cpu and cfg.offload != Offload.layers:  # the host's RAM is the device's: nothing to stream to
        # written: plumbing a CPU test can run
        hosted = "host" if cfg.optimizer_offload == OptimizerOffload.host else "none"
        return planner.MemoryChoice("none", cfg.gradient_checkpointing, run(replace(inp, optimizer_offload=hosted)),
                                    optimizer_offload=hosted)
    if unified and cfg.offload == Offload.layers:
        raise InputError("offload=layers: this device's memory is the host's RAM (unified memory), so streaming "
                         "layers from one to the other saves nothing; set offload=none (or auto)")
    written = loaded.origins.get("gradient_checkpointing", ORIGIN_DEFAULT) != ORIGIN_DEFAULT
    return planner.decide_offload(shape, inp, cfg.offload, run, may_checkpoint=not written, may_stream=not unified,
                                  optimizer_offload=cfg.optimizer_offload)


def _without_kept_scores(loaded: LoadedConfig, profile: ResolvedProfile, choice, with_sdpa):
    """attention=cpu_bf16 keeps each layer's S^2 probabilities: where the run does not fit with them but does with
    SDPA's flash kernel, it trains with sdpa, and the attention's origin says why. An attention the user chose is
    kept. Returns (the choice, the attention decided or None)."""
    if choice.plan.fits or profile.attention != Attention.cpu_bf16 or loaded.config.attention is not None:
        return choice, None
    flash = with_sdpa()
    if not flash.plan.fits:
        return choice, None
    return flash, ("sdpa", "plan (cpu_bf16's kept S^2 probabilities do not fit; with sdpa the peak is "
                           f"{flash.plan.peak_bytes / 2**30:.1f} GiB)")


def plan_run(loaded: LoadedConfig, device: ResolvedDevice, profile: ResolvedProfile,
             logit_fraction: float = 1.0, host_ram: int | None = None) -> PlanVerdict:
    """The planner's verdict on this run; reads the config, changes nothing."""
    from hwcompat import plan as planner

    cfg = loaded.config
    try:
        shape = planner.load_shape(cfg.model)
    except InputError as exc:
        kept = Offload.layers if cfg.offload == Offload.layers else Offload.none
        return PlanVerdict(f"plan: skipped ({exc})", decided=_offload(kept.value, cfg))
    quant_ok = "nf4" in profile.quantization
    vendor = device.reading.vendor
    host = planner.host_for(device, host_ram, profile.dtype)
    memory = device_memory(cfg, device)

    def run(inp, attention=profile.attention):
        return planner.estimate(shape, inp, profile.dtype, planner.planned_attention(attention, profile.hardware),
                                vendor, memory, quant_ok, host, planner.max_allocation(profile.hardware))

    inp = planner.plan_input(cfg, logit_fraction=logit_fraction)
    choice, attention = _without_kept_scores(
        loaded, profile, memory_choice(loaded, shape, inp, run, vendor, device.reading.unified_memory),
        lambda: memory_choice(loaded, shape, inp, partial(run, attention="sdpa"), vendor))
    result = choice.plan
    decided = {**_offload(choice.offload, cfg), **({"attention": attention} if attention else {})}
    if choice.gradient_checkpointing != cfg.gradient_checkpointing:
        decided["gradient_checkpointing"] = (choice.gradient_checkpointing, "plan (offload: auto)")
    if cfg.finetune == Finetune.full and choice.optimizer_offload != cfg.optimizer_offload:
        # the run's spec carries the decision, never "auto"
        decided["optimizer_offload"] = (choice.optimizer_offload, "plan (optimizer_offload: auto)")
    note = _note(cfg, choice)
    refusal = None
    if not (result.fits or cfg.force):
        fits = [s for s in planner.suggest(shape, result, vendor, quant_ok, "optim8bit" in profile.quantization,
                                           host) if s.fits]
        hint = "; ".join(s.change for s in fits[:3]) or "a smaller model"
        limit = _host_limit(inp, result, run) if vendor != Vendor.cpu and not cfg.qlora else ""
        refusal = (f"this run will not fit on {device.reading.name}: {note}. {limit + ' ' if limit else ''}"
                   f"Change: {hint} (`hwcompat plan --suggest` shows the breakdown; --force tries anyway)")
    elif not result.fits:
        note += "; does not fit, trying anyway (force)"
    return PlanVerdict(note, refusal, decided, result.peak_bytes,
                       result.peak_bytes - result.breakdown["runtime_overhead"])


def _offload(offload: str, cfg) -> dict[str, tuple[Any, str]]:
    """``offload: auto`` becomes none or layers, so the run's spec carries the decision."""
    return {} if offload == cfg.offload else {"offload": (offload, "plan (offload: auto)")}


def _note(cfg, choice) -> str:
    from hwcompat.plan import GIB

    result = choice.plan
    note = (f"plan: peak {result.peak_bytes / GIB:.2f} GiB of {result.device_bytes / GIB:.1f} GiB "
            f"(worst case: every micro-batch {cfg.max_seq_len} tokens long)")
    if choice.changed:
        note += f"; changed: {choice.changed}"
    if result.host_optimizer is not None:
        ho = result.host_optimizer
        note += (f"; optimizer_offload=host: {ho.host_bytes / GIB:.1f} GiB host RAM, "
                 f"{ho.bytes_per_step / GIB:.1f} GiB copied per step over {ho.link}")
    if choice.offload == Offload.layers and result.stream is not None:
        st = result.stream
        note += (f"; offload=layers: {st.host_bytes / GIB:.1f} GiB pinned host RAM, "
                 f"{st.bytes_per_micro_step / GIB:.1f} GiB copied per micro-step over {st.link}")
    return note


def _host_limit(inp, result, run) -> str:
    """When streaming would fit the card but not the host's RAM, the error says so (the fix is RAM, not the card)."""
    streamed = result if result.stream is not None else run(replace(inp, offload="layers"))
    st = streamed.stream
    if st is not None and not st.host_fits and streamed.peak_bytes <= streamed.device_bytes:
        return streamed.notes[-1] + "."
    return ""


def apply_plan(loaded: LoadedConfig, device: ResolvedDevice, profile: ResolvedProfile, plan: HostPlan,
               logit_fraction: float, strict: bool = False) -> str:
    """The plan's decisions enter the config, each with its origin; returns the note for the log. A run that will
    not fit is refused (``strict``) or its refusal returned as the note (--print-config shows it)."""
    try:
        verdict = plan_run(loaded, device, profile, logit_fraction, plan.host_ram_bytes)
    except HwcompatError as exc:  # a setting the plan cannot take (memory_limit_gib above the card's)
        if strict:
            raise
        return str(exc)
    if verdict.refusal is not None:
        if strict:
            raise HwcompatError(verdict.refusal)
        return verdict.refusal
    for key, (value, origin) in verdict.decided.items():
        setattr(loaded.config, key, value)
        loaded.origins[key] = origin
    loaded.planned_peak_bytes, loaded.planned_allocated_bytes = verdict.peak_bytes, verdict.allocated_bytes
    return verdict.note


def planned_profile(loaded: LoadedConfig, profile: ResolvedProfile) -> ResolvedProfile:
    """The profile with the plan's attention where the plan changed it (cpu_bf16's S^2 term did not fit)."""
    cfg = loaded.config
    if cfg.attention is None or cfg.attention == profile.attention:
        return profile
    return replace(profile, attention=cfg.attention,
                   reasons={**profile.reasons, "attention": loaded.origins.get("attention", "set")})
