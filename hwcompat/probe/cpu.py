"""CPU probe: the fallback device every host has."""

from __future__ import annotations

import os
from pathlib import Path

from hwcompat.readings import TRAINING_FLAGS, DeviceReading


def probe(sys_root: str | Path = "/") -> tuple[DeviceReading, list[str]]:
    root = Path(sys_root)
    problems: list[str] = []
    name, flags = None, set()
    try:
        for line in (root / "proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "cpu model") and name is None:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError as exc:
        problems.append(f"cannot read /proc/cpuinfo ({exc}); CPU name and flags unknown")
    memory = 0
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError as exc:
        problems.append(f"cannot read /proc/meminfo ({exc}); RAM size unknown")
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return DeviceReading(
        vendor="cpu", index=0, name=name or os.uname().machine,
        memory_bytes=memory, cpu_cores=cores,
        cpu_flags=tuple(f for f in TRAINING_FLAGS if f in flags), source="cpuinfo",
    ), problems
