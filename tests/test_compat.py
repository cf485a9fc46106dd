"""Does this torch build run this card? The wheel table, version.py reading, and advice that parses."""

import json
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from hwcompat import compat
from hwcompat.probe.emulate import from_catalog
from hwcompat.resolve import resolve_device
from hwcompat.software import Software
from tests.cards import PROFILES, problems as _problems, real as _real

ROOT = Path(__file__).resolve().parents[1]

# torch/version.py of the plain PyPI torch==2.13.0 wheel: no +tag, a CUDA 13.0 build.
PYPI_2_13 = textwrap.dedent("""\
    from typing import Optional

    __all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
    __version__ = '2.13.0'
    debug = False
    cuda: Optional[str] = '13.0'
    git_version = '0123456789abcdef0123456789abcdef01234567'
    hip: Optional[str] = None
    rocm: Optional[str] = None
    xpu: Optional[str] = None
""")


def test_version_file_is_read_as_text():
    facts = compat.parse_version_file(PYPI_2_13)
    assert (facts["__version__"], facts["cuda"], facts["hip"]) == ("2.13.0", "13.0", None)
    t = compat.InstalledTorch.from_version(facts["__version__"], facts["cuda"], facts["hip"])
    assert t.family == "cu130" and t.targets == ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def test_installed_torch_is_found_without_importing_it(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
    (tmp_path / "torch" / "version.py").write_text(PYPI_2_13)
    import importlib.machinery

    def find(name):
        return importlib.machinery.PathFinder.find_spec(name, [str(tmp_path)])

    t = compat.installed(find_spec=find)
    assert t.version == "2.13.0" and t.cuda == "13.0" and "sm_61" not in t.targets


@pytest.mark.parametrize("card,version", [
    ("p40", "2.13.0"),          # the plain PyPI wheel (cuda 13.0 in version.py)
    ("p40", "2.8.0+cu128"), ("p40", "2.10.0+cu128"), ("p40", "2.9.0+cu130"),
    ("v100", "2.9.0+cu130"), ("v100", "2.11.0+cu128"), ("m40", "2.13.0+cu130"), ("gtx1080ti", "2.14.0+cu132"),
])
def test_torch_without_the_cards_kernels_is_a_problem(card, version):
    cuda = "13.0" if "+" not in version else None
    probs = _problems(card, version, cuda)
    sm = "sm_" + from_catalog([card])[0].compute_capability.replace(".", "")
    hit = [p for p in probs if f"has no kernels for {sm}" in p]
    assert hit and "no kernel image is available" in hit[0], probs


@pytest.mark.parametrize("card,version", [
    ("p40", "2.13.0+cu126"), ("m40", "2.14.0+cu126"), ("v100", "2.10.0+cu128"), ("t4", "2.13.0"),
    ("h100", "2.11.0+cu130"), ("rtx5090", "2.13.0"), ("rtx4090", "2.14.0+cu132"),
])
def test_torch_with_the_cards_kernels_is_quiet(card, version):
    assert _problems(card, version, "13.0" if "+" not in version else None) == []


def test_p40_with_pypi_torch_gets_a_fix_that_parses_and_has_sm_61():
    probs = _problems("p40", "2.13.0", "13.0")
    cmd = probs[0].split(": ", 1)[1] if probs[0].count(": ") else probs[0]
    m = re.search(r"(pip install .*?--index-url \S+)", probs[0])
    assert m, probs
    req, index = _pip_parts(m.group(1))
    assert req[0].name == "torch" and index.endswith("/cu126")
    newest = max(r for r in [(2, 14), (2, 15), (2, 13)] if req[0].specifier.contains(f"{r[0]}.{r[1]}.0"))
    assert compat.covers_nvidia(compat.family_targets("cu126", newest), "6.1"), cmd


def test_unknown_build_is_said_not_guessed():
    probs = _problems("p40", "2.13.0+cu999")
    assert len(probs) == 1 and "not in hwcompat's wheel table" in probs[0]


def test_other_vendor_and_cpu_builds():
    assert "cannot use an NVIDIA GPU" in _problems("m40", "2.13.0+cpu")[0]
    assert "cannot use an AMD GPU" in _problems("rx7900xt", "2.13.0", "13.0")[0]
    assert "cannot use an NVIDIA GPU" in _problems("a100", "2.13.0+rocm7.2", hip="7.2.26015")[0]


def test_detect_and_doctor_give_the_same_answer_for_the_same_list():
    """Doctor passes torch's own arch list; detect looks it up. Same list, same verdict, for every card."""
    for row in compat.wheel_table()["cuda"]:
        version = f"{row['torch']['max']}.0"
        from_table = compat.InstalledTorch.from_version(version, row["runtime"])
        from_torch = compat.InstalledTorch.from_arch_list(version, row["runtime"], None, row["targets"])
        for name, entry in __import__("hwcompat.probe.emulate", fromlist=["catalog"]).catalog().items():
            if entry["vendor"] == "nvidia":
                cc = entry["compute_capability"]
                assert compat.kernel_problem(from_table, "nvidia", cc, None) == \
                    compat.kernel_problem(from_torch, "nvidia", cc, None), (row["build"], name)


def test_wheel_table_rows_are_sourced_and_well_formed():
    for kind in ("cuda", "rocm"):
        for row in compat.wheel_table()[kind]:
            assert row["source"] and row["targets"] and row["build"], row
            pattern = r"sm_\d{2,3}|compute_\d{2,3}" if kind == "cuda" else r"gfx[0-9a-f]{3,4}"
            assert all(re.fullmatch(pattern, t) for t in row["targets"]), row
    for release in [(2, 1), (2, 7), (2, 9), (2, 13), (2, 14)]:
        assert compat.pypi_family(release), release


# --- AMD: native kernels from AMD's per-target wheels ----------------------------------------------

def _amd(gfx, name="AMD GPU"):
    from hwcompat.probe.emulate import parse_reading
    r = parse_reading({"vendor": "amd", "name": name, "gfx_target": gfx, "memory_bytes": 8 << 30}, "t")
    return replace(r, emulated=False, source="sysfs")


def test_rx6600_on_pytorch_rocm_wheel_runs_through_the_override():
    d = resolve_device(_amd("gfx1032"), PROFILES, Software.with_torch("2.13.0+rocm7.2", hip="7.2.26015"))
    assert d.problems == [] and d.profile.env["HSA_OVERRIDE_GFX_VERSION"] == "10.3.0"


def test_rx6600_with_native_amd_wheels_needs_no_override():
    torch = compat.InstalledTorch.from_version("2.13.0+rocm7.14.0", hip="7.14.0",
                                               device_packages=("gfx1030", "gfx1032"))
    d = resolve_device(_amd("gfx1032"), PROFILES, Software(torch=torch))
    assert d.problems == [] and "HSA_OVERRIDE_GFX_VERSION" not in d.profile.env
    assert "native gfx1032 kernels" in d.profile.reasons["env.HSA_OVERRIDE_GFX_VERSION"]


def test_native_device_packages_are_read_from_metadata(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "version.py").write_text("__version__ = '2.12.0+rocm7.14.0'\ncuda = None\nhip = '7.14.0'\n")
    for gfx in ("gfx1010", "gfx1032"):
        (tmp_path / f"amd_torch_device_{gfx}-2.12.0+rocm7.14.0.dist-info").mkdir()
    import importlib.machinery
    t = compat.installed(find_spec=lambda n: importlib.machinery.PathFinder.find_spec(n, [str(tmp_path)]))
    assert t.targets == ("gfx1010", "gfx1032") and "amd-torch-device" in t.targets_from


@pytest.mark.parametrize("gfx,supported,word", [
    ("gfx1010", True, "rdna1"), ("gfx1011", True, "rdna1"), ("gfx1012", True, "rdna1"),
    ("gfx1150", True, "rdna3"), ("gfx1151", True, "rdna3"), ("gfx1152", True, "rdna3"), ("gfx1153", True, "rdna3"),
    ("gfx1154", False, "rdna3"), ("gfx950", True, "cdna4"),
])
def test_newer_and_older_amd_targets_resolve_from_the_facts(gfx, supported, word):
    d = resolve_device(_amd(gfx), PROFILES, Software())
    assert d.arch == word and d.supported is supported, d.problems
    if not supported:
        assert "gfx1154" in d.problems[0]


def test_rdna1_on_pytorch_wheels_is_told_to_use_amds_wheels():
    d = resolve_device(_amd("gfx1010"), PROFILES, Software.with_torch("2.13.0+rocm7.2", hip="7.2.26015"))
    assert any("no kernels for gfx1010" in p and "torch[device-gfx1010]" in p for p in d.problems), d.problems


def test_gfx950_and_rdna35_need_rocm7():
    probs = resolve_device(_amd("gfx1151"), PROFILES, Software.with_torch("2.9.0+rocm6.4", hip="6.4.43482")).problems
    assert any("no kernels for gfx1151" in p for p in probs), probs
    assert resolve_device(_amd("gfx1151"), PROFILES, Software.with_torch("2.13.0+rocm7.2", hip="7.2.1")).problems == []


# --- every pip command hwcompat prints parses -----------------------------------------------------

def _pip_parts(cmd: str):
    """The requirements and the index of a `pip install …` command, as pip would read them."""
    words = shlex.split(cmd)
    assert words[:2] == ["pip", "install"] or words[:4] == ["python3", "-m", "pip", "install"], cmd
    words = words[words.index("install") + 1:]
    reqs, index, skip = [], None, False
    for i, w in enumerate(words):
        if skip:
            skip = False
            continue
        if w in ("--index-url", "--extra-index-url", "-e", "--find-links", "-r"):  # options with a value
            if w == "--index-url":
                index = words[i + 1]
            skip = True
            continue
        if w.startswith("-") or w.startswith((".", "/")):  # flags; local paths (pip install .)
            continue
        reqs.append(Requirement(w))  # raises InvalidRequirement for 'torch<=2.14.*'
    return reqs, index


def _every_profile_variant():
    for p in PROFILES.values():
        targets = list(p.match.gfx_targets) or [None]
        for v in p.variants:
            targets += list(v.match.gfx_targets)
        ccs = [None]
        if p.match.cc_min:
            ccs = [f"{p.match.cc_min[0]}.{p.match.cc_min[1]}", f"{p.match.cc_max[0]}.{p.match.cc_max[1]}"]
        for gfx in targets:
            for cc in ccs:
                yield p.for_device(p.vendor, cc, gfx)


def test_the_old_fix_was_not_pep440():
    from packaging.requirements import InvalidRequirement
    with pytest.raises(InvalidRequirement):
        Requirement("torch<=2.14.*")


def test_every_profile_install_command_parses():
    seen = set()
    for p in _every_profile_variant():
        cmd = p.torch.install_command()
        reqs, index = _pip_parts(cmd)
        assert len(reqs) == 1 and reqs[0].name == "torch" and index == p.torch.index_url, cmd
        assert "{" not in cmd, cmd
        seen.add(cmd)
    assert len(seen) > 10


def test_every_fix_doctor_and_detect_print_parses():
    from hwcompat.doctor import Stack, diagnose
    from hwcompat.readings import HostReading
    from hwcompat.resolve import resolve_host

    from hwcompat.probe.emulate import catalog

    cards = [n for n, e in catalog().items() if e["vendor"] != "cpu"]
    devs = tuple(_real(n) for n in cards) + (_amd("gfx1010"), _amd("gfx1152"))
    host = HostReading(devs + tuple(from_catalog(["cpu"])))
    for sw in (Software.with_torch("2.13.0", "13.0"), Software.with_torch("2.13.0+cpu")):
        plan = resolve_host(host, PROFILES, sw)
        printed = [p for d in plan.devices for p in d.problems]
        for stack in (Stack("2.13.0+cpu"), Stack("2.13.0", "13.0", None, ("sm_75", "sm_80", "sm_90"))):
            printed += [f.fix for f in diagnose(plan, stack, {})]
        cmds = [m.group(1) for text in printed for m in re.finditer(r"(pip install .*?)(?:\s{2,}|\s\(|$)", text)]
        assert cmds
        for cmd in cmds:
            _pip_parts(cmd)


def test_readme_pip_commands_parse():
    """Every pip command in the README's and docs' code (fenced blocks and `inline` spans)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    code = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    cmds = []
    for chunk in code:
        for line in chunk.splitlines():
            for part in re.split(r"&&|\|\||;", line):
                m = re.search(r"((?:python3 -m )?pip install .*)", part)
                if m:
                    cmd = re.split(r"\s{2,}|\s\(|\s#", m.group(1).strip())[0]
                    cmds.append(cmd[:-1] if cmd.endswith(")") and "(" not in cmd else cmd)  # "(pip install 'x')"
    assert len(cmds) >= 4, cmds
    for cmd in cmds:
        _pip_parts(cmd)


def test_detect_reports_p40_with_pypi_torch_without_importing_torch(tmp_path):
    """End to end: a P40 read through (a fake) NVML, the PyPI torch 2.13.0 files on sys.path, detect --json."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise RuntimeError('detect imported torch')\n")
    (site / "torch" / "version.py").write_text(PYPI_2_13)
    (site / "pynvml.py").write_text(textwrap.dedent("""
        from types import SimpleNamespace
        def nvmlInit(): pass
        def nvmlShutdown(): pass
        def nvmlSystemGetDriverVersion(): return "550.54.14"
        def nvmlSystemGetCudaDriverVersion(): return 12040
        def nvmlDeviceGetCount(): return 1
        def nvmlDeviceGetHandleByIndex(i): return i
        def nvmlDeviceGetName(h): return "Tesla P40"
        def nvmlDeviceGetCudaComputeCapability(h): return (6, 1)
        def nvmlDeviceGetMemoryInfo(h): return SimpleNamespace(total=24 * 2**30)
        def nvmlDeviceGetPciInfo(h): return SimpleNamespace(busId=b"00000000:01:00.0")
        def nvmlDeviceGetUUID(h): return "GPU-p40"
        def nvmlDeviceGetEnforcedPowerLimit(h): return 250000
        def nvmlDeviceGetCurrPcieLinkGeneration(h): return 3
        def nvmlDeviceGetCurrPcieLinkWidth(h): return 16
    """))
    code = textwrap.dedent("""
        import sys
        from hwcompat.probe import vendorlib
        vendorlib.gpu_vendors = lambda root="/": {"nvidia"}
        from hwcompat.cli import main
        rc = main(["detect", "--json"])
        assert "torch" not in sys.modules
        sys.exit(rc)
    """)
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    p40 = json.loads(res.stdout)["devices"][0]
    assert p40["name"] == "Tesla P40" and p40["arch"] == "pascal"
    hit = [p for p in p40["problems"] if "has no kernels for sm_61" in p]
    assert hit, p40["problems"]
    reqs, index = _pip_parts(re.search(r"(pip install .*?--index-url \S+)", hit[0]).group(1))
    assert index == "https://download.pytorch.org/whl/cu126" and reqs[0].specifier.contains("2.14.0")


