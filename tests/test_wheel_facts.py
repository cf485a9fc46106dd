"""Wheel-table, driver and profile facts that were once wrong (#23, #36), each checked against its corrected row."""

import pytest

from hwcompat import compat
from tests import cli
from tests.cards import PROFILES, problems as _problems


@pytest.mark.parametrize("card", ["p40", "v100", "m40"])
def test_torch_2_7_cu128_has_no_kernels_for_maxwell_pascal_volta(card):
    """The 2.7 cu128 builds were 7.5;8.0;8.6;9.0;10.0;12.0 (release/2.7 build_cuda.sh); 2.8 brought 7.0 back."""
    probs = _problems(card, "2.7.1+cu128")
    assert any("has no kernels for" in p and "no kernel image is available" in p for p in probs), probs


def test_torch_2_7_cu128_still_runs_turing_and_newer():
    for card in ("t4", "rtx4090", "h100"):
        assert _problems(card, "2.7.1+cu128") == [], card


def test_torch_2_8_cu128_runs_volta_again():
    assert _problems("v100", "2.8.0+cu128") == []


@pytest.mark.parametrize("release,family", [((2, 4), "cu121"), ((2, 5), "cu124"), ((2, 6), "cu124"),
                                            ((2, 7), "cu126"), ((2, 13), "cu130"), ((2, 14), "cu130"),
                                            ((2, 15), "cu132")])
def test_the_pypi_default_build_per_release(release, family):
    assert compat.pypi_family(release) == family


def test_the_kepler_ceiling_is_the_wheel_tables():
    assert compat.last_wheels_for("3.7") == ("cu118", "2.7")
    from hwcompat.probe.emulate import from_catalog
    from hwcompat.resolve import resolve_device
    from hwcompat.software import Software

    (problem,) = resolve_device(from_catalog(["k80"])[0], PROFILES, Software.with_torch("2.13.0", "13.0")).problems
    assert "torch <= 2.7" in problem and "2.6" not in problem


# --- 9. driver advice never strands Maxwell, Pascal or Volta: R580 is their last branch ------------------------------

def _old_nvidia_cards():
    from hwcompat.probe.emulate import catalog, from_catalog

    out = []
    for name in catalog():
        (r,) = from_catalog([name])
        if r.vendor == "nvidia" and r.compute_capability and (5, 0) <= tuple(
                int(x) for x in r.compute_capability.split(".")) < (7, 5):
            out.append(name)
    return out


def _printed_fixes(name, stack, driver):
    from dataclasses import replace

    from hwcompat.doctor import diagnose
    from hwcompat.probe.emulate import from_catalog
    from hwcompat.profiles import load_profiles
    from hwcompat.readings import HostReading
    from hwcompat.resolve import resolve_host
    from hwcompat.software import Software

    (r,) = from_catalog([name])
    r = replace(r, emulated=False, driver_version=driver)
    plan = resolve_host(HostReading((r,) + tuple(from_catalog(["cpu"]))), load_profiles(),
                        Software.with_torch(stack.torch_version, stack.torch_cuda))
    texts = [p for d in plan.devices for p in d.problems]
    texts += [d.profile.torch_install for d in plan.devices if d.profile]
    texts += [f.fix for f in diagnose(plan, stack, {}) if f.fix]
    return texts


