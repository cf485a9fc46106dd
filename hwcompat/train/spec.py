"""The run spec: everything the launcher decided, as the one typed record that crosses into the trainer.

The launcher writes it to ``run.json``; every worker process reads it back through ``load_spec``, which
checks it as strictly as the launcher checked the user's config (a renamed, missing or wrongly typed field
is a clear error naming the field, never a TypeError deep in the loop). The device kind is decided here,
once, in the launcher: the worker only binds its local rank to it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwcompat.choices import Vendor
from hwcompat.errors import InputError
from hwcompat.resolve import ResolvedDevice, ResolvedProfile
from hwcompat.schema import Problem, Shape, check, shape_of
from hwcompat.train.config import TrainConfig, config_from_dict

RESTART = "start the run again with hwcompat train CONFIG (add --overwrite to replace this folder)"


@dataclass(frozen=True)
class TrainDevice:
    """Where the worker trains: ``kind`` is torch's device type (ROCm builds are "cuda" too, Intel is "xpu")."""

    kind: str  # "cpu" | "cuda" | "xpu"
    vendor: str
    name: str
    emulated: bool = False

    @classmethod
    def choose(cls, device: ResolvedDevice, profile: ResolvedProfile, cpu_emulation: bool) -> "TrainDevice":
        gpu = profile.name != "cpu" and not cpu_emulation
        kind = ("xpu" if device.reading.vendor == Vendor.intel else "cuda") if gpu else "cpu"
        return cls(kind, device.reading.vendor, device.reading.name, device.reading.emulated)


@dataclass(frozen=True)
class RunSpec:
    config: TrainConfig
    profile: ResolvedProfile
    device: TrainDevice
    origins: dict[str, str] = field(default_factory=dict)  # config key -> where its value came from
    cpu_emulation: bool = False  # the profile's choices run on the CPU (plumbing, not the card)
    resumes: list[dict[str, Any]] = field(default_factory=list)  # settings changed at each resume
    hwcompat: str = ""  # the version that wrote it
    inputs: dict[str, Any] = field(default_factory=dict)  # what it trained on (fingerprint.run_inputs)
    planned_peak_bytes: int | None = None  # the launcher's plan for this device (None: the planner skipped)
    # what max_memory_allocated can be compared with: the plan without the runtime context and allocator slack
    planned_allocated_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def typed(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` for a flat dataclass, each field present and of its annotated type (schema.shape_of)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}; {RESTART}")
    _checked(data, shape_of(cls), where)
    return cls(**data)


def _checked(data: dict, shape: Shape, where: str, joint: str = ".") -> None:
    """``where`` names the record (``run.json: profile``); a problem's key path follows it after ``joint``."""
    try:
        check(data, shape)
    except Problem as p:
        raise InputError(f"{where}{joint + p.dotted() if p.path else ''}: {p.why}; {RESTART}") from None


def load_spec(path: Path) -> RunSpec:
    """run.json as the launcher wrote it; damaged or hand-edited into another shape is a clear error."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run's record ({str(exc)[:120]}); {RESTART}") from None
    missing = [k for k in ("config", "profile", "device")
               if not isinstance(raw, dict) or not isinstance(raw.get(k), dict)]
    if missing:
        raise InputError(f"{path}: {', '.join(missing)} missing or not a mapping; {RESTART}")
    rest = {k: v for k, v in raw.items() if k not in ("config", "profile", "device")}
    return RunSpec(config=config_from_dict(raw["config"], f"{path}: config"),
                   profile=typed(ResolvedProfile, raw["profile"], f"{path}: profile"),
                   device=typed(TrainDevice, raw["device"], f"{path}: device"),
                   **_rest(rest, path))


def _rest(rest: dict[str, Any], path: Path) -> dict[str, Any]:
    """The spec's plain fields (origins, cpu_emulation, resumes, hwcompat), each checked."""
    _checked(rest, shape_of(RunSpec, leave_out=("config", "profile", "device")), str(path), ": ")
    return rest
