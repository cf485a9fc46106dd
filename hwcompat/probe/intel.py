"""Intel probe: discrete Arc GPUs from the PCI bus and the i915 / xe driver's sysfs, without any library.

There is no Intel counterpart to NVML that a plain host has (Level Zero's sysman needs the GPU runtime), so
the reading is what sysfs shows: vendor 0x8086 display controllers, their PCI device ID (which gives the Xe
generation, catalog/intel.yaml), the bound driver, and the memory: the xe driver's own tile count where it
publishes one, else the board size of the device ID (``local_memory``: never a power-of-two BAR taken as the
memory). Integrated GPUs are not training targets and are left out.
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


def _xe_vram(dev: Path) -> int:
    """The xe driver's own count of the card's memory: ``tile<N>/physical_vram_size_bytes`` (hex), summed over
    tiles (igt-gpu-tools tests/intel/xe_sysfs_tile.c reads the same files); 0 where the driver has none (i915)."""
    total = 0
    for f in sorted(dev.glob("tile*/physical_vram_size_bytes")):
        try:
            total += int(_read(f) or "0", 0)
        except ValueError:
            continue
    return total


def local_memory(dev: Path, did: str, card: dict[str, Any]) -> tuple[int, str | None]:
    """The card's memory and, where it is a guess, why. A PCI BAR is a power of two, so with resizable BAR a
    B580 (12 GiB) shows a 16 GiB BAR and an A380 (6 GiB) an 8 GiB one: the BAR is the memory only when it is one
    of the board sizes the ID is sold with (catalog/intel.yaml; 0x56a0 comes with 8 or 16 GiB)."""
    xe = _xe_vram(dev)
    if xe:
        return xe, None
    sizes = card.get("memory_gib", [])
    sizes = sorted(sizes) if isinstance(sizes, list) else [sizes]
    bar = _largest_bar(dev)
    if sizes:
        if bar in {int(g) << 30 for g in sizes}:
            return bar, None
        note = None if len(sizes) == 1 else (
            f"Intel GPU {dev.name} (0x{did}) is sold with {' or '.join(f'{g:g} GiB' for g in sizes)} and its BAR "
            f"({bar >> 20} MiB) does not tell which: planning for {sizes[0]:g} GiB (enable resizable BAR, or use the "
            "xe driver, to read it)")
        return int(sizes[0]) << 30, note
    if bar >= FULL_BAR:
        return bar, (f"Intel GPU {dev.name} (0x{did}): memory read from its PCI BAR ({bar >> 30} GiB), a power of "
                     "two that may exceed the card's; check the plan against the card's specification")
    return 0, f"Intel GPU {dev.name} (0x{did}): its memory could not be read (no xe tile files, unknown board)"


def probe(sys_root: str | Path = "/") -> tuple[list[DeviceReading], list[str]]:
    """Discrete Intel GPUs on the PCI bus; never raises."""
    root = Path(sys_root)
    readings: list[DeviceReading] = []
    problems: list[str] = []
    try:
        devices = sorted((root / "sys/bus/pci/devices").iterdir())
    except OSError:
        return [], []
    ze_index = -1  # Level Zero numbers every Intel GPU, the iGPU too, in PCI order (ZE_ENABLE_PCI_ID_DEVICE_ORDER)
    for dev in devices:
        if _read(dev / "vendor") != INTEL or not (_read(dev / "class") or "").startswith("0x03"):
            continue
        ze_index += 1
        did = (_read(dev / "device") or "").lower().removeprefix("0x")
        arch = generation(did)
        if arch is None:  # an integrated GPU (Meteor, Arrow, Lunar, Panther Lake …): named, not a target
            problems.append(f"Intel GPU {dev.name} (0x{did}) found: an integrated GPU, not a training target (it "
                            "shares the host's RAM and bandwidth; hwcompat trains on a discrete Arc card or the CPU)")
            continue
        card = table()["cards"].get(did, {})
        driver = os.path.basename(os.readlink(dev / "driver")) if (dev / "driver").is_symlink() else None
        if driver is None:
            problems.append(f"Intel GPU {dev.name} (0x{did}) has no kernel driver bound: load i915 (Alchemist) or "
                            "xe (Battlemage; Linux 6.12+), then run detect again")
        memory, note = local_memory(dev, did, card)
        if note:
            problems.append(note)
        readings.append(DeviceReading(
            vendor="intel", index=ze_index, name=card.get("name") or f"Intel Arc (0x{did})",
            memory_bytes=memory, xe_arch=arch, pci_device_id=did, pci_bus_id=dev.name.lower(),
            driver_version=driver, source="sysfs"))
    return readings, problems
