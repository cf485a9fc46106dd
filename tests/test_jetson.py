"""#36.5: Jetson. torch 2.15's aarch64 wheel (+cu132) carries sm_110 (Thor), and from CUDA 13.2 (JetPack 7.2) Orin
(sm_87) runs the sm_80 cubins (torch's Jetson/SBSA unification). The wheel table has per-host-architecture lists,
a jetson profile trains Orin and Thor there, and older JetPack / older Jetsons are refused with the reason."""

import json
from types import SimpleNamespace

import pytest

from hwcompat import compat
from hwcompat.plan import host_for
from hwcompat.probe import nvidia
from hwcompat.probe.emulate import parse_reading
from hwcompat.profiles import load_profiles
from hwcompat.resolve import match_profile
from tests import cli
from tests.fakes import fake_nvml

AARCH64_215 = compat.lookup("2.15.0", "13.2", None, machine="aarch64")[0]


def test_the_aarch64_wheel_lists_are_their_own():
    x86, _ = compat.lookup("2.15.0", "13.2", None, machine="x86_64")
    assert "sm_110" in AARCH64_215 and "sm_110" not in x86  # old: one x86_64 list for every host
    targets, source = compat.lookup("2.15.0", "13.2", None, machine="arm64")  # macOS spells it arm64
    assert targets == AARCH64_215 and "aarch64" in source
    assert compat.lookup("2.8.0", "12.6", None, machine="aarch64") == (None, "")  # not in the table: unknown


@pytest.mark.parametrize("cc,cuda,runs", [
    ("8.7", "13.2", True),    # Orin, unified: the sm_80 cubin runs
    ("8.7", "13.0", False),   # Orin before 13.2: only its own sm_87
    ("11.0", "13.0", True),   # Thor: the aarch64 wheel's own sm_110
    ("10.1", "12.9", False),  # Thor under CUDA 12.x is sm_101: no wheel has it
    ("7.2", "13.2", False),   # Xavier never joined
])
def test_tegra_parts_under_the_unification(cc, cuda, runs):
    assert compat.covers_nvidia(AARCH64_215, cc, cuda) is runs


def test_a_thor_is_not_told_the_right_torch_has_no_kernels():
    torch = compat.InstalledTorch("2.15.0+cu132", "13.2", None, AARCH64_215, "table")
    assert compat.kernel_problem(torch, "nvidia", "11.0", None) is None  # old: "has no kernels for sm_110"
    assert compat.kernel_problem(torch, "nvidia", "8.7", None) is None
    old = compat.InstalledTorch("2.13.0+cu130", "13.0", None, compat.lookup("2.13.0", "13.0", None, "aarch64")[0])
    assert "no kernels for sm_87" in compat.kernel_problem(old, "nvidia", "8.7", None)


@pytest.mark.parametrize("cc,name", [("8.7", "jetson"), ("11.0", "jetson"), ("10.1", "jetson"), ("8.6", "ampere"),
                                     ("8.0", "ampere"), ("10.0", "blackwell"), ("12.1", "blackwell"),
                                     ("7.2", None), ("5.3", None)])
def test_jetson_parts_match_the_jetson_profile_only(cc, name):
    reading = parse_reading({"vendor": "nvidia", "name": "x", "memory_bytes": 1 << 33, "compute_capability": cc},
                            "test")
    found = match_profile(reading, load_profiles())
    assert (found.name if found else None) == name


def _detect(tmp_path, entries):
    path = tmp_path / "readings.json"
    path.write_text(json.dumps(entries))
    res = cli.run("detect", "--emulate-file", path, "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["devices"]


def _jetson(name, cc, cuda):
    return {"vendor": "nvidia", "name": name, "memory_bytes": 64 << 30, "compute_capability": cc,
            "runtime_version": cuda}


def test_detect_on_jetsons(tmp_path):
    orin, nano, thor, thor70, xavier = _detect(tmp_path, [
        _jetson("Jetson AGX Orin", "8.7", "13.2"), _jetson("Jetson Orin Nano", "8.7", "12.6"),
        _jetson("Jetson AGX Thor", "11.0", "13.2"), _jetson("Jetson Thor 7.0", "11.0", "13.0"),
        _jetson("Jetson Xavier NX", "7.2", "11.4")])[:5]
    assert orin["supported"] and orin["profile"]["name"] == "jetson"  # old: refused, "no Jetson profile yet"
    assert orin["profile"]["torch_install"] == \
        "pip install 'torch>=2.15' --index-url https://download.pytorch.org/whl/cu132"
    assert orin["profile"]["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
    assert not nano["supported"] and "JetPack 7.2 (CUDA 13.2)" in nano["problems"][0]
    assert "supports CUDA 12.6" in nano["problems"][0]
    assert thor["supported"] and thor70["supported"]  # sm_110 is in the aarch64 wheel at CUDA 13.0 and 13.2
    assert not xavier["supported"] and xavier["profile"] is None and "JetPack" in xavier["problems"][0]


def test_an_unknown_cuda_version_is_said_not_refused(tmp_path):
    (orin,) = _detect(tmp_path, [{"vendor": "nvidia", "name": "Orin", "memory_bytes": 8 << 30,
                                  "compute_capability": "8.7"}])[:1]
    assert orin["supported"] and orin["problems"][0].startswith("note: Orin's CUDA version is unknown")


def test_a_jetson_is_planned_as_unified_memory():
    """Whatever the reading says (an emulate file, an NVML that reports a size): the planner counts one pool."""
    reading = parse_reading({"vendor": "nvidia", "name": "Orin", "memory_bytes": 1 << 36, "compute_capability": "8.7"},
                            "test")
    assert not reading.unified_memory  # the file did not say so
    assert host_for(SimpleNamespace(reading=reading), 1 << 36, "bfloat16").unified


def test_a_jetpack6_board_without_nvml_is_named(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37\n")
    from hwcompat.probe.vendorlib import gpu_vendors

    assert "nvidia" in gpu_vendors(tmp_path)  # old: not on the PCI bus, so no GPU at all
    broken = fake_nvml([], init_error=RuntimeError("libnvidia-ml.so.1: cannot open shared object file"))
    readings, (problem,) = nvidia.probe(nvml=broken, sys_root=tmp_path, present=True)
    assert readings == [] and "L4T R36 (release)" in problem and "JetPack 7.2" in problem
    assert "is the NVIDIA driver installed" not in problem
