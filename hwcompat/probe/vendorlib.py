"""Vendor libraries, imported only where their hardware is, and never allowed to speak or raise.

amdsmi 7.0.2 prints two lines to the process's **stdout** (from C, through file descriptor 1) at import
when ``libamd_smi.so`` is missing, which corrupts ``detect --json`` and ``eval "$(hwcompat env)"``; a
``libamd_smi.so`` older than the Python package raises ``AttributeError`` (undefined symbol). So the import
runs with fds 1 and 2 pointed at a scratch file, any exception becomes one line of text, and the library is
not imported at all unless the PCI bus (or the driver's device nodes) says that vendor's GPU is present,
which also keeps ``detect`` fast on every other host.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel"}
#: Driver nodes that mean "this vendor's GPU is here" where the PCI bus is not visible (WSL2, some containers).
#: A Jetson's GPU is not on the PCI bus: L4T's release file and nvgpu's control node say it is there.
DRIVER_NODES = {"nvidia": ("dev/nvidiactl", "dev/dxg", "proc/driver/nvidia/version", "etc/nv_tegra_release",
                           "dev/nvhost-ctrl-gpu"),
                "amd": ("sys/class/kfd/kfd/topology/nodes", "dev/kfd")}


def one_line(text: str, limit: int = 300) -> str:
    """Multi-line library messages (tracebacks, C warnings) as one bounded line."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def gpu_vendors(sys_root: str | Path = "/") -> set[str]:
    """Vendors with a display/3D controller on the PCI bus (class 0x03xxxx) or a driver node present."""
    root = Path(sys_root)
    found: set[str] = set()
    try:
        devices = list((root / "sys/bus/pci/devices").iterdir())
    except OSError:
        devices = []
    for dev in devices:
        try:
            vendor = PCI_VENDORS.get((dev / "vendor").read_text().strip().lower())
            if vendor and vendor not in found and (dev / "class").read_text().strip().lower().startswith("0x03"):
                found.add(vendor)
        except OSError:
            continue
    for vendor, nodes in DRIVER_NODES.items():
        if vendor not in found and any((root / n).exists() for n in nodes):
            found.add(vendor)
    return found


def quiet_import(name: str) -> tuple[ModuleType | None, str | None]:
    """Import ``name`` with stdout/stderr silenced: (module, None) or (None, what went wrong, one line)."""
    if name in sys.modules:
        return sys.modules[name], None
    import tempfile

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no fds 1/2 to protect (closed): import plainly
        saved = None
    with tempfile.TemporaryFile() as sink:
        if saved:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        try:
            module, error = importlib.import_module(name), None
        except Exception as exc:  # ImportError, KeyError (no ROCM_PATH), AttributeError (stale .so), OSError …
            module, error = None, f"{type(exc).__name__}: {exc}"
        finally:
            if saved:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except (OSError, ValueError):
                        pass
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
        sink.seek(0)
        said = sink.read().decode("utf-8", "replace")
    if module is None:
        return None, one_line(f"{error}{'; it printed: ' + said if said.strip() else ''}")
    return module, None
