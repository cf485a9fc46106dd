"""`hwcompat detect` / `env` end to end, and the bad-input messages users read."""

import json

import pytest

from tests import cli

from hwcompat.cli import main


def test_detect_json_subprocess(run_cli):
    """The documented JSON shape, from a real process."""
    res = run_cli("detect", "--json", "--emulate", "m40,rx6600")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert set(data) >= {"host", "devices"} and data["host"]["problems"] == []
    m40, rx, cpu = data["devices"]
    assert {k: m40[k] for k in ("index", "vendor", "name", "arch", "compute_capability", "gfx_target",
                                "memory_bytes", "supported", "problems")} == {
        "index": 0, "vendor": "nvidia", "name": "Tesla M40 24GB", "arch": "maxwell", "compute_capability": "5.2",
        "gfx_target": None, "memory_bytes": 25769803776, "supported": True, "problems": []}
    p = m40["profile"]
    assert (p["name"], p["dtype"], p["attention"], p["compile_backend"], p["torch_build"], p["image"]) == (
        "maxwell", "float32", "sdpa", "eager", "cu126", "hwcompat:maxwell")
    assert p["env"]["TORCHDYNAMO_DISABLE"] == "1" and p["quantization"] == []
    assert set(p["reasons"]) >= {"dtype", "attention", "compile_backend"}
    assert rx["gfx_target"] == "gfx1032" and rx["profile"]["env"]["HSA_OVERRIDE_GFX_VERSION"] == "10.3.0"
    assert cpu["vendor"] == "cpu" and cpu["arch"] == "cpu"


def test_detect_without_gpus_lists_only_the_cpu(run_cli):
    res = run_cli("detect", "--json")
    data = json.loads(res.stdout)
    assert [d["vendor"] for d in data["devices"]] == ["cpu"]


