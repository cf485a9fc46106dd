"""Emulated devices: catalog names or a YAML file of raw readings.

They come in through the same door as probed ones (a ``DeviceReading``), so
everything downstream behaves exactly as on the real card.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from hwcompat.choices import Vendor
from hwcompat.datafiles import data_dir
from hwcompat.errors import InputError, excerpt
from hwcompat.readings import VENDORS, XE_ARCHS, DeviceReading, is_gfx_target, parse_cc
from hwcompat.schema import Field, Problem, Shape, check
from hwcompat.textcheck import closest
from hwcompat.yamlfile import load_packaged_yaml, load_yaml

def _lowered(test):
    return lambda v: None if test(v.lower()) else f"expected a gfx target like \"gfx1031\", got {excerpt(v)}"


def _cc(value: str) -> str | None:
    """The reading parses it once; any vendor's entry that has one must be readable."""
    try:
        parse_cc(value)
    except ValueError:
        return f"expected \"major.minor\" like \"6.1\", got {excerpt(value)}"
    return None


_GFX = _lowered(is_gfx_target)
#: A reading as a user writes it: each DeviceReading field a user may set, and what it must hold.
READING = Shape({
    "vendor": Field(required=True, choices=VENDORS), "name": Field("string", required=True),
    "memory_bytes": Field("count", required=True),
    **{k: Field("count") for k in ("index", "pcie_generation", "pcie_width", "cpu_cores")},
    "power_limit_watts": Field("number"), "unified_memory": Field("bool"), "cpu_flags": Field("strings"),
    "compute_capability": Field("string", rule=_cc, hint=' (write it quoted: "6.1")'),
    "gfx_target": Field("string", rule=_GFX), "gfx_target_effective": Field("string", rule=_GFX),
    **{k: Field("string") for k in ("pci_bus_id", "uuid", "driver_version", "runtime_version", "xe_arch",
                                    "pci_device_id")},
}, blank_is_missing=True)
REQUIRED = tuple(READING.required())


def split_names(text: str) -> list[str]:
    return [n.strip().lower() for n in text.split(",") if n.strip()]


@lru_cache(maxsize=1)
def catalog() -> dict[str, dict[str, Any]]:
    """The known-device catalog (``catalog/devices.yaml``), validated once."""
    path = data_dir("catalog") / "devices.yaml"
    raw = load_packaged_yaml(path, "device catalog")
    for name, entry in raw.items():
        parse_reading(entry, where=f"{path}: {name}")
    return raw


def from_catalog(names: list[str], flag: str = "--emulate") -> list[DeviceReading]:
    """Catalog readings; ``flag`` is what the user typed the names into (an option or HWCOMPAT_EMULATE)."""
    cat = catalog()
    out = []
    for name in names:
        key = name.strip().lower()
        if key not in cat:
            near = closest(key, cat)
            hint = f" Did you mean {near!r}?" if near else ""
            raise InputError(f"unknown device {excerpt(name)} for {flag}.{hint} "
                             f"Known: {', '.join(sorted(cat))}; or describe it in an --emulate-file")
        out.append(parse_reading(cat[key], where=f"catalog: {key}", source=f"catalog:{key}"))
    return out


def from_file(path: str | Path) -> list[DeviceReading]:
    """Readings from a YAML list; every error names the file, the entry and the field."""
    p = Path(path)
    data = load_yaml(p, "emulate file")
    if not isinstance(data, list) or not data:
        raise InputError(f"emulate file {p}: expected a non-empty YAML list of devices "
                         f"(- vendor: nvidia\n  name: ...), got {type(data).__name__}")
    return [parse_reading(entry, where=f"emulate file {p}: entry {i}", source=f"file:{p}")
            for i, entry in enumerate(data, start=1)]


#: Fields only one vendor's probe reads: on another vendor's reading they contradict it.
VENDOR_FIELDS = {"compute_capability": "nvidia", "gfx_target": "amd", "gfx_target_effective": "amd",
                 "xe_arch": "intel"}
VENDOR_NAMES = {"nvidia": "NVIDIA", "amd": "AMD", "intel": "Intel"}


def _check_consistent(values: dict[str, Any], vendor: str, where: str) -> None:
    """A reading no real probe could return is refused: another vendor's field, an Intel PCI ID of one
    generation claiming another, a control character (a terminal escape in a name would be printed raw)."""
    for key, owner in VENDOR_FIELDS.items():
        if key in values and owner != vendor:
            raise InputError(f"{where}: field {key!r}: only {VENDOR_NAMES[owner]} readings have it, and this is "
                             f"vendor: {vendor}; remove it, or set vendor: {owner}")
    for key, value in values.items():
        if isinstance(value, str) and any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 for c in value):
            raise InputError(f"{where}: field {key!r}: holds control characters ({excerpt(value)}); a device "
                             "reading is plain text")
    did = values.get("pci_device_id")
    if vendor == Vendor.intel and did:
        from hwcompat.probe.intel import generation

        gen = generation(did)
        if gen is not None and gen != values.get("xe_arch"):
            raise InputError(f"{where}: field 'xe_arch': {excerpt(values.get('xe_arch'))}, but PCI ID {did} is "
                             f"{gen} (catalog/intel.yaml, from Intel's compute-runtime); set xe_arch: {gen} or "
                             "the ID of the card you mean")


def parse_reading(entry: Any, where: str, source: str = "") -> DeviceReading:
    """Validate one raw reading (a mapping) against READING and the rules between its fields; build the dataclass."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping of reading fields, got {type(entry).__name__}")
    try:
        check(entry, READING)
    except Problem as p:
        field = f"field {excerpt(p.path[0])}: " if p.path else ""
        required = f" (required: {', '.join(REQUIRED)})" if not p.path else ""
        raise InputError(f"{where}: {field}{p.why}{required}") from None
    vendor = entry["vendor"]
    values = {k: float(v) if k == "power_limit_watts" else tuple(v) if k == "cpu_flags" else
              v.lower() if k.startswith("gfx_target") else v for k, v in entry.items()}
    _check_consistent(values, vendor, where)
    if vendor == Vendor.nvidia and values.get("compute_capability") is None:
        raise InputError(f"{where}: field 'compute_capability': missing (required for NVIDIA, e.g. \"6.1\")")
    if vendor == Vendor.amd and values.get("gfx_target") is None:
        raise InputError(f"{where}: field 'gfx_target': missing (required for AMD, e.g. \"gfx1031\")")
    if vendor == Vendor.intel and values.get("xe_arch") not in XE_ARCHS:
        raise InputError(f"{where}: field 'xe_arch': expected one of {', '.join(XE_ARCHS)} (Alchemist: xe-hpg, "
                         f"Battlemage: xe2-hpg), got {excerpt(values.get('xe_arch'))}")
    values.setdefault("index", 0)
    return DeviceReading(**values, source=source, emulated=True)
