"""What the resolver answers (decide.py): a device's profile with every decision and its reason, a device's verdict,
and the host's plan (every device, the groups that can train together). Typed values that cross into the launcher,
the run spec (run.json) and `detect --json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hwcompat.choices import Vendor
from hwcompat.errors import InputError
from hwcompat.readings import DeviceReading, HostReading


@dataclass(frozen=True)
class ResolvedProfile:
    name: str
    dtype: str
    attention: str
    compile_backend: str
    env: dict[str, str]
    quantization: list[str]  # supported kinds: "nf4", "int8"
    torch_build: str
    torch_index_url: str
    torch_install: str  # the pip command for this family (a PEP 508 requirement; tested to parse)
    torch_max_version: str | None
    torch_min_version: str | None
    driver_min_version: str | None
    image: str
    image_family: str
    evidence: str  # "emulated" | "path-verified" | "verified"
    variant: str | None  # the note of the variant that applied, if any
    caveats: list[str]
    reasons: dict[str, str]
    hardware: dict[str, Any]  # the hardware facts the choices were checked against
    peak_tflops: dict[str, float] = field(default_factory=dict)  # datasheet peaks of peak_card, by dtype
    peak_card: str = ""
    evidence_note: str = ""  # path-verified: the card, the memory limit, the date, the result file



@dataclass(frozen=True)
class ResolvedDevice:
    reading: DeviceReading
    arch: str | None  # profile family name; None when no profile covers the device
    supported: bool
    problems: list[str]
    profile: ResolvedProfile | None

    def to_dict(self) -> dict[str, Any]:
        r = self.reading
        d = {"index": r.index, "vendor": r.vendor, "name": r.name, "arch": self.arch,
             "compute_capability": r.compute_capability, "gfx_target": r.gfx_target,
             "gfx_target_effective": r.gfx_target_effective, "memory_bytes": r.memory_bytes,
             "supported": self.supported, "problems": list(self.problems),
             "profile": asdict(self.profile) if self.profile else None, "reading": r.to_dict()}
        return d



@dataclass(frozen=True)
class HostPlan:
    host: HostReading
    devices: list[ResolvedDevice]
    groups: list[dict[str, Any]]  # devices that can train together (same profile family)

    def select(self, spec: str | None) -> tuple[int, ResolvedDevice]:
        """``--device N`` (position in the detect table) or ``VENDOR:INDEX``; default: the first device."""
        if spec is None:
            return 0, self.devices[0]
        spec = spec.strip()
        if spec.isdigit():
            pos = int(spec)
            if pos < len(self.devices):
                return pos, self.devices[pos]
        elif ":" in spec:
            vendor, _, idx = spec.partition(":")
            for pos, d in enumerate(self.devices):
                if d.reading.vendor == vendor and str(d.reading.index) == idx:
                    return pos, d
        listing = ", ".join(f"{i} ({d.reading.vendor}:{d.reading.index} {d.reading.name})"
                            for i, d in enumerate(self.devices))
        raise InputError(f"--device {spec}: no such device; this host has: {listing}")

    @property
    def host_ram_bytes(self) -> int | None:
        """The host's RAM: the CPU reading's memory (what streamed weights are pinned in)."""
        cpus = [d for d in self.devices if d.reading.vendor == Vendor.cpu]
        return cpus[-1].reading.memory_bytes if cpus else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": {"problems": list(self.host.problems), "emulated": self.host.emulated,
                     **self.host.facts, "groups": self.groups},
            "devices": [d.to_dict() for d in self.devices],
        }
