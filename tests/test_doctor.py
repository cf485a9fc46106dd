"""Every doctor check driven by data: emulated devices plus fake installed-software facts."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from hwcompat.compat import covers_nvidia
from hwcompat.doctor import Stack, diagnose
from hwcompat.probe.emulate import from_catalog, parse_reading
from hwcompat.profiles import load_profiles
from hwcompat.readings import HostReading
from hwcompat.resolve import resolve_host
from hwcompat.software import Software

CU126 = Stack("2.13.0+cu126", "12.6", None, ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"))
CU130 = Stack("2.13.0+cu130", "13.0", None, ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"))
ROCM = Stack("2.13.0+rocm7.2", None, "7.2.26015", ("gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx950",
                                                   "gfx1030", "gfx1100", "gfx1101", "gfx1102", "gfx1150", "gfx1151",
                                                   "gfx1200", "gfx1201"))


def _plan(*names, readings=()):
    devs = list(from_catalog(list(names))) + list(readings)
    devs = [replace(d, emulated=False) for d in devs]
    return resolve_host(HostReading(tuple(devs) + tuple(from_catalog(["cpu"]))), load_profiles(), Software())


def _find(findings, check, severity=None):
    hits = [f for f in findings if f.check == check and (severity is None or f.severity == severity)]
    assert hits, [(f.severity, f.check, f.message) for f in findings]
    return hits[0]


def test_cu130_wheel_on_m40_has_no_kernels():
    f = _find(diagnose(_plan("m40"), CU130, {}), "kernels", "error")
    assert "no kernels for sm_52" in f.message and "no kernel image is available" in f.message
    assert f.fix.startswith("pip install 'torch<2.15' --index-url https://download.pytorch.org/whl/cu126")


def test_cu126_wheel_on_m40_is_fine():
    findings = diagnose(_plan("m40"), CU126, {})
    assert _find(findings, "kernels").severity == "ok"
    assert not [f for f in findings if f.severity == "error"]


@pytest.mark.parametrize("arch,cc,ok", [
    (("sm_80",), "8.6", True),   # same major, lower minor: binary compatible
    (("sm_86",), "8.0", False),  # a newer minor does not run on an older one
    (("sm_90",), "12.0", False),
    (("compute_90",), "12.0", True),  # PTX JIT forward
    (("sm_50", "sm_60"), "6.1", True),
])
def test_arch_coverage_rules(arch, cc, ok):
    assert covers_nvidia(arch, cc) is ok


def test_old_driver_is_blocking():
    m40 = replace(from_catalog(["m40"])[0], driver_version="470.256.02")
    f = _find(diagnose(_plan(readings=[m40]), CU126, {}), "driver", "error")
    assert "driver 470.256.02 is older than 525.60.13" in f.message


def test_torch_too_new_for_pascal():
    stack = replace(CU126, torch_version="2.15.0+cu126")
    f = _find(diagnose(_plan("p40"), stack, {}), "torch_version", "error")
    assert "newer than 2.14" in f.message


def test_cpu_torch_on_gpu_host():
    f = _find(diagnose(_plan("rtx4090"), Stack("2.13.0+cpu"), {}), "torch_build", "error")
    assert "is a CPU build" in f.message and "cu130" in f.fix


def test_bitsandbytes_on_maxwell_warns_before_the_run_does():
    f = _find(diagnose(_plan("m40"), replace(CU126, bitsandbytes="0.48.0"), {}), "bitsandbytes", "warning")
    assert "QLoRA will fail here" in f.message and "sm_60" in f.message


def test_flash_attn_on_turing_is_unused():
    f = _find(diagnose(_plan("t4"), replace(CU126, flash_attn="2.8.3"), {}), "flash_attn")
    assert f.severity == "info" and "does not run on this card" in f.message


def test_rdna2_override_missing_wrong_and_needless():
    plan = _plan("rx6600")
    assert _find(diagnose(plan, ROCM, {}), "gfx_override").severity == "warning"
    f = _find(diagnose(plan, ROCM, {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}), "gfx_override", "error")
    assert "needs 10.3.0" in f.message and f.fix == "export HSA_OVERRIDE_GFX_VERSION=10.3.0"
    assert _find(diagnose(plan, ROCM, {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}), "kernels").severity == "ok"
    f = _find(diagnose(_plan("rx7900xt"), ROCM, {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}), "gfx_override", "warning")
    assert "needs no override" in f.message


def test_apu_without_wheel_kernels_is_sent_to_native_wheels_not_a_hanging_override():
    apu = parse_reading({"vendor": "amd", "name": "Radeon 780M", "gfx_target": "gfx1103", "memory_bytes": 1 << 30}, "t")
    f = _find(diagnose(_plan(readings=[apu]), ROCM, {}), "kernels", "error")
    assert "no kernels for gfx1103" in f.message and "whl/rocm7.14" in f.fix and "HSA_OVERRIDE" not in f.fix  # #36.10
    assert not [x for x in diagnose(_plan(readings=[apu]), ROCM, {}) if x.check == "gfx_override"]


def test_known_bad_target_blocks():
    """gfx1033 on the pytorch.org wheels: no kernels, and the fix is AMD's native gfx1033 wheel (#23.3), never
    the override that gave wrong gradients."""
    deck = parse_reading({"vendor": "amd", "name": "AMD Custom GPU 0405", "gfx_target": "gfx1033",
                          "memory_bytes": 1 << 30}, "t")
    f = _find(diagnose(_plan(readings=[deck]), ROCM, {}), "kernels", "error")
    assert "gfx1033" in f.message and "torch[device-gfx1033]" in f.fix and "HSA_OVERRIDE" not in f.fix


def test_cuda_wheel_on_amd_card():
    assert "not a ROCm build" in _find(diagnose(_plan("mi300x"), CU130, {}), "torch_build", "error").message


def test_environment_checks():
    plan = _plan("m40", "rtx3090")
    env = {"CUDA_VISIBLE_DEVICES": "1", "PYTORCH_CUDA_ALLOC_CONF": "backend:native"}
    findings = diagnose(plan, CU126, env, shm_bytes=64 << 20, in_container=True)
    assert "torch sees only those" in _find(findings, "visible_devices").message
    assert _find(findings, "device_order").fix == "export CUDA_DEVICE_ORDER=PCI_BUS_ID"
    assert "--ipc=host" in _find(findings, "shm").fix
    assert "differs from the profile's expandable_segments:True" in _find(findings, "allocator").message
    # the right order and a big /dev/shm outside a container: none of these
    quiet = diagnose(plan, CU126, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, shm_bytes=64 << 20, in_container=False)
    assert not [f for f in quiet if f.check in ("device_order", "shm", "visible_devices")]


def test_doctor_on_this_machine_for_real(run_cli):
    res = run_cli("doctor", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] and data["stack"]["torch_version"].startswith("2.")
    assert data["stack"]["torch_cuda"] is None  # the CPU build, as installed by .ci/run
    assert any(f["check"] == "cpu" and f["severity"] == "ok" for f in data["findings"])


def test_doctor_exit_code_with_blocking_problem(run_cli):
    res = run_cli("doctor", "--emulate", "m40")
    assert res.returncode == 1 and "ERROR" in res.stdout and "fix: pip install" in res.stdout


def test_doctor_never_touches_a_device():
    code = ("import torch, hwcompat.doctor as d; s = d.gather_stack(); "
            "print(torch.cuda.is_initialized() if hasattr(torch.cuda, 'is_initialized') else False)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr


# --- #36.11: the transformers floor -----------------------------------------------------------------------------

def test_transformers_before_4_56_is_an_error_and_pyproject_says_the_same_floor():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    from hwcompat import doctor

    old = doctor._transformers_finding(doctor.Stack(transformers="4.46.3"))
    assert old.severity == "error" and "ignores from_pretrained(dtype=" in old.message
    assert Requirement(old.fix.split(" ", 2)[2].strip("'")).specifier.contains("4.56.0")
    assert doctor._transformers_finding(doctor.Stack(transformers="4.56.0")).severity == "ok"
    assert doctor._transformers_finding(doctor.Stack(transformers="5.25.0")).severity == "ok"
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in deps["optional-dependencies"]["train"]]
    spec = next(r.specifier for r in reqs if r.name == "transformers")
    assert str(spec) == f">={doctor.TRANSFORMERS_FLOOR}"  # one floor, said in both places
