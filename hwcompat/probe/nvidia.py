"""NVIDIA probe through NVML: hwcompat's own ctypes binding (``probe/nvml.py``), else ``pynvml``.

NVML answers without creating a CUDA context and ignores
CUDA_VISIBLE_DEVICES, so probing never disturbs a training job and sees
every card. All calls sit between nvmlInit and nvmlShutdown.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from hwcompat.probe.vendorlib import gpu_vendors, one_line, quiet_import
from hwcompat.readings import DeviceReading

def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe(nvml: ModuleType | None = None, sys_root: str | Path = "/",
          present: bool | None = None) -> tuple[list[DeviceReading], list[str]]:
    """Return NVIDIA readings and problems.

    NVML is only loaded when an NVIDIA GPU is present (``present``, else the PCI bus and driver nodes say
    so); a missing or broken NVML with a card present is a problem the user must fix, else silence.
    """
    if nvml is None:
        if present is None:
            present = "nvidia" in gpu_vendors(sys_root)
        if not present:
            return [], []
        nvml, error = _bind()
        if nvml is None:
            return [], [_tegra_without_nvml(sys_root) or
                        f"NVIDIA GPU present but NVML cannot be loaded ({error}): is the NVIDIA driver installed? "
                        "(nvidia-smi should list the card; `pip install nvidia-ml-py` for the fallback binding)"]
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses are generated at run time
        if present or (present is None and "nvidia" in gpu_vendors(sys_root)):
            return [], [_tegra_without_nvml(sys_root) or
                        f"NVIDIA GPU present but NVML failed to start ({one_line(_text(exc))}): "
                        "is the NVIDIA driver installed and loaded? (nvidia-smi should list the card)"]
        return [], []
    readings: list[DeviceReading] = []
    problems: list[str] = []
    try:
        driver = _opt(nvml.nvmlSystemGetDriverVersion)
        cuda = _opt(nvml.nvmlSystemGetCudaDriverVersion)
        runtime = f"{cuda // 1000}.{(cuda % 1000) // 10}" if isinstance(cuda, int) else None
        count = nvml.nvmlDeviceGetCount()
        for i in range(count):
            try:
                readings.append(_reading(nvml, i, _text(driver) if driver else None, runtime, sys_root))
            except Exception as exc:
                problems.append(f"NVIDIA device {i}: NVML could not read it ({one_line(_text(exc))}); "
                                "a GPU that fell off the bus needs a reboot or `nvidia-smi -r`")
    except Exception as exc:
        problems.append(f"NVML failed while listing devices: {one_line(_text(exc))}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting down a half-started NVML is best effort
            pass
    return readings, problems


def _tegra_without_nvml(sys_root: str | Path) -> str | None:
    """A Jetson on JetPack 6 or older has no NVML (its GPU is nvgpu, not the PCI driver): say which L4T release it
    runs and what hwcompat needs, rather than "is the driver installed?"."""
    try:
        first = (Path(sys_root) / "etc/nv_tegra_release").read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    release = first.lstrip("# ").split(",")[0].strip() or "unknown"
    return (f"NVIDIA Jetson found (L4T {release}, /etc/nv_tegra_release) but no NVML: JetPack 6 and older "
            "have none. hwcompat trains Jetson Orin and Thor from JetPack 7.2 (CUDA 13.2, the jetson profile; "
            "catalog/wheels.yaml tegra); on older JetPack use NVIDIA's torch for Jetson, or "
            "`hwcompat detect --emulate-file` to see the plan for the upgraded board")


def _bind() -> tuple[ModuleType | object | None, str | None]:
    """hwcompat's own ctypes binding (milliseconds), else pynvml (it knows other platforms' library paths)."""
    from hwcompat.probe.nvml import NVML

    try:
        return NVML(), None
    except (OSError, AttributeError) as exc:
        nvml, error = quiet_import("pynvml")
        return nvml, None if nvml is not None else f"{one_line(exc)}; pynvml: {error}"


def _opt(fn, *args):
    """Optional NVML field: many are NotSupported on old or passive cards."""
    try:
        return fn(*args)
    except Exception:
        return None


#: NVML's NVML_ERROR_NOT_SUPPORTED (nvml.h): what nvmlDeviceGetMemoryInfo returns on a unified-memory GPU.
NOT_SUPPORTED = 3


def _memory(nvml: ModuleType, h, sys_root: str | Path) -> tuple[int, bool]:
    """(bytes, unified). DGX Spark's GB10 has no memory of its own: NVML answers NOT_SUPPORTED (NVIDIA's DGX
    Spark known issues; nvitop#208) and the GPU uses the host's RAM, so MemTotal is its memory (as gpud PR #1170
    and nvtop PR #411 read it). Any other failure is a card in trouble, said by the caller."""
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(h).total), False
    except Exception as exc:
        if getattr(exc, "value", None) != NOT_SUPPORTED:
            raise
    total = mem_total(sys_root)
    if not total:
        raise RuntimeError("NVML has no memory reading (a unified-memory GPU) and /proc/meminfo gives no MemTotal")
    return total, True


def mem_total(sys_root: str | Path = "/") -> int:
    """The host's MemTotal from /proc/meminfo, bytes; 0 when it cannot be read."""
    try:
        for line in (Path(sys_root) / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reading(nvml: ModuleType, i: int, driver: str | None, runtime: str | None,
             sys_root: str | Path = "/") -> DeviceReading:
    h = nvml.nvmlDeviceGetHandleByIndex(i)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
    memory, unified = _memory(nvml, h, sys_root)
    pci = _opt(nvml.nvmlDeviceGetPciInfo, h)
    bus = _text(pci.busId).lower() if pci is not None else None
    if bus and bus.count(":") == 2 and len(bus.split(":")[0]) == 8:
        bus = bus[4:]  # NVML pads the domain to 8 digits; sysfs and torch use 4
    power = _opt(nvml.nvmlDeviceGetEnforcedPowerLimit, h)  # the limit in force (a user cap included), mW
    uuid = _opt(nvml.nvmlDeviceGetUUID, h)
    return DeviceReading(
        vendor="nvidia",
        index=i,
        name=_text(nvml.nvmlDeviceGetName(h)),
        memory_bytes=memory,
        unified_memory=unified,
        compute_capability=f"{major}.{minor}",
        pci_bus_id=bus,
        uuid=_text(uuid) if uuid else None,
        driver_version=driver,
        runtime_version=runtime,
        power_limit_watts=power / 1000.0 if isinstance(power, (int, float)) else None,
        pcie_generation=_opt(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
        pcie_width=_opt(nvml.nvmlDeviceGetCurrPcieLinkWidth, h),
        source="nvml",
    )
