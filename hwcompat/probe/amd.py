"""AMD probe: amdsmi when ROCm is installed, else the KFD topology in sysfs.

The physical gfx target comes from the KFD (``gfx_target_version``), which
``HSA_OVERRIDE_GFX_VERSION`` does not change; the override is reported as
the *effective* target so the resolver and doctor can compare the two.
amdsmi is imported only when an AMD GPU is present, silently (``vendorlib``): without ROCm the real
package prints to stdout and raises ``KeyError``, and a stale ``libamd_smi.so`` raises ``AttributeError``.
Its placeholders ``"N/A"`` and ``"gfxffffffffffffffff"`` mean "unknown", never a name or a target.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Mapping

from hwcompat import envvars
from hwcompat.probe.vendorlib import gpu_vendors, one_line, quiet_import
from hwcompat.readings import DeviceReading, gfx_from_kfd_version, gfx_from_override, is_gfx_target

KFD_NODES = "sys/class/kfd/kfd/topology/nodes"


def _props(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
        return text or None
    except OSError:
        return None


def _effective(environ: Mapping[str, str], problems: list[str]) -> str | None:
    value = envvars.get("HSA_OVERRIDE_GFX_VERSION", environ)
    if not value:
        return None
    try:
        return gfx_from_override(value)
    except ValueError as exc:
        problems.append(f"{exc}; unset it or use the form the profile suggests (e.g. 10.3.0)")
        return None


def probe_sysfs(sys_root: str | Path = "/", environ: Mapping[str, str] | None = None) -> tuple[list[DeviceReading], list[str]]:
    """Read AMD GPUs from the KFD topology (``/sys/class/kfd/kfd/topology/nodes/*``)."""
    root = Path(sys_root)
    nodes_dir = root / KFD_NODES
    problems: list[str] = []
    if not nodes_dir.is_dir():
        return [], []
    effective = _effective(environ or {}, problems)
    rocm = _read(root / "opt/rocm/.info/version")
    driver = _read(root / "sys/module/amdgpu/version")
    readings = []
    nodes = sorted((p for p in nodes_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for node in nodes:
        try:
            props = _props(node / "properties")
        except OSError as exc:
            problems.append(f"AMD KFD node {node.name}: cannot read properties ({exc})")
            continue
        version = int(props.get("gfx_target_version", "0"))
        if version == 0:  # CPU node
            continue
        gfx = gfx_from_kfd_version(version)
        loc = int(props.get("location_id", "0"))
        domain = int(props.get("domain", "0"))
        bus = f"{domain:04x}:{loc >> 8:02x}:{(loc >> 3) & 0x1f:02x}.{loc & 0x7:x}"
        minor = props.get("drm_render_minor")
        dev_dir = root / "sys/class/drm" / f"renderD{minor}" / "device" if minor else None
        memory = None
        name = None
        if dev_dir is not None:
            vram = _read(dev_dir / "mem_info_vram_total")
            memory = int(vram) if vram and vram.isdigit() else None
            name = _read(dev_dir / "product_name")
        if memory is None:
            bank = node / "mem_banks" / "0" / "properties"
            try:
                memory = int(_props(bank).get("size_in_bytes", "0"))
            except OSError:
                memory = 0
        if not name:
            name = f"AMD GPU {gfx} (device 0x{int(props.get('device_id', '0')):04x})"
        readings.append(DeviceReading(
            vendor="amd", index=len(readings), name=name, memory_bytes=memory, gfx_target=gfx,
            gfx_target_effective=effective, pci_bus_id=bus, driver_version=driver,
            runtime_version=rocm, source="sysfs",
        ))
    return readings, problems


def probe_amdsmi(smi: ModuleType, sys_root: str | Path = "/", environ: Mapping[str, str] | None = None
                 ) -> tuple[list[DeviceReading], list[str]]:
    """Read AMD GPUs through amdsmi; the gfx target is cross-checked with sysfs by bus id."""
    problems: list[str] = []
    effective = _effective(environ or {}, problems)
    physical = {r.pci_bus_id: r.gfx_target for r in probe_sysfs(sys_root, {})[0]}
    smi.amdsmi_init()
    readings = []
    try:
        for i, h in enumerate(smi.amdsmi_get_processor_handles()):
            try:
                asic = smi.amdsmi_get_gpu_asic_info(h)
                bus = str(smi.amdsmi_get_gpu_device_bdf(h)).lower()
                vram = smi.amdsmi_get_gpu_memory_total(h, smi.AmdSmiMemoryType.VRAM)
                driver = _opt(lambda: smi.amdsmi_get_gpu_driver_info(h)) or {}
                uuid = _opt(lambda: smi.amdsmi_get_gpu_device_uuid(h))
                gfx = physical.get(bus) or _known_gfx(asic.get("target_graphics_version"))
                if gfx is None:
                    problems.append(f"AMD device {i} ({bus}): neither sysfs nor amdsmi reports its gfx target; "
                                    "is the amdgpu kernel driver loaded? (rocminfo should list it)")
                readings.append(DeviceReading(
                    vendor="amd", index=i, name=_known(asic.get("market_name")) or f"AMD GPU {gfx or 'unknown'}",
                    memory_bytes=int(vram), gfx_target=gfx, gfx_target_effective=effective,
                    pci_bus_id=bus, uuid=_known(uuid),
                    driver_version=_known(driver.get("driver_version")),
                    source="amdsmi",
                ))
            except Exception as exc:
                problems.append(f"AMD device {i}: amdsmi could not read it ({one_line(exc)})")
    finally:
        _opt(smi.amdsmi_shut_down)
    return readings, problems


def _opt(fn):
    try:
        return fn()
    except Exception:
        return None


#: amdsmi's placeholders for a value it could not read.
_UNKNOWN = {"", "n/a", "na", "none", "unknown"}


def _known(value) -> str | None:
    text = str(value).strip() if value is not None else ""
    return None if text.lower() in _UNKNOWN else text


def _known_gfx(value) -> str | None:
    """amdsmi's target_graphics_version, or None for N/A and the all-ones placeholder (gfxffffffffffffffff)."""
    text = (_known(value) or "").lower()
    return text if is_gfx_target(text) else None


def probe(smi: ModuleType | None = None, sys_root: str | Path = "/", environ: Mapping[str, str] | None = None,
          present: bool | None = None) -> tuple[list[DeviceReading], list[str]]:
    """amdsmi when an AMD GPU is present and amdsmi loads; otherwise sysfs. Never raises, never prints."""
    load_error = None
    if smi is None:
        if present is None:
            present = "amd" in gpu_vendors(sys_root)
        if not present:
            return [], []
        smi, load_error = quiet_import("amdsmi")
    if smi is not None:
        try:
            return probe_amdsmi(smi, sys_root, environ)
        except Exception as exc:
            load_error = f"{type(exc).__name__}: {one_line(exc)}"
    readings, problems = probe_sysfs(sys_root, environ)
    if load_error and "No module named" not in load_error:
        problems.insert(0, f"amdsmi failed ({load_error}); read the GPUs from sysfs instead"
                        + ("" if readings else " and found none: is the amdgpu driver loaded?"))
    return readings, problems