def test_no_printed_fix_moves_an_old_card_past_r580_or_cuda_13():
    import re

    from packaging.requirements import Requirement

    from hwcompat.doctor import Stack

    cards = _old_nvidia_cards()
    assert {"m40", "p40", "v100"} <= set(cards)
    stacks = [Stack("2.13.0+cu130", "13.0", None, ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")),
              Stack("2.14.0+cu132", "13.2", None, ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")),
              Stack("2.13.0+cu126", "12.6", None, ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"))]
    for name in cards:
        for stack in stacks:
            for driver in ("470.256.02", "535.230.02", "580.95.05"):
                for text in _printed_fixes(name, stack, driver):
                    assert "whl/cu13" not in text, (name, stack.torch_version, driver, text)
                    for want in re.findall(r"driver to >= (\d+)", text):
                        assert int(want) <= 580, (name, stack.torch_version, driver, text)
                    if stack.torch_cuda.startswith("13"):  # a driver for a runtime with no kernels for the card
                        assert "upgrade the NVIDIA driver" not in text, (name, stack.torch_version, driver, text)
                    for req in re.findall(r"pip install '([^']+)'", text):
                        r = Requirement(req)
                        if r.name == "torch" and "whl/cpu" not in text:  # the CPU profile's wheel
                            assert not r.specifier.contains("2.15.0"), (name, text)


# --- 5, 6, 7: profile reasons that were false -------------------------------------------------------------------

def _profile(name):

    return PROFILES[name]


def test_no_profile_says_triton_supports_7_0():
    """Compute capability 7.0 is torch's gate (GPUTooOldForTriton); upstream Triton lists 8.0+ (#23.6)."""

    for p in PROFILES.values():
        assert "Triton supports compute capability >= 7.0" not in p.compile_backend.reason, p.name
    for name in ("volta", "turing"):
        reason = _profile(name).compile_backend.reason
        assert "triton#5066" in reason and "not yet measured" in reason and "8.0+" in reason


def test_maxwell_quantization_points_to_no_removed_source_build():
    """bitsandbytes 0.49 removed the sm_5x build (PR #1806): nothing 4-bit runs on Maxwell (#23.7)."""
    q = _profile("maxwell").quantization
    for key in ("nf4", "optim8bit"):
        assert "COMPUTE_CAPABILITY=52" not in q[key].reason and "#1806" in q[key].reason


def test_mi100_bf16_is_explained_at_its_real_rate():
    """MI100: bf16 92.3 vs fp16 184.6 TFLOPS (its datasheet, catalog/throughput.yaml) (#23.5)."""
    import yaml

    from hwcompat.datafiles import data_dir

    reason = _profile("cdna1").dtype.reason
    assert "at the fp16 rate" not in reason and "half the fp16 rate" in reason
    peaks = yaml.safe_load((data_dir("catalog") / "throughput.yaml").read_text())["devices"]
    mi100 = next(d for d in peaks if d["match"] == "MI100")
    assert mi100["bfloat16"] * 2 == mi100["float16"] and "92.3" in reason and "184.6" in reason


# --- 2. Jetson: a Tegra part runs only its own cubins, and is never given the desktop wheels -------------------------

@pytest.mark.parametrize("cc,desktop,desktop_card", [("8.7", ["sm_80", "sm_86"], "8.9"), ("7.2", ["sm_70"], "7.5"),
                                                     ("5.3", ["sm_50", "sm_52"], "5.2"), ("6.2", ["sm_60", "sm_61"], "6.1")])
def test_desktop_cubins_do_not_cover_tegra_parts(cc, desktop, desktop_card):
    assert not compat.covers_nvidia(desktop, cc)
    assert compat.covers_nvidia([f"sm_{cc.replace('.', '')}"], cc)
    assert compat.covers_nvidia(desktop, desktop_card)  # the same-major rule still holds for desktop cards


def test_a_jetson_xavier_is_refused_with_the_jetpack_advice(tmp_path):
    """Orin and Thor train from JetPack 7.2 (the jetson profile, tests/test_jetson.py); Xavier never can."""
    import json

    readings = tmp_path / "xavier.yaml"
    readings.write_text('- {vendor: nvidia, name: "Xavier (nvgpu)", memory_bytes: 34359738368, '
                        'compute_capability: "7.2"}\n')
    res = cli.run("detect", "--emulate-file", readings, "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    xavier = json.loads(res.stdout)["devices"][0]
    assert xavier["supported"] is False and xavier["profile"] is None
    assert "JetPack" in xavier["problems"][0] and "expandable_segments off" in xavier["problems"][0]
    assert "whl/cu13" not in res.stdout


# --- small ones: the AOTriton experimental flag only where AOTriton calls a target experimental -----------------------

@pytest.mark.parametrize("gfx,needs", [("gfx1100", False), ("gfx1151", False), ("gfx1201", False),
                                       ("gfx1101", True), ("gfx1102", True), ("gfx1103", True), ("gfx1150", True),
                                       ("gfx1152", True), ("gfx1153", True), ("gfx1200", True)])
def test_aotriton_experimental_flag_per_target(gfx, needs):
    from hwcompat.readings import DeviceReading
    from hwcompat.resolve import resolve_device
    from hwcompat.software import Software

    r = DeviceReading(index=0, vendor="amd", name=f"Radeon {gfx}", memory_bytes=16 << 30, gfx_target=gfx,
                      emulated=True, source="test")
    d = resolve_device(r, PROFILES, Software())
    assert ("TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL" in d.profile.env) is needs


def test_rdna_profiles_do_not_credit_ck_with_rdna():

    for name in ("rdna2", "rdna3", "rdna4"):
        p = PROFILES[name]
        texts = [p.hardware.source, p.attention.reason, p.attention.source]
        assert not any("CK" in t and "RDNA3/4" in t and "Instinct-only" not in t for t in texts), (name, texts)
