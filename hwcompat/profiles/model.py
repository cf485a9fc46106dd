"""The typed profile: what a profile YAML holds once parse.py has checked it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from hwcompat import compat
from hwcompat.choices import Vendor
from hwcompat.readings import Capability


class Fp16Rate(str, enum.Enum):
    fast = "fast"  # full or double rate vs fp32 (tensor cores, P100)
    slow = "slow"  # runs, but far below fp32 (sm_52, sm_61: 1/64)
    none = "none"


class Evidence(str, enum.Enum):
    emulated = "emulated"  # decisions checked on emulated devices only
    # a bigger card of the same vendor ran this profile's code path (dtype, attention, compile, env) under the
    # family's usual memory: proves the path and the planner under the cap, not the old card's kernels
    path_verified = "path-verified"
    verified = "verified"  # a committed selftest result on the real card backs it


QUANT_KINDS = ("nf4", "int8", "optim8bit")  # optim8bit: bitsandbytes 8-bit optimizers


@dataclass(frozen=True)
class Choice:
    """A value hwcompat picks, with why and where that fact comes from."""

    value: str
    reason: str
    source: str = ""


@dataclass(frozen=True)
class EnvVar(Choice):
    """An environment variable a profile sets: its name, and the value with why and where that fact comes from."""

    name: str = field(kw_only=True)


@dataclass(frozen=True)
class Hardware:
    """What the silicon can do; resolver checks overrides against these."""

    bf16: bool
    fp16: Fp16Rate
    flash_attention_2: bool
    triton: bool
    source: str = ""
    # SDPA has a fused (flash / memory-efficient) kernel here; false: its math kernel, which materialises the
    # b x h x s^2 scores as eager attention does (the planner counts them)
    fused_sdpa: bool = True
    # the most bytes one allocation may take on this card (Alchemist: 4 GiB, intel/compute-runtime#627); 0: no limit
    max_allocation_gib: float = 0.0


@dataclass(frozen=True)
class Quant:
    """Whether a quantisation kind runs on this profile, with why and where that fact comes from."""

    supported: bool
    reason: str
    source: str = ""


@dataclass(frozen=True)
class TorchBuild:
    build: str  # wheel family: cu126, cu130, rocm6.4, cpu
    index_url: str  # pip --index-url for that family
    max_version: str | None  # newest torch with kernels for this family (None = no cap known)
    min_version: str | None
    reason: str
    source: str = ""
    extra: str | None = None  # a pip extra of the index's torch, e.g. "device-gfx1032" (AMD multi-arch wheels)

    def install_command(self) -> str:
        from hwcompat.compat import install_command

        return install_command(self.min_version, self.max_version, self.index_url, self.extra)


@dataclass(frozen=True)
class Image:
    tag: str
    base: str  # production base image (a build argument; CI substitutes a local one)
    family: str  # images/<family>/Dockerfile; families with an identical image share one
    source: str = ""
    packages: tuple[str, ...] = ()  # distribution packages the final image adds (Intel: Level Zero, GPU runtime)


@dataclass(frozen=True)
class Caveat:
    text: str
    source: str = ""


@dataclass(frozen=True)
class Match:
    vendor: str
    cc_min: tuple[int, int] | None = None
    cc_max: tuple[int, int] | None = None
    gfx_targets: tuple[str, ...] = ()
    xe_archs: tuple[str, ...] = ()  # Intel: Xe generations (readings.XE_ARCHS)
    tegra: bool = False  # NVIDIA: matches Jetson (Tegra) parts only; a desktop range never matches one
    cpu_flags_any: tuple[str, ...] = ()  # CPU: a CPU with any of these ISA flags (readings.TRAINING_FLAGS)

    def covers(self, vendor: str, cc: Capability | str | None, gfx: str | None, xe: str | None = None,
               flags: tuple[str, ...] = ()) -> bool:
        if vendor != self.vendor:
            return False
        if vendor == Vendor.cpu:
            return not self.cpu_flags_any or any(f in flags for f in self.cpu_flags_any)
        if vendor == Vendor.intel:
            return xe is not None and xe in self.xe_archs
        if vendor == Vendor.nvidia:
            if cc is None or self.cc_min is None or self.cc_max is None:
                return False
            return self.cc_min <= Capability.of(cc) <= self.cc_max and compat.is_tegra(cc) == self.tegra
        if vendor == Vendor.amd:
            return gfx is not None and gfx in self.gfx_targets
        return True

    def describe(self) -> str:
        if self.vendor == Vendor.nvidia and self.cc_min and self.cc_max:
            span = f"compute capability {self.cc_min[0]}.{self.cc_min[1]}–{self.cc_max[0]}.{self.cc_max[1]}"
            return span + (", Jetson (Tegra) parts" if self.tegra else "")
        if self.vendor == Vendor.amd:
            return "gfx targets " + ", ".join(self.gfx_targets)
        if self.vendor == Vendor.intel:
            return "Xe generation " + ", ".join(self.xe_archs)
        if self.cpu_flags_any:
            return "CPUs with " + " or ".join(self.cpu_flags_any)
        return self.vendor


@dataclass(frozen=True)
class Variant:
    """A narrower match inside a family whose facts differ (e.g. P100's fast fp16)."""

    match: Match
    note: str
    fields: dict[str, Any]  # already-parsed replacements for Profile fields


@dataclass(frozen=True)
class Profile:
    name: str
    vendor: str
    title: str
    match: Match
    hardware: Hardware
    dtype: Choice
    attention: Choice
    compile_backend: Choice
    env: tuple[EnvVar, ...]
    quantization: dict[str, Quant]
    torch: TorchBuild
    driver_min: Choice | None
    image: Image
    evidence: Evidence
    peak_tflops: dict[str, float]
    evidence_note: str = ""  # path-verified: which card, under which limit, when, and the result file
    peak_card: str = ""
    caveats: tuple[Caveat, ...] = ()
    supported: Choice = field(default_factory=lambda: Choice("true", "a profile covers this device"))
    variants: tuple[Variant, ...] = ()
    path: str = ""
    variant_note: str | None = None

    def for_device(self, vendor: str, cc: Capability | str | None, gfx: str | None, xe: str | None = None,
                   flags: tuple[str, ...] = ()) -> "Profile":
        """This profile with the first matching variant applied."""
        for v in self.variants:
            if v.match.covers(vendor, cc, gfx, xe, flags):
                merged = dict(v.fields)
                if "hardware" in merged:
                    merged["hardware"] = replace(self.hardware, **merged["hardware"])
                if "env" in merged:
                    names = {e.name for e in merged["env"]}
                    merged["env"] = tuple(e for e in self.env if e.name not in names) + merged["env"]
                if "quantization" in merged:
                    merged["quantization"] = {**self.quantization, **merged["quantization"]}
                if "caveats" in merged:
                    merged["caveats"] = self.caveats + merged["caveats"]
                return replace(self, variants=(), variant_note=v.note, **merged)._for_target(gfx)
        return replace(self, variants=())._for_target(gfx)

    def _for_target(self, gfx: str | None) -> "Profile":
        """Expand ``{gfx}`` in the torch extra (AMD's per-target packages: ``device-{gfx}``)."""
        if gfx and self.torch.extra and "{gfx}" in self.torch.extra:
            return replace(self, torch=replace(self.torch, extra=self.torch.extra.replace("{gfx}", gfx)))
        return self


# --- the schema -----------------------------------------------------------------
