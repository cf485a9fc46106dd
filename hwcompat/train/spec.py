"""The run spec: everything the launcher decided, as the one typed record that crosses into the trainer.

The launcher writes it to ``run.json``; every worker process reads it back through ``load_spec``, which
checks it as strictly as the launcher checked the user's config (a renamed, missing or wrongly typed field
is a clear error naming the field, never a TypeError deep in the loop). The device kind is decided here,
once, in the launcher: the worker only binds its local rank to it.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from hwcompat.choices import Vendor
from hwcompat.errors import InputError, excerpt
from hwcompat.resolve import ResolvedDevice, ResolvedProfile
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


def _check(value: Any, kind: Any, where: str) -> None:
    if not _fits(value, kind):
        raise InputError(f"{where}: expected {_name(kind)}, got {excerpt(value)}; {RESTART}")


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) if get_origin(kind) is None else str(kind).replace("typing.", "")


def _fits(value: Any, kind: Any) -> bool:
    """``value`` has the shape of the annotation ``kind`` (str, int, bool, float, None, list[...], dict[...], X | Y)."""
    origin, args = get_origin(kind), get_args(kind)
    if kind is Any:
        return True
    if origin in (Union, UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _fits(v, args[1]) for k, v in value.items())
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def typed(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` for a flat dataclass, each field present and of its annotated type."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}; {RESTART}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}; {RESTART}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise InputError(f"{where}: field {missing[0]!r} is missing; {RESTART}")
    for key, value in data.items():
        _check(value, hints[key], f"{where}.{key}")
    return cls(**data)


def load_spec(path: Path) -> RunSpec:
    """run.json as the launcher wrote it; damaged or hand-edited into another shape is a clear error."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run's record ({str(exc)[:120]}); {RESTART}") from None
    missing = [k for k in ("config", "profile", "device") if not isinstance(raw, dict) or not isinstance(raw.get(k), dict)]
    if missing:
        raise InputError(f"{path}: {', '.join(missing)} missing or not a mapping; {RESTART}")
    rest = {k: v for k, v in raw.items() if k not in ("config", "profile", "device")}
    return RunSpec(config=config_from_dict(raw["config"], f"{path}: config"),
                   profile=typed(ResolvedProfile, raw["profile"], f"{path}: profile"),
                   device=typed(TrainDevice, raw["device"], f"{path}: device"),
                   **_rest(rest, path))


def _rest(rest: dict[str, Any], path: Path) -> dict[str, Any]:
    """The spec's plain fields (origins, cpu_emulation, resumes, hwcompat), each checked."""
    hints = get_type_hints(RunSpec)
    out = {}
    for key, value in rest.items():
        if key not in hints or key in ("config", "profile", "device"):
            raise InputError(f"{path}: unknown field {key!r}; {RESTART}")
        _check(value, hints[key], f"{path}: {key}")
        out[key] = value
    return out
