"""Intel probe: discrete Arc GPUs from the PCI bus and the i915 / xe driver's sysfs, without any library.

There is no Intel counterpart to NVML that a plain host has (Level Zero's sysman needs the GPU runtime), so
the reading is what sysfs shows: vendor 0x8086 display controllers, their PCI device ID (which gives the Xe
generation, catalog/intel.yaml), the bound driver, and the memory. Memory is the local-memory BAR where
resizable BAR exposes all of it (the usual Arc setup, which Intel requires for performance), else the board
size for that device ID. Integrated GPUs are not training targets and are left out.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from hwcompat.readings import DeviceReading

INTEL = "0x8086"
#: A BAR at least this large is the whole local memory (resizable BAR on); smaller is a 256 MiB window.
FULL_BAR = 2 << 30


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    from hwcompat.datafiles import data_dir
    from hwcompat.yamlfile import load_packaged_yaml

    return load_packaged_yaml(data_dir("catalog") / "intel.yaml", "Intel device table")


def generation(device_id: str) -> str | None:
    """"e20b" -> "xe2-hpg"; None for an ID of no known discrete generation (an iGPU)."""
    did = device_id.lower().removeprefix("0x")
    for arch, gen in table()["generations"].items():
        if did in gen["ids"]:
            return arch
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _largest_bar(dev: Path) -> int:
    """The largest memory BAR (``resource``: start end flags per line), in bytes."""
    best = 0
    for line in (_read(dev / "resource") or "").splitlines()[:6]:
        try:
            start, end, _ = (int(x, 16) for x in line.split())
        except ValueError:
            continue
        if end > start:
            best = max(best, end - start + 1)
    return best


def probe(sys_root: str | Path = "/") -> tuple[list[DeviceReading], list[str]]:
    """Discrete Intel GPUs on the PCI bus; never raises."""
    root = Path(sys_root)
    readings: list[DeviceReading] = []
    problems: list[str] = []
    try:
        devices = sorted((root / "sys/bus/pci/devices").iterdir())
    except OSError:
        return [], []
    for dev in devices:
        if _read(dev / "vendor") != INTEL or not (_read(dev / "class") or "").startswith("0x03"):
            continue
        did = (_read(dev / "device") or "").lower().removeprefix("0x")
        arch = generation(did)
        if arch is None:
            continue  # an integrated GPU
        card = table()["cards"].get(did, {})
        driver = os.path.basename(os.readlink(dev / "driver")) if (dev / "driver").is_symlink() else None
        if driver is None:
            problems.append(f"Intel GPU {dev.name} (0x{did}) has no kernel driver bound: load i915 (Alchemist) or "
                            "xe (Battlemage; Linux 6.12+), then run detect again")
        bar = _largest_bar(dev)
        memory = bar if bar >= FULL_BAR else int(card.get("memory_gib", 0)) << 30
        readings.append(DeviceReading(
            vendor="intel", index=len(readings), name=card.get("name") or f"Intel Arc (0x{did})",
            memory_bytes=memory, xe_arch=arch, pci_device_id=did, pci_bus_id=dev.name.lower(),
            driver_version=driver, source="sysfs"))
    return readings, problems
