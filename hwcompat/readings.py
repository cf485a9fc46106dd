"""Device readings: plain facts as a probe saw them, with no decisions.

Every probe (NVML, amdsmi, sysfs, cpuinfo, emulation) returns these, so the
resolver cannot tell a real M40 from an emulated one except by ``emulated``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from hwcompat.choices import Vendor

VENDORS = tuple(v.value for v in Vendor)
#: Intel Xe generations hwcompat knows (catalog/intel.yaml), the typed fact an Intel reading carries.
XE_ARCHS = ("xe-hpg", "xe2-hpg")


class Capability(NamedTuple):
    """An NVIDIA compute capability, typed once at the reading (vLLM's ``DeviceCapability``): compared as a tuple,
    printed as the driver prints it ("5.2"), labelled as the compiler does (``sm_52``)."""

    major: int
    minor: int

    @classmethod
    def of(cls, value: "Capability | str") -> "Capability":
        """A Capability from itself or from its text ("5.2"); raises ValueError on anything else."""
        return value if isinstance(value, Capability) else cls(*parse_cc(value))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def sm(self) -> str:
        return f"sm_{self.major}{self.minor}"


#: CPU ISA flags worth reporting for training, as /proc/cpuinfo names them (bf16/AMX speed up matmuls in torch's
#: oneDNN path; profiles/cpu.yaml's variants match on them).
TRAINING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                  "amx_fp16", "asimd", "sve", "bf16")

@dataclass(frozen=True)
class VendorFacts:
    """What a vendor's cards need from hwcompat, in one row: the variable that pins a process to some of them
    (CUDA and ROCm take device indices, Level Zero a comma list of them too) and torch's device type (ROCm
    builds reuse "cuda")."""

    visibility: str | None
    torch_device: str

    def pin(self, indices: list[int]) -> dict[str, str]:
        """The variables that pin a process to these devices (empty for the CPU). Level Zero's mask counts every
        Intel GPU, the iGPU too, in the order ZE_ENABLE_PCI_ID_DEVICE_ORDER=1 makes PCI order, as detect counts."""
        if self.visibility is None:
            return {}
        out = {self.visibility: ",".join(str(i) for i in indices)}
        if self.visibility == "ZE_AFFINITY_MASK":
            out["ZE_ENABLE_PCI_ID_DEVICE_ORDER"] = "1"
        return out


VENDOR_FACTS = {"nvidia": VendorFacts("CUDA_VISIBLE_DEVICES", "cuda"), "amd": VendorFacts("HIP_VISIBLE_DEVICES", "cuda"),
                "intel": VendorFacts("ZE_AFFINITY_MASK", "xpu"), "cpu": VendorFacts(None, "cpu")}


@dataclass(frozen=True)
class DeviceReading:
    """One device as a probe reported it."""

    vendor: str  # "nvidia" | "amd" | "intel" | "cpu"
    index: int  # the vendor's own index (NVML / amdsmi / kfd order); 0 for the CPU
    name: str  # marketing name as the driver reports it, e.g. "Tesla M40 24GB"
    memory_bytes: int  # total device memory; system RAM for the CPU
    compute_capability: str | None = None  # NVIDIA only, "major.minor", e.g. "5.2"
    gfx_target: str | None = None  # AMD only: the physical target, e.g. "gfx1032"
    gfx_target_effective: str | None = None  # AMD: target the runtime uses (HSA_OVERRIDE_GFX_VERSION), else None
    xe_arch: str | None = None  # Intel only: the Xe generation, "xe-hpg" (Alchemist) | "xe2-hpg" (Battlemage)
    pci_device_id: str | None = None  # Intel: the PCI device ID ("e20b"), what the generation was read from
    pci_bus_id: str | None = None  # "0000:01:00.0" (lower case); None for the CPU or when unknown
    uuid: str | None = None  # "GPU-…" (NVIDIA) or the amdsmi UUID
    driver_version: str | None = None  # kernel driver, e.g. "550.54.14"
    runtime_version: str | None = None  # highest CUDA the driver supports ("12.4") / ROCm version
    power_limit_watts: float | None = None  # enforced board power limit
    pcie_generation: int | None = None  # current PCIe link generation
    pcie_width: int | None = None  # current PCIe link width (lanes)
    cpu_cores: int | None = None  # CPU only: logical cores this process may use
    cpu_flags: tuple[str, ...] = ()  # CPU only: ISA flags that matter for training (avx2, avx512_bf16, amx_bf16 …)
    unified_memory: bool = False  # the GPU's memory is the host's RAM (GB10, Jetson, Strix Halo, APUs): one pool
    source: str = ""  # which probe produced it: nvml | amdsmi | sysfs | cpuinfo | catalog:NAME | file:PATH
    emulated: bool = False  # True when it came from --emulate / --emulate-file, not from hardware

    def __post_init__(self) -> None:
        """The capability is parsed here, once; a malformed one is an error at the probe, not four places later."""
        cap = Capability.of(self.compute_capability) if self.compute_capability else None
        object.__setattr__(self, "_capability", cap)

    @property
    def capability(self) -> Capability | None:
        """NVIDIA only: the typed compute capability."""
        return self._capability

    @property
    def is_gpu(self) -> bool:
        return self.vendor != Vendor.cpu

    @property
    def facts(self) -> VendorFacts:
        return VENDOR_FACTS[self.vendor]

    @property
    def arch(self) -> str:
        """The architecture as its toolchain names it: ``sm_52``, ``gfx1032``, ``xe-hpg``, or the vendor."""
        if self.capability:
            return self.capability.sm
        return self.gfx_target or self.xe_arch or self.vendor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_flags"] = list(self.cpu_flags)
        return d


@dataclass(frozen=True)
class HostReading:
    """Everything the probes saw on one host, plus what went wrong while looking."""

    devices: tuple[DeviceReading, ...]  # GPUs first (NVIDIA, then AMD, then Intel), the CPU last
    problems: tuple[str, ...] = ()  # probe failures worth telling the user; never swallowed
    emulated: bool = False  # any device came from emulation
    facts: dict[str, str] = field(default_factory=dict)  # os, kernel, python, hostname


_CC = re.compile(r"^(\d+)\.(\d+)$")
_GFX = re.compile(r"^gfx([0-9a-f]{3,4})$")


def parse_cc(text: str) -> tuple[int, int]:
    """"5.2" -> (5, 2); raises ValueError on anything else."""
    m = _CC.match(str(text).strip())
    if not m:
        raise ValueError(f"compute capability must look like '6.1', got {text!r}")
    return int(m.group(1)), int(m.group(2))


def is_gfx_target(text: str) -> bool:
    return bool(_GFX.match(str(text).strip().lower()))


def gfx_from_kfd_version(value: int) -> str:
    """KFD ``gfx_target_version`` (e.g. 100302, 90010) -> "gfx1032", "gfx90a".

    The KFD packs major*10000 + minor*100 + stepping; the gfx name writes the
    stepping as one hex digit (gfx90a = 9.0.10).
    """
    major, rest = divmod(int(value), 10000)
    minor, step = divmod(rest, 100)
    return f"gfx{major}{minor:x}{step:x}"


def gfx_from_override(value: str) -> str:
    """HSA_OVERRIDE_GFX_VERSION "10.3.0" -> "gfx1030"; "9.0.10" -> "gfx90a"."""
    parts = value.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"HSA_OVERRIDE_GFX_VERSION must look like '10.3.0', got {value!r}")
    major, minor, step = (int(p) for p in parts)
    return f"gfx{major}{minor:x}{step:x}"


def override_from_gfx(target: str) -> str:
    """"gfx1030" -> "10.3.0"; the inverse of :func:`gfx_from_override`."""
    m = _GFX.match(target)
    if not m:
        raise ValueError(f"not a gfx target: {target!r}")
    digits = m.group(1)
    major, minor, step = digits[:-2], digits[-2], digits[-1]
    return f"{int(major)}.{int(minor, 16)}.{int(step, 16)}"
