"""selftest on this machine's CPU for real, and on a GPU when there is one."""

import json

import pytest


def test_selftest_cpu(run_cli, tmp_path):
    out = tmp_path / "st.json"
    res = run_cli("selftest", "--json", "--steps", "20", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["passed"] and data["profile"] == "cpu"
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["kernels"]["ok"] and checks["finite"]["ok"] and checks["learns"]["ok"]
    assert checks["memory"]["ok"] is None  # no allocator statistics on the CPU
    assert data["tokens_per_s"] > 0 and data["achieved_tflops"] > 0 and data["mfu"] is None


def test_selftest_text_output(run_cli):
    res = run_cli("selftest", "--steps", "12", timeout=600)
    assert res.returncode == 0
    assert "PASS  kernels" in res.stdout and res.stdout.strip().endswith("PASS")


@pytest.mark.gpu
def test_selftest_gpu(run_cli, tmp_path):
    out = tmp_path / "st.json"
    res = run_cli("selftest", "--json", "--out", str(out), timeout=900)
    data = json.loads(out.read_text())
    assert res.returncode == 0 and data["passed"], res.stdout + res.stderr
    assert data["mfu"] is None or 0 < data["mfu"] < 1
