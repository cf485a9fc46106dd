"""#27 newcomer items: every hint a message prints runs, and --help says what a user needs (each hint executed)."""

import re
import shlex

import pytest
import yaml

from hwcompat.train.config import TrainConfig


def test_the_unknown_key_hint_runs_and_lists_every_key_with_its_default(run_cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "train_data": ["t.jsonl"], "learning_rat": 1}))
    res = run_cli("train", str(cfg))
    assert res.returncode == 2 and "did you mean 'learning_rate'?" in res.stderr
    hint = re.search(r"`(hwcompat [^`]+)`", res.stderr).group(1)
    helped = run_cli(*shlex.split(hint)[1:])  # the command the message names, as printed
    assert helped.returncode == 0, helped.stderr
    text = " ".join(helped.stdout.split())
    for name in TrainConfig.__dataclass_fields__:
        assert re.search(rf"\b{name}=", text), name
    assert "learning_rate=0.0002" in text and "lora_target_modules=[all-linear]" in text


def test_data_check_help_says_what_file_is_and_that_token_checks_need_a_tokenizer(run_cli):
    res = run_cli("data", "check", "--help")
    text = " ".join(res.stdout.split())
    assert res.returncode == 0
    assert ("FILE training data: prompt/completion, messages (chat), ShareGPT or alpaca rows (with --method dpo "
            "preference pairs) in JSONL, gzip (.jsonl.gz, .csv.gz, .tsv.gz), CSV/TSV, Parquet, Arrow or a datasets "
            "save_to_disk folder") in text  # #40 §5: not "JSONL" only
    assert "Without --tokenizer only the text checks run" in text


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so_touches_nothing_and_its_hint_trains_on(tmp_path, tiny_model, task_files,
                                                                                  run_cli):
    import json

    from tests.train.conftest import make_config

    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=4, checkpoint_every=2, eval_at_start=False,
                      eval_metrics="none")
    assert run_cli("train", str(cfg), timeout=300).returncode == 0
    run = tmp_path / "run"
    def state():  # every file but the folder lock, which each command takes
        return {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".hwcompat.lock"}

    before = state()
    metrics = (run / "metrics.jsonl").read_text()
    res = run_cli("train", str(run / "config.yaml"), "--resume", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"hwcompat: the run in {run} finished at step 4 (summary.json): nothing to resume" in res.stderr
    assert "error" not in res.stderr
    assert state() == before  # nothing redone, nothing rewritten
    assert (run / "metrics.jsonl").read_text() == metrics
    hint = res.stderr.split("give it more steps: ", 1)[1].strip()
    again = run_cli(*shlex.split(hint)[1:], timeout=300)  # the printed command, run as printed
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_a_plain_detect_shows_the_real_cpu_as_verified_by_a_committed_selftest(run_cli):
    """The CPU row is real hardware, and a real selftest on a CPU is committed: not 'emulated'."""
    import json
    from pathlib import Path

    data = json.loads(run_cli("detect", "--json").stdout)
    cpu = next(d for d in data["devices"] if d["vendor"] == "cpu")
    assert cpu["profile"]["evidence"] == "verified"
    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    real = [json.loads(f.read_text()) for f in results.glob("selftest-cpu-*.json")]
    assert any(r["passed"] and not r["emulated"] and r["recipe"].startswith("hwcompat train") for r in real)
