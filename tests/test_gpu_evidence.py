"""#26: bench/gpu_evidence.sh — the steps a lent GPU runs, checked end to end on the CPU with --smoke."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_evidence  # noqa: E402

CARD, PROFILE = "nvidia-h100-80gb-hbm3", "hopper"  # what the smoke run emulates


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    res = subprocess.run(["bash", "bench/gpu_evidence.sh", "--smoke", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    return out, res


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_smoke_writes_every_file_the_real_run_writes(smoke):
    out, res = smoke
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    expected = gpu_evidence.expected_files(CARD, PROFILE)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(expected)
    for name in expected:
        if name.endswith(".json"):
            assert isinstance(_load(out, name), dict), name
    report = _load(out, f"gpu-evidence-{CARD}.json")
    assert report["smoke"] and report["passed"]
    assert [s["step"] for s in report["steps"]] == [s.name for s in gpu_evidence.STEPS]
    assert all(s["exit_code"] == 0 for s in report["steps"] if s["step"] != "doctor"), report["steps"]
    table = (out / f"gpu-evidence-{CARD}.md").read_text()
    assert "| selftest | exit 0, PASS |" in table and "| recipe | exit 0, PASS |" in table


def test_smoke_selftest_and_path_runs_go_through_the_recipe_and_never_count_as_evidence(smoke):
    out, _ = smoke
    for name, profile, dtype in (("selftest-hopper", "hopper", "bfloat16"), ("path-maxwell", "maxwell", "float32"),
                                 ("path-pascal", "pascal", "float32"), ("path-volta", "volta", "float16"),
                                 ("path-turing", "turing", "float16"), ("path-ada", "ada", "bfloat16")):
        data = _load(out, f"{name}-{CARD}.json")
        assert data["passed"] and data["profile"] == profile and data["dtype"] == dtype, name
        assert data["recipe"].startswith("hwcompat train") and data["emulated"] is True
        assert data["memory_limit_gib"] == 0  # no caps on the CPU: nothing would enforce them


def test_smoke_recipe_interrupts_resumes_and_runs_dpo(smoke):
    out, _ = smoke
    r = _load(out, f"recipe-gpu-{CARD}.json")
    assert r["passed"] and r["smoke"]
    assert r["sft_sigterm"]["exit_code"] == 143 and r["sft_sigterm"]["said_how_to_resume"]
    assert r["sft_resume"]["history_continuous"] and r["sft_resume"]["learns"]
    assert r["sft_resume"]["steps"] == r["sft_sigterm"]["checkpoint_step"] + 8
    assert r["dpo"]["exit_code"] == 0 and r["dpo"]["reward_accuracy"] is not None


def test_smoke_stream_train_and_plan_benchmarks_ran_every_engine(smoke):
    out, _ = smoke
    stream = _load(out, f"stream-gpu-{CARD}.json")
    for case in stream["cases"].values():
        for engine in ("streamed", "qlora"):
            assert "step_seconds" in case[engine], case[engine]
            assert case[engine]["planned_allocated_bytes"] > 0
    train = _load(out, f"train-gpu-{CARD}.json")
    assert set(train["runs"]) == {"bfloat16", "float16"}
    for runs in train["runs"].values():
        assert runs["hwcompat"]["tokens_per_s_after_warmup"] > 0, runs
    plan = _load(out, f"plan-gpu-{CARD}.json")
    assert plan["smoke"] and all(r["predicted_bytes"] > 0 and r["measured_bytes"] is None for r in plan["rows"])


def test_budget_table_fits_ten_minutes_on_an_h100():
    """The budget table: every step's expected H100 time within its own limit, all of them within the budget."""
    assert gpu_evidence.BUDGET_S <= 600
    assert sum(s.h100_s for s in gpu_evidence.STEPS) <= gpu_evidence.BUDGET_S
    assert all(s.h100_s <= s.limit_s for s in gpu_evidence.STEPS)
    names = [s.name for s in gpu_evidence.STEPS]
    assert names[:4] == ["detect", "doctor", "selftest", "recipe"]  # value order: the shipped trainer first
    assert len(names) == len(set(names))


