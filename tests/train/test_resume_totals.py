"""#40 §3: a resumed run's summary and report are the whole run's: "done: N steps in T s" counted only the part
after the resume, and the memory curve dropped at the resume."""

import json

import pytest

from tests.train.conftest import make_config, sigterm_site


@pytest.mark.slow
def test_a_resumed_runs_totals_are_the_whole_runs(tmp_path, tiny_model, task_files, run_cli):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=8, eval_metrics="none", eval_at_start=False)
    site = sigterm_site(tmp_path / "site")
    first = run_cli("train", str(cfg), env={"PYTHONPATH": str(site), "TEST_SIGTERM_AT_STEP": "4"}, timeout=600)
    assert first.returncode == 143, first.stderr[-2000:]
    run = tmp_path / "run"
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    part1 = next(r for r in reversed(before) if r["kind"] == "train")
    again = run_cli("train", str(run / "config.yaml"), "--resume", timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    summary = json.loads((run / "summary.json").read_text())
    after = train[-1]
    assert summary["resumes"] == 1
    assert summary["train_seconds"] == pytest.approx(after["train_seconds"], rel=0.2)
    assert summary["train_seconds"] > part1["train_seconds"]  # old: the resumed part alone, from 0
    assert after["tokens"] > part1["tokens"] and train[4]["train_seconds"] > part1["train_seconds"]
    memory = [r["memory_bytes"] for r in train]
    assert memory == sorted(memory)  # "peak so far" never drops, across the resume too
    assert f"done: 8 steps in {summary['train_seconds']:.1f}s" in again.stderr
