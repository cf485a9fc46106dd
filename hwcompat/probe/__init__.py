"""Probes: ask the hardware (or the emulation catalog) what is there.

Each probe returns ``(readings, problems)`` and decides nothing. Real GPU
probes are skipped when devices are emulated, so a CI box without GPUs sees
exactly the host it was told to pretend to be.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

from hwcompat import envvars
from hwcompat.choices import Vendor
from hwcompat.readings import DeviceReading, HostReading


def probe_host(
    emulate: list[str] | None = None,
    emulate_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    sys_root: str | Path = "/",
) -> HostReading:
    """Probe this host, or build an emulated one.

    ``emulate`` / ``emulate_file`` win over ``HWCOMPAT_EMULATE`` /
    ``HWCOMPAT_EMULATE_FILE``. The CPU is always the last device.
    """
    from hwcompat.probe import cpu

    env = os.environ if environ is None else environ
    flag = "--emulate"
    if emulate is None and emulate_file is None:
        flag = "HWCOMPAT_EMULATE"
        names = envvars.get("HWCOMPAT_EMULATE", env)
        emulate = [n.strip().lower() for n in names.split(",") if n.strip()] if names else None
        emulate_file = envvars.get("HWCOMPAT_EMULATE_FILE", env)
    emulated = bool(emulate or emulate_file)
    if emulated:
        gpus, cpu_reading, problems = *_emulated(emulate, emulate_file, flag), []
    else:
        (gpus, problems), cpu_reading = _probe_gpus(sys_root, env), None
    if cpu_reading is None:
        cpu_reading, errs = cpu.probe(sys_root=sys_root)
        problems += errs
    uname = os.uname()  # platform.* would import the platform module (milliseconds) for the same facts
    if not emulated:
        problems += apple_silicon(uname.sysname, uname.machine)
    facts = {
        "os": uname.sysname,
        "kernel": uname.release,
        "machine": uname.machine,
        "python": "{}.{}.{}".format(*sys.version_info[:3]),
    }
    return HostReading(devices=tuple(gpus) + (cpu_reading,), problems=tuple(problems),
                       emulated=emulated, facts=facts)


def _emulated(emulate: list[str] | None, emulate_file: str | None, flag: str
              ) -> tuple[list[DeviceReading], DeviceReading | None]:
    """Readings from the catalog and/or an emulate file: (GPUs re-indexed, the CPU reading if one was given)."""
    from hwcompat.probe import emulate as emu

    readings = []
    if emulate:
        readings += emu.from_catalog(emulate, flag)
    if emulate_file:
        readings += emu.from_file(emulate_file)
    cpus = [r for r in readings if r.vendor == Vendor.cpu]
    return _reindex([r for r in readings if r.vendor != Vendor.cpu]), (cpus[0] if cpus else None)


def _probe_gpus(sys_root: str | Path, env: Mapping[str, str]) -> tuple[list[DeviceReading], list[str]]:
    """Each vendor's probe, loaded (with its library) only where the PCI bus shows its cards."""
    from hwcompat.probe.vendorlib import gpu_vendors

    gpus: list[DeviceReading] = []
    problems: list[str] = []
    vendors = gpu_vendors(sys_root)
    if "nvidia" in vendors:
        from hwcompat.probe import nvidia

        found, errs = nvidia.probe(sys_root=sys_root, present=True)
        gpus, problems = gpus + found, problems + errs
    if "amd" in vendors:
        from hwcompat.probe import amd

        found, errs = amd.probe(sys_root=sys_root, environ=env, present=True)
        gpus, problems = gpus + found, problems + errs
    if "intel" in vendors:  # sysfs only (no vendor library): iGPUs are skipped by the probe itself
        from hwcompat.probe import intel

        found, errs = intel.probe(sys_root=sys_root)
        gpus, problems = gpus + found, problems + errs
    return gpus, problems


def apple_silicon(sysname: str, machine: str) -> list[str]:
    """Apple silicon is named, with why hwcompat does not train on its GPU and what to use instead."""
    if sysname != "Darwin" or machine not in ("arm64", "aarch64"):
        return []
    return ["Apple silicon (M-series) GPU: reached through torch's MPS backend, which hwcompat has no profile for "
            "yet (and Docker on macOS cannot pass the GPU to a container); hwcompat trains on the CPU profile here. "
            "For the GPU, use MLX (mlx-lm LoRA) or torch with device='mps' directly"]


def _reindex(readings: list[DeviceReading]) -> list[DeviceReading]:
    """Give emulated devices per-vendor indices in the order they were named."""
    from dataclasses import replace

    counters: dict[str, int] = {}
    out = []
    for r in sorted(readings, key=lambda r: {"nvidia": 0, "amd": 1, "intel": 2}.get(r.vendor, 3)):
        i = counters.get(r.vendor, 0)
        counters[r.vendor] = i + 1
        out.append(replace(r, index=i))
    return out