def _ctx(tmp_path, memory_gib: float, smoke: bool = False):
    return gpu_evidence.Ctx(py=sys.executable, out=tmp_path, card="card", profile="hopper", memory_gib=memory_gib,
                            smoke=smoke)


def test_a_path_the_card_is_too_small_for_is_skipped_with_the_reason(tmp_path):
    step = next(s for s in gpu_evidence.STEPS if s.name == "path-maxwell")
    rec = gpu_evidence.run_step(step, _ctx(tmp_path, 16.0), left_s=500)
    assert rec["exit_code"] is None and "under the 24 GiB of a Tesla M40 24GB" in rec["skipped"]
    assert "--memory-limit" in step.argv(_ctx(tmp_path, 80.0)) and "24" in step.argv(_ctx(tmp_path, 80.0))
    assert "--memory-limit" not in step.argv(_ctx(tmp_path, 80.0, smoke=True))


def test_a_path_needs_an_nvidia_card_and_bf16_silicon_for_a_bf16_family(tmp_path):
    from hwcompat.profiles import load_profiles

    profiles = load_profiles()
    for profile, _, _ in gpu_evidence.PATHS:
        assert (profiles[profile].dtype.value == "bfloat16") == (profile in gpu_evidence.BF16_PATHS), profile
    ada = next(s for s in gpu_evidence.STEPS if s.name == "path-ada")
    volta = next(s for s in gpu_evidence.STEPS if s.name == "path-volta")
    p40 = gpu_evidence.Ctx(py=sys.executable, out=tmp_path, card="p40", profile="pascal", memory_gib=24.0,
                           smoke=False, bf16=False)
    assert "lacks" in ada.needs(p40) and volta.needs(p40) == ""
    amd = gpu_evidence.Ctx(py=sys.executable, out=tmp_path, card="mi300", profile="cdna3", memory_gib=192.0,
                           smoke=False, vendor="amd")
    assert "NVIDIA family" in volta.needs(amd)


@pytest.mark.slow
def test_a_step_the_budget_has_no_room_for_is_skipped_and_a_slow_one_is_stopped(tmp_path):
    step = next(s for s in gpu_evidence.STEPS if s.name == "plan")
    assert "budget had 5 s left" in gpu_evidence.run_step(step, _ctx(tmp_path, 80.0), left_s=5)["skipped"]
    slow = gpu_evidence.Step("slow", (), 2, 1, 1, lambda c: [sys.executable, "-c", "import time; time.sleep(30)"])
    rec = gpu_evidence.run_step(slow, _ctx(tmp_path, 80.0), left_s=500)
    assert rec["exit_code"] == 124 and rec["seconds"] < 20


def test_pytest_summary_reads_junit_and_names_a_missing_file(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
                   '<testcase classname="t" name="a" time="1.5"/>'
                   '<testcase classname="t" name="b" time="0.1"><failure/></testcase></testsuite></testsuites>')
    s = gpu_evidence.pytest_summary(xml)
    assert (s["tests"], s["failures"]) == (2, 1) and s["cases"][1]["outcome"] == "failure"
    assert gpu_evidence.pytest_summary(tmp_path / "none.xml")["errors"] == 1


def test_a_gpu_run_whose_tests_all_skip_fails():
    """#36 §3: 0 ran of 12 on a card is torch not seeing the GPU, not a pass; on the CPU (--smoke) skips are expected."""
    assert gpu_evidence.all_skipped({"tests": 12, "skipped": 12}, smoke=False).startswith("every gpu test skipped")
    assert gpu_evidence.all_skipped({"tests": 12, "skipped": 12}, smoke=True) == ""
    assert gpu_evidence.all_skipped({"tests": 12, "skipped": 3}, smoke=False) == ""
    assert gpu_evidence.all_skipped({"tests": 0, "skipped": 0}, smoke=False) != ""
