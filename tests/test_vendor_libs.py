"""hwcompat against the real vendor packages from PyPI (amdsmi, nvidia-ml-py) on a host without their drivers.

Fakes cannot show what the real packages do at import: amdsmi 7.0.2 prints to stdout through file
descriptor 1 and raises KeyError when libamd_smi.so is missing; these tests run the real import.
"""

import json
import subprocess
import sys
import textwrap

import pytest



def _py(code: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env, **kw)


def _have(dist: str) -> bool:
    import importlib.metadata as md
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


needs_amdsmi = pytest.mark.skipif(not _have("amdsmi"), reason="the test extra installs amdsmi from PyPI")


@needs_amdsmi
def test_real_amdsmi_import_is_silent_and_one_line():
    res = _py("""
        from hwcompat.probe.vendorlib import quiet_import
        mod, err = quiet_import("amdsmi")
        import sys
        sys.stderr.write(repr((mod, err)))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # the real package prints two lines to fd 1 without this
    mod, err = eval(res.stderr)  # noqa: S307 (our own repr)
    assert mod is None and "libamd_smi.so" in err and "\n" not in err


@needs_amdsmi
def test_detect_json_is_json_with_real_amdsmi_and_an_amd_card_but_no_rocm(tmp_path):
    """An AMD card on the bus makes detect load amdsmi; its failure is a host problem, stdout stays JSON."""
    res = _py("""
        import sys
        from hwcompat.probe import vendorlib
        vendorlib.gpu_vendors = lambda root="/": {"amd"}
        from hwcompat.cli import main
        sys.exit(main(["detect", "--json"]))
    """)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    problems = data["host"]["problems"]
    assert any(p.startswith("amdsmi failed (KeyError: 'libamd_smi.so'") for p in problems), problems
    assert all("\n" not in p for p in problems)


@needs_amdsmi
@pytest.mark.parametrize("cmd", [["detect", "--json"], ["env"], ["doctor", "--json"]])
def test_machine_readable_outputs_stay_clean_with_real_amdsmi(run_cli, cmd):
    res = run_cli(*cmd, timeout=300)
    assert res.returncode in (0, 1), res.stderr
    if "--json" in cmd:
        json.loads(res.stdout)
    assert "libamd_smi" not in res.stdout


def test_stale_vendor_library_attribute_error_is_a_problem_not_a_traceback(tmp_path):
    """A libamd_smi.so older than the package: AttributeError (undefined symbol) at import, after printing."""
    (tmp_path / "amdsmi").mkdir()
    (tmp_path / "amdsmi" / "__init__.py").write_text(textwrap.dedent("""
        import os
        os.write(1, b"warning: library version mismatch\\n")
        raise AttributeError("/opt/rocm/lib/libamd_smi.so: undefined symbol: amdsmi_get_gpu_xgmi_link_status\\n"
                             "  second line of the message")
    """))
    res = _py("""
        import sys
        from hwcompat.probe import vendorlib
        vendorlib.gpu_vendors = lambda root="/": {"amd"}
        from hwcompat.cli import main
        sys.exit(main(["detect", "--json"]))
    """, env_extra={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    problems = json.loads(res.stdout)["host"]["problems"]
    hit = [p for p in problems if p.startswith("amdsmi failed (AttributeError: ")]
    assert hit and "undefined symbol" in hit[0] and "second line" in hit[0] and "\n" not in hit[0]
    assert "it printed: warning: library version mismatch" in hit[0]


def test_real_pynvml_without_a_driver_is_one_clear_problem():
    res = _py("""
        import json
        from hwcompat.probe import nvidia
        print(json.dumps(nvidia.probe(present=True)))
    """)
    assert res.returncode == 0, res.stderr
    readings, problems = json.loads(res.stdout)
    assert readings == [] and len(problems) == 1
    assert problems[0].startswith("NVIDIA GPU present but NVML failed to start (") and "\n" not in problems[0]


def test_real_pynvml_has_the_calls_the_probe_makes():
    import pynvml

    for name in ("nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion",
                 "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
                 "nvmlDeviceGetCudaComputeCapability", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPciInfo",
                 "nvmlDeviceGetUUID", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetCurrPcieLinkGeneration",
                 "nvmlDeviceGetCurrPcieLinkWidth"):
        assert callable(getattr(pynvml, name)), name


def test_no_vendor_library_is_loaded_without_its_hardware():
    res = _py("""
        import sys
        from hwcompat.probe import probe_host
        probe_host(sys_root="/nonexistent")
        print(sorted(m for m in ("pynvml", "amdsmi", "torch") if m in sys.modules))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_own_nvml_binding_makes_the_same_calls_as_pynvml():
    """hwcompat/probe/nvml.py binds a dozen NVML calls itself (pynvml's import costs 115 ms): same names."""
    import pynvml

    from hwcompat.probe.nvml import CALLS

    assert len(CALLS) >= 13
    for name in CALLS:
        assert callable(getattr(pynvml, name)), name


def test_own_nvml_binding_without_a_driver_falls_back_cleanly():
    from hwcompat.probe import nvidia
    from hwcompat.probe.nvml import NVML

    with pytest.raises(OSError):
        NVML("libnvidia-ml-that-does-not-exist.so.1")
    nvml, error = nvidia._bind()  # no driver here: our binding fails, pynvml imports, NVML init fails later
    assert (nvml is None) == (error is not None)
