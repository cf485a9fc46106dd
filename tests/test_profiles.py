"""Every packaged profile through the schema; the schema's errors; packaging."""

import itertools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hwcompat.datafiles import data_dir
from hwcompat.errors import ProfileError
from hwcompat.profiles import load_profile, load_profiles, parse_profile
from hwcompat.readings import parse_cc

FAMILIES = {"maxwell", "pascal", "volta", "turing", "ampere", "ada", "hopper", "blackwell", "rdna1", "rdna2", "rdna3",
            "rdna4", "vega20", "cdna1", "cdna2", "cdna3", "cdna4", "alchemist", "battlemage", "jetson", "cpu"}


def test_all_families_present():
    assert set(load_profiles()) == FAMILIES


@pytest.mark.parametrize("path", sorted(data_dir("profiles").glob("*.yaml")), ids=lambda p: p.stem)
def test_profile_loads_and_every_choice_is_sourced(path):
    p = load_profile(path)
    for choice in (p.dtype, p.attention, p.compile_backend):
        assert choice.reason and choice.source, path
    assert all(e.reason and e.source for e in p.env)
    assert all(q.source and isinstance(q.supported, bool) for q in p.quantization.values())
    assert p.torch.source


def test_no_two_profiles_cover_the_same_capability():
    profiles = list(load_profiles().values())
    for tegra in (False, True):  # a Jetson and a desktop card of one capability are different devices
        nvidia = [p for p in profiles if p.vendor == "nvidia" and p.match.tegra is tegra]
        for a, b in itertools.combinations(nvidia, 2):
            assert a.match.cc_max < b.match.cc_min or b.match.cc_max < a.match.cc_min, (a.name, b.name)
    amd = [p for p in profiles if p.vendor == "amd"]
    for a, b in itertools.combinations(amd, 2):
        assert not set(a.match.gfx_targets) & set(b.match.gfx_targets), (a.name, b.name)


def test_nvidia_ranges_are_contiguous_from_maxwell():
    ranges = sorted((p.match.cc_min, p.match.cc_max) for p in load_profiles().values()
                    if p.vendor == "nvidia" and not p.match.tegra)
    assert ranges[0][0] == parse_cc("5.0")


def _raw():
    import yaml
    return yaml.safe_load((data_dir("profiles") / "volta.yaml").read_text())


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(dtyp=r.pop("dtype")), "dtyp: unknown key (did you mean 'dtype'?)"),
    (lambda r: r["dtype"].update(value="fp8"), "dtype.value: 'fp8' is not one of: float32, float16, bfloat16"),
    (lambda r: r["attention"].update(value="xformers"), "attention.value: 'xformers' is not one of: eager, sdpa"),
    (lambda r: r["hardware"].update(bf16="yes"), "hardware.bf16: expected true or false, got 'yes'"),
    (lambda r: r["env"].append({"name": "LD_PRELOAD", "value": "x", "reason": "r"}),
     "env[2].name: 'LD_PRELOAD' is not in hwcompat.envvars.SETS"),
    (lambda r: r["match"]["compute_capability"].update(min="8.0"), "match.compute_capability: min is above max"),
    (lambda r: r.pop("torch"), "top level: missing required key 'torch'"),
    (lambda r: r["env"][0].update(value=1), "env[0].value: expected a string, got 1 (quote it)"),
    (lambda r: r.update(evidence="path-verified"), "evidence: path-verified needs {level, card, memory_limit_gib"),
    (lambda r: r.update(evidence={"level": "path-verified", "card": "H100", "date": "2026-12-02", "source": "x"}),
     "evidence: missing required key 'memory_limit_gib'"),
    (lambda r: r.update(evidence={"level": "path-verified", "card": "H100", "memory_limit_gib": -1,
                                  "date": "2026-12-02", "source": "x"}),
     "evidence.memory_limit_gib: -1 is not a positive number of GiB"),
])
def test_schema_errors_name_the_key(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ProfileError) as e:
        parse_profile(raw, "profiles/volta.yaml")
    assert str(e.value).startswith("profile profiles/volta.yaml: ")
    assert message in str(e.value)


