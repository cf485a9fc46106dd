"""summary.json, typed: what a finished run says of itself, in one schema for its writer and its readers.

The recipe writes it (train/loop.py); the export chain, merge's regression flags, selftest, `hwcompat report`,
`hwcompat eval` (which adds the forgetting figures) and --resume read it. Before this schema each read its own
keys from a dict, and a key renamed in the writer broke a reader silently. A summary from an older hwcompat reads
with defaults for what it lacks; keys this version does not know (a newer one's) are kept and written back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwcompat.errors import InputError

NAME = "summary.json"


@dataclass(frozen=True)
class Regression:
    """A task metric the regression guard flagged: it fell by more than ``regression_tolerance`` points."""

    metric: str
    before: float
    after: float
    drop_points: float

    def text(self) -> str:
        return f"{self.metric} {self.before} -> {self.after}"


@dataclass(frozen=True)
class Summary:
    steps: int = 0
    total_steps: int = 0
    objective: str = "sft"
    finetune: str = "lora"
    output: str = "adapter"  # the trained weights' folder: adapter/ (LoRA) or model/ (full fine-tune)
    optimizer_offload: str = "none"
    train_rows: int = 0
    eval_rows: int = 0
    final_train_loss: float = math.nan
    eval_before: dict[str, Any] = field(default_factory=dict)  # the eval record at step 0 ({} without one)
    eval_after: dict[str, Any] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    resumes: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "memory"  # torch.<device>.max_memory_allocated, or process max RSS
    cpu_allocator: str | None = None  # what a CPU process really ran on
    first_step_peak_bytes: int | None = None  # GPU: the costliest micro-batch's peak (the memory probe)
    planned_peak_bytes: int | None = None
    planned_allocated_bytes: int | None = None
    world_size: int = 1
    nnodes: int = 1
    batching: str = ""
    profile_env_applied: bool = True
    cpu_emulation: bool = False
    profile: str = ""
    env_seen: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    attention: str = ""
    compile_backend: str = ""
    versions: dict[str, Any] = field(default_factory=dict)
    regressed: tuple[Regression, ...] = ()
    forgetting: dict[str, Any] | None = None  # `hwcompat eval --general`'s figures, once measured
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["regressed"] = [dataclasses.asdict(x) for x in self.regressed]
        if self.forgetting is None:
            del out["forgetting"]
        return {**self.extra, **out}

    def flags(self) -> list[str]:
        """The guard's flags as merge and export print them."""
        return [x.text() for x in self.regressed]


#: What each field's JSON value may be (an int is a float too).
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}


def _kinds(annotation: str) -> tuple[type, ...]:
    return _KINDS.get(annotation.partition(" | ")[0].split("[")[0], (object,))


def parse(data: dict[str, Any]) -> Summary:
    """A Summary from summary.json's object; a field of the wrong kind is a ValueError saying which. A null field
    reads as not recorded (its default), as does a field an older hwcompat did not write."""
    known = {f.name: f for f in dataclasses.fields(Summary) if f.name != "extra"}
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known or value is None:
            continue
        if name == "regressed":
            values[name] = _regressions(value)
            continue
        kinds = _kinds(str(known[name].type))
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise ValueError(f"field {name!r} is {value!r}, expected {known[name].type}")
        values[name] = value
    return Summary(**values, extra={k: v for k, v in data.items() if k not in known})


def from_json(data: dict[str, Any], where: str = NAME) -> Summary:
    """``parse``, with a wrong field an InputError naming the file."""
    try:
        return parse(data)
    except ValueError as exc:
        raise InputError(f"{where}: {exc} (the file was edited or damaged)") from None


def _regressions(value: Any) -> tuple[Regression, ...]:
    if not isinstance(value, list):
        raise ValueError(f"field 'regressed' is {value!r}, expected a list of flagged metrics")
    out = []
    for x in value:
        try:
            before, after = float(x["before"]), float(x["after"])
            drop = float(x.get("drop_points", round((before - after) * 100, 2)))  # written since #40
            out.append(Regression(str(x["metric"]), before, after, drop))
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ValueError(f"a 'regressed' entry is {x!r}, expected metric, before and after") from None
    return tuple(out)


def read(run_dir: str | Path) -> Summary | None:
    """The run's summary (None when the run has none: not finished); a damaged one is an InputError naming it."""
    from hwcompat.userfile import read_json_object

    path = Path(run_dir) / NAME
    if not path.exists():
        return None
    return from_json(read_json_object(path, "summary"), str(path))


def write(run_dir: str | Path, summary: Summary) -> None:
    """summary.json, replaced atomically."""
    from hwcompat.fsutil import atomic_write_json

    atomic_write_json(Path(run_dir) / NAME, summary.to_json())