def test_detect_table_and_explain(capsys):
    assert main(["detect", "--emulate", "p40,p40,k80", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["#", "NAME", "ARCH", "CAP", "MEMORY", "DTYPE", "ATTENTION", "COMPILE", "IMAGE",
                                "EVIDENCE", "STATUS"]
    assert lines[1].split()[-2:] == ["emulated", "ok"]  # no real-card selftest result yet
    assert lines[1].split()[:4] == ["0", "Tesla", "P40", "pascal"]
    assert "unsupported" in lines[3]
    assert "why dtype: no bf16, and sm_61 runs fp16 at 1/64" in out
    assert "Devices 0, 1 (pascal) can train together" in out


def test_detect_env_var_emulation(run_cli):
    res = run_cli("detect", "--json", env={"HWCOMPAT_EMULATE": "rtx4090"})
    assert json.loads(res.stdout)["devices"][0]["arch"] == "ada"


def test_env_shells(capsys):
    assert main(["env", "--emulate", "m40"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "export TORCHDYNAMO_DISABLE=1", "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "export CUDA_DEVICE_ORDER=PCI_BUS_ID"]
    assert main(["env", "--emulate", "rx6600,rx6600", "--device", "amd:1", "--shell", "fish"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "set -gx TORCHDYNAMO_DISABLE 1;", "set -gx HSA_OVERRIDE_GFX_VERSION 10.3.0;", "set -gx HIP_VISIBLE_DEVICES 1;"]
    assert main(["env", "--emulate", "t4", "--shell", "dotenv", "--set", "env.PYTORCH_CUDA_ALLOC_CONF=a b"]) == 0
    assert 'PYTORCH_CUDA_ALLOC_CONF="a b"' in capsys.readouterr().out  # dotenv readers need the quotes


def test_env_eval_in_bash(run_cli, tmp_path):
    """eval "$(hwcompat env)" works and changes nothing in hwcompat's own process."""
    import subprocess
    import sys
    script = f'eval "$({sys.executable} -m hwcompat env --emulate rx6600)"; echo "$HSA_OVERRIDE_GFX_VERSION"'
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert res.stdout.strip() == "10.3.0", res.stderr


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


BAD_FILES = [
    ("- vendor: nvidia\n  name: X\n  memory_bytes: 1\n",
     "entry 1: field 'compute_capability': missing (required for NVIDIA, e.g. \"6.1\")"),
    ("- vendor: nvidia\n  name: X\n  memory_bytes: lots\n  compute_capability: '6.1'\n",
     "entry 1: field 'memory_bytes': expected an integer, got 'lots'"),
    ("- vendor: nvidia\n  name: X\n  memory_bytes: 1\n  compute_capability: 6.1\n",
     "entry 1: field 'compute_capability': expected a string, got 6.1 (write it quoted: \"6.1\")"),
    ("- {vendor: amd, name: X, memory_bytes: 1, gfx_target: gfx1032}\n- {vendor: matrox, name: G200, memory_bytes: 1}\n",
     "entry 2: field 'vendor': 'matrox' is not one of: nvidia, amd, intel, cpu"),
    ("- {vendor: intel, name: Arc, memory_bytes: 1}\n",
     "entry 1: field 'xe_arch': expected one of xe-hpg, xe2-hpg"),
    ("- {vendor: amd, name: X, memory_bytes: 1}\n",
     "entry 1: field 'gfx_target': missing (required for AMD, e.g. \"gfx1031\")"),
    ("- {vendor: amd, name: X, memory_bytes: 1, gfx_target: navi23}\n",
     "entry 1: field 'gfx_target': expected a gfx target like \"gfx1031\", got 'navi23'"),
    ("- {vendor: nvidia, name: X, memory: 1, compute_capability: '6.1'}\n",
     "entry 1: field 'memory': unknown key (did you mean 'memory_bytes'?)"),
    ("- {vendor: nvidia, name: X}\n", "entry 1: missing required key 'memory_bytes' (required: vendor, name, memory_bytes)"),
    ("vendor: nvidia\n", "expected a non-empty YAML list of devices (- vendor: nvidia\n  name: ...), got dict"),
    ("- [unclosed\n", ":2: not valid YAML"),
    # #35 family 11: readings no probe could return
    ("- {vendor: intel, name: A770, memory_bytes: 17179869184, xe_arch: xe2-hpg, pci_device_id: '56a0'}\n",
     "entry 1: field 'xe_arch': 'xe2-hpg', but PCI ID 56a0 is xe-hpg (catalog/intel.yaml"),
    ("- {vendor: intel, name: B580, memory_bytes: 12884901888, xe_arch: xe2-hpg, compute_capability: '8.6'}\n",
     "entry 1: field 'compute_capability': only NVIDIA readings have it, and this is vendor: intel"),
    ("- {vendor: nvidia, name: X, memory_bytes: 1, compute_capability: '8.6', gfx_target: gfx1030}\n",
     "entry 1: field 'gfx_target': only AMD readings have it, and this is vendor: nvidia"),
    ('- {vendor: nvidia, name: "\\e[31mRED\\e[0m", memory_bytes: 1, compute_capability: "8.6"}\n',
     "entry 1: field 'name': holds control characters"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m[:30] for _, m in BAD_FILES])
def test_bad_emulate_file(tmp_path, capsys, text, message):
    f = tmp_path / "devices.yaml"
    f.write_text(text)
    code, err = _err(capsys, ["detect", "--emulate-file", str(f)])
    assert code == 2
    assert err.startswith(f"hwcompat: error: emulate file {f}")
    assert message in err


def test_emulate_file_good(tmp_path, capsys):
    f = tmp_path / "devices.yaml"
    f.write_text("- {vendor: nvidia, name: Quadro M6000, memory_bytes: 12884901888, compute_capability: '5.2'}\n")
    assert main(["detect", "--json", "--emulate-file", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["devices"][0]["arch"] == "maxwell"


def test_a_probed_name_with_a_terminal_escape_is_shown_escaped():
    from hwcompat.cli.detect import printable

    assert printable("Arc\x1b[2J B580\x9b") == "Arc\\x1b[2J B580\\x9b"


def test_missing_emulate_file(capsys, tmp_path):
    assert _err(capsys, ["detect", "--emulate-file", str(tmp_path / "nope.yaml")]) == (
        2, f"hwcompat: error: emulate file {tmp_path / 'nope.yaml'}: not found")


def test_unknown_catalog_name(capsys):
    code, err = _err(capsys, ["detect", "--emulate", "m41"])
    assert code == 2 and err.startswith("hwcompat: error: unknown device 'm41' for --emulate. Did you mean 'm40'?")


def test_unknown_profile_and_set_key(capsys):
    assert _err(capsys, ["detect", "--emulate", "a100", "--profile", "nope"])[0] == 2
    code, err = _err(capsys, ["detect", "--emulate", "a100", "--set", "dtype"])
    assert (code, err) == (2, "hwcompat: error: --set 'dtype': expected KEY=VALUE, e.g. --set dtype=float32")


def test_bf16_on_v100_exit_code(run_cli):
    res = run_cli("detect", "--emulate", "v100", "--set", "dtype=bfloat16")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "has no bf16 hardware" in res.stderr


def test_bad_device_selection(capsys):
    code, err = _err(capsys, ["env", "--emulate", "t4", "--device", "5"])
    assert code == 2 and "no such device; this host has: 0 (nvidia:0 Tesla T4), 1 (cpu:0" in err


def test_env_for_unsupported_device(capsys):
    code, err = _err(capsys, ["env", "--emulate", "k80"])
    assert code == 1 and "no profile to apply" in err


def test_bad_hwcompat_emulate_names_the_variable(run_cli):
    res = run_cli("detect", env={"HWCOMPAT_EMULATE": "nonsense"})
    assert res.returncode == 2 and "unknown device 'nonsense' for HWCOMPAT_EMULATE." in res.stderr


def test_detect_to_a_full_disk_is_a_clear_error():
    import subprocess

    with open("/dev/full", "w") as full:
        res = subprocess.run(cli.argv("detect", "--json"), stdout=full, stderr=subprocess.PIPE, text=True,
                             env=cli.clean_env())
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "cannot write the output" in res.stderr and "No space left" in res.stderr