def test_gfx906_runs_only_on_the_rocm63_wheels():
    """#36.9: ROCm >= 6.4's rocBLAS has no gfx906 library (ROCm/TheRock#1844), so the wheel rows from rocm6.4 on
    no longer claim gfx906 (old value: every rocm6.2.4-7.2 row), and the vega20 profile installs rocm6.3 torch <= 2.9."""
    import yaml

    from hwcompat.datafiles import data_dir
    from hwcompat.profiles import load_profiles

    rows = {r["build"]: r for r in yaml.safe_load((data_dir("catalog") / "wheels.yaml").read_text())["rocm"]}
    assert "gfx906" in rows["rocm6.3"]["targets"]
    assert all("gfx906" not in rows[b]["targets"] for b in ("rocm6.4", "rocm7.0", "rocm7.1", "rocm7.2"))
    vega = load_profiles()["vega20"]
    assert (vega.torch.build, vega.torch.max_version, vega.dtype.value) == ("rocm6.3", "2.9", "float16")


def test_a_current_amd_torch_is_known():
    """#36.10: torch 2.14 is on pytorch.org with ROCm 7.14 only; old: no row, so detect called it unknown, and the
    rocm7.2 row claimed 2.14."""
    from hwcompat.compat import lookup

    targets, source = lookup("2.14.0+rocm7.14.0", None, "7.14.25431")
    assert targets and {"gfx1103", "gfx950", "gfx1201"} <= set(targets) and "gfx906" not in targets
    assert "PR #194367" in source
    assert lookup("2.14.0+rocm7.2", None, "7.2.1")[0] is None
    assert lookup("2.13.0+rocm7.2", None, "7.2.1")[0]


VERSIONS = ["2.13.0", "2.13.0+cu130", "2.10.0a0", "2.10.0a0+git1234abc", "2.9.1+rocm6.4", "2.15.0.dev20261201+cpu",
            "13.2.1", "6.4.43482", "2.1", "v2.12.0", "12.6"]


@pytest.mark.parametrize("text", VERSIONS)
def test_one_release_parser_agrees_with_packaging(text):
    """#39 §2: the doctor, the resolver and the wheel table read a version's (major, minor) through one function,
    which agrees with packaging.version (detect cannot afford to import packaging within its 60 ms)."""
    from packaging.version import Version

    from hwcompat import doctor
    from hwcompat.resolve import decide as resolve

    want = Version(text).release[:2]
    assert compat.version_tuple(text) == Version(text).release
    assert compat.release(text) == want
    assert compat.InstalledTorch(text).release == want
    assert compat.major_minor(text) == want
    assert not hasattr(resolve, "_release") and doctor._vt is compat.version_tuple  # no second parser


@pytest.mark.parametrize("text", ["", None, "cuda", "2", "two.three"])
def test_a_release_that_is_not_a_version_is_none(text):
    assert compat.release(text) is None