def test_name_must_match_file(tmp_path):
    f = tmp_path / "other.yaml"
    f.write_text((data_dir("profiles") / "volta.yaml").read_text())
    with pytest.raises(ProfileError, match="'volta' must equal the file name 'other'"):
        load_profile(f)


def test_invalid_yaml_has_line(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("name: x\n  bad: [\n")
    with pytest.raises(ProfileError, match=r"x.yaml:2: not valid YAML"):
        load_profile(f)


@pytest.mark.slow
def test_installed_wheel_carries_profiles_and_catalog(tmp_path):
    """Build the wheel, install it into a bare target, and resolve from the packaged data there."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                          str(root)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = out.glob("hwcompat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hwcompat/_data/profiles/maxwell.yaml" in names and "hwcompat/_data/catalog/devices.yaml" in names
    assert "hwcompat/train/templates/report.html.j2" in names  # report.html's page
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import hwcompat, json; from hwcompat.cli import main; "
            "assert hwcompat.__file__.startswith(%r); main(['detect', '--json', '--emulate', 'p100'])" % str(target))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert '"arch": "pascal"' in res.stdout


def test_catalog_memory_is_the_datasheet_size_in_whole_gib():
    """One convention for every emulated card (catalog/devices.yaml says which and why)."""
    from hwcompat.probe.emulate import catalog

    for name, entry in catalog().items():
        if entry["vendor"] != "cpu":
            assert entry["memory_bytes"] % 2**30 == 0, (name, entry["memory_bytes"] / 2**30)


def test_path_verified_evidence_carries_its_card_limit_date_and_source():
    """#26: the level between emulated and verified, with what it was measured on (detect --explain prints it)."""
    raw = _raw()
    raw["evidence"] = {"level": "path-verified", "card": "NVIDIA H100 80GB HBM3", "memory_limit_gib": 16,
                       "date": "2026-12-02", "source": "bench/results/path-volta-nvidia-h100-80gb-hbm3.json"}
    p = parse_profile(raw, "profiles/volta.yaml")
    assert p.evidence.value == "path-verified"
    assert p.evidence_note == ("NVIDIA H100 80GB HBM3 under a 16 GiB limit, 2026-12-02 "
                               "(bench/results/path-volta-nvidia-h100-80gb-hbm3.json)")


def test_verified_evidence_rests_on_a_selftest_of_the_shipped_trainer():
    """#36 §3: `verified` only where a committed real-card selftest file of that profile passed through the shipped
    trainer (its recipe is `hwcompat train`); old: hopper was verified by a file from an older loop (no recipe).
    docs/evidence.md names exactly those profiles, with their files' own figures."""
    import json

    root = Path(__file__).resolve().parents[1]
    readme = (root / "docs" / "evidence.md").read_text()
    verified = sorted(name for name, p in load_profiles().items() if p.evidence.value == "verified")
    assert verified == ["cpu"]
    for name in verified:
        files = sorted((root / "bench" / "results").glob(f"selftest-{name}-*.json"))
        proofs = [json.loads(f.read_text()) for f in files]
        good = [d for d in proofs if d.get("passed") and str(d.get("recipe", "")).startswith("hwcompat train")
                and not d.get("emulated")]
        assert good, f"{name}: evidence verified, but no selftest file of the shipped trainer backs it"
        assert f"**{name}**" in readme
    hopper = json.loads((root / "bench/results/selftest-hopper-nvidia-h100-80gb-hbm3.json").read_text())
    assert "recipe" not in hopper and load_profiles()["hopper"].evidence.value == "emulated"
    assert f"{hopper['achieved_tflops']:.1f} TFLOP/s, MFU {hopper['mfu']:.3f}" in readme.replace("\n", " ")
