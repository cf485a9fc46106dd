"""#23.4: bitsandbytes' ROCm targets are read from the real wheel's code objects, as torch's arch list is.

Each libbitsandbytes_rocm*.so holds compressed clang offload bundles ("CCOB", zstd): their entries are named
``hipv4-amdgcn-amd-amdhsa--gfxNNNN``. catalog/bitsandbytes.yaml must list exactly what the installed wheel has.
"""

import re
import struct
from pathlib import Path

import pytest

from hwcompat import compat


def _code_object_targets(path: Path) -> set[str]:
    import zstandard

    data = path.read_bytes()
    targets: set[str] = set()
    for m in re.finditer(b"CCOB", data):
        i = m.start()
        version, method = struct.unpack_from("<HH", data, i + 4)
        if version == 3:
            total, size, _ = struct.unpack_from("<QQQ", data, i + 8)
            start = i + 32
        elif version == 2:
            total, size, _ = struct.unpack_from("<IIQ", data, i + 8)
            start = i + 24
        else:
            continue
        if method != 1:  # 1 = zstd, what the 0.50.2 libraries use
            continue
        bundle = zstandard.ZstdDecompressor().decompress(data[start:i + total], max_output_size=size)
        targets |= {t.decode() for t in re.findall(rb"amdgcn-amd-amdhsa-+(gfx[0-9a-f]+)", bundle)}
    return targets


def test_the_catalog_lists_what_the_installed_wheel_carries():
    bnb = pytest.importorskip("bitsandbytes")
    from importlib.metadata import version

    table = compat.bnb_table()
    folder = Path(bnb.__file__).parent
    if version("bitsandbytes") != table["version"]:  # a stale table is a failure to fix, never a skip (#39)
        found = {lib.stem.removeprefix("libbitsandbytes_"): sorted(_code_object_targets(lib))
                 for lib in sorted(folder.glob("libbitsandbytes_rocm*.so"))}
        pytest.fail(f"catalog/bitsandbytes.yaml is for bitsandbytes {table['version']}, {version('bitsandbytes')} is "
                    f"installed: update its version and libraries to what this wheel carries: {found}")
    libs = sorted(folder.glob("libbitsandbytes_rocm*.so"))
    assert libs, "the bitsandbytes wheel has no ROCm libraries"
    for lib in libs:
        key = lib.stem.removeprefix("libbitsandbytes_")
        assert key in table["libraries"], f"{lib.name} is missing from catalog/bitsandbytes.yaml"
        assert sorted(_code_object_targets(lib)) == sorted(table["libraries"][key]), lib.name


@pytest.mark.parametrize("card", ["mi100", "rx6600", "rx6700xt", "rx6800", "rx5700xt"])
def test_qlora_is_offered_where_the_wheel_has_kernels(card):
    """cdna1 gfx908, rdna2 gfx1030 (and gfx1031-1036 as gfx1030 or natively), rdna1 in rocm7.14: all ship."""
    from hwcompat.probe.emulate import from_catalog
    from hwcompat.resolve import resolve_device
    from tests.cards import PROFILES
    from hwcompat.software import Software

    d = resolve_device(from_catalog([card])[0], PROFILES, Software())
    assert {"nf4", "optim8bit"} <= set(d.profile.quantization), d.profile.reasons["quantization.nf4"]
    assert "catalog/bitsandbytes.yaml" in d.profile.reasons["quantization.nf4"]


def test_a_target_no_library_has_is_refused():
    from hwcompat.readings import DeviceReading
    from hwcompat.resolve import resolve_device
    from hwcompat.software import Software
    from tests.cards import PROFILES

    r = DeviceReading(index=0, vendor="amd", name="Radeon 8050S", memory_bytes=16 << 30, gfx_target="gfx1154",
                      emulated=True, source="test")
    d = resolve_device(r, PROFILES, Software())
    if d.profile is not None:
        assert "nf4" not in d.profile.quantization
        assert "has no gfx1154 kernels" in d.profile.reasons["quantization.nf4"]


def test_the_steam_deck_runs_on_amds_native_gfx1033_kernels():
    """#23.3: gfx1033 was refused with an unsourced claim; AMD ships native device-gfx1033 wheels."""
    from hwcompat.readings import DeviceReading
    from hwcompat.resolve import resolve_device
    from hwcompat.software import Software
    from tests.cards import PROFILES

    r = DeviceReading(index=0, vendor="amd", name="AMD Custom GPU 0405", memory_bytes=4 << 30, gfx_target="gfx1033",
                      emulated=True, source="test")
    d = resolve_device(r, PROFILES, Software())
    assert d.supported and d.profile.name == "rdna2"
    assert "HSA_OVERRIDE_GFX_VERSION" not in d.profile.env
    assert "torch[device-gfx1033]" in d.profile.torch_install and "repo.amd.com/rocm/whl-multi-arch" in \
        d.profile.torch_install
