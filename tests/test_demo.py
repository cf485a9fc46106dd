"""The README's main-job command, shortened: the real packaged model and the tiny fallback."""

import argparse
import json
import os

import pytest

from tests import cli

from hwcompat.cli.common import plan_from_args
from hwcompat.cli.detect import render_table


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _demo(tmp_path, cache_dir, *extra):
    return cli.run("demo", *extra, "max_steps=2", "eval_max_rows=4", "eval_max_new_tokens=8",
                   f"output_dir={tmp_path / 'demo'}", env={"HWCOMPAT_CACHE_DIR": str(cache_dir)}, timeout=900)


@pytest.mark.slow
def test_demo_real_model(tmp_path, cache_dir):
    res = _demo(tmp_path, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FALLBACK" not in res.stderr
    assert "\r" not in res.stderr  # redirected: no bar frames, the GGUF conversion's and weight loading's included
    table = render_table(plan_from_args(argparse.Namespace(emulate=None, emulate_file=None, profile=None, set=[])))
    header, row = table.splitlines()[:2]  # the device table (this machine's) comes before the run
    assert row in res.stderr and res.stderr.index(header) < res.stderr.index("training on")
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["steps"] == 2 and "field_f1" in summary["eval_after"]
    assert (cache_dir / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    cfg = json.loads((cache_dir / "models" / "smollm2-135m-instruct" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    _demo_report_in_chromium(tmp_path / "demo" / "report.html", tmp_path)


def _demo_report_in_chromium(page, tmp_path):
    """#27: the demo's report.html in a real headless Chromium: offline, no console error, every plot drawn."""
    from tests.browser import CHROMIUM, REQUIRE, checked_report as _checked

    html = page.read_text()
    assert "field_f1" in html and "finished: 2 steps" in html
    if CHROMIUM is None and not REQUIRE:
        pytest.skip("no chromium (apt-get install chromium); .ci/run installs it")
    plots = _checked(page, tmp_path, "demo-report.png")
    assert plots == {"loss": 2, "learning rate": 1, "tokens/s": 1, "memory (peak so far)": 1}


@pytest.mark.slow
def test_demo_tiny_fallback(tmp_path, cache_dir):
    res = _demo(tmp_path, cache_dir, "--tiny")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tiny model built from a config" in res.stderr


def test_demo_never_replaces_a_users_run(tmp_path, cache_dir):
    run = tmp_path / "demo"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"my week of training")
    (run / "run.json").write_text(json.dumps({"config": {}, "origins": {"train_data": "config file"}}))
    res = _demo(tmp_path, cache_dir, "--tiny")
    assert res.returncode == 2 and "already holds a run" in res.stderr, res.stderr[-2000:]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"my week of training"


def _demo_in(cwd, cache_dir, *extra):
    return cli.run("demo", "--tiny", *extra, "eval_max_rows=4", "eval_max_new_tokens=8",
                   env={"HWCOMPAT_CACHE_DIR": str(cache_dir)}, timeout=900, cwd=cwd)


@pytest.mark.slow
def test_demo_dpo_stage_starts_from_the_sft_adapter(tmp_path, cache_dir):
    res = _demo_in(tmp_path, cache_dir, "--dpo")
    assert res.returncode == 2 and "run `hwcompat demo` first" in res.stderr
    assert _demo_in(tmp_path, cache_dir, "max_steps=2").returncode == 0
    res = _demo_in(tmp_path, cache_dir, "--dpo", "max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "demo-dpo" / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["steps"] == 2
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the reference is the SFT model itself
    assert {"reward_accuracy", "field_f1"} <= set(after) and "regressed" in summary
    spec = json.loads((tmp_path / "runs" / "demo-dpo" / "run.json").read_text())
    assert spec["config"]["init_adapter"] == str(tmp_path / "runs" / "demo" / "adapter")


@pytest.mark.slow
def test_demo_grpo_stage_starts_from_the_sft_adapter(tmp_path, cache_dir):
    """#37: the third stage, rewarded by the task's metrics against each row's answer."""
    res = _demo_in(tmp_path, cache_dir, "--grpo")
    assert res.returncode == 2 and "run `hwcompat demo` first" in res.stderr
    assert _demo_in(tmp_path, cache_dir, "max_steps=2").returncode == 0
    res = _demo_in(tmp_path, cache_dir, "--grpo", "max_steps=2", "max_completion_length=8", "num_generations=2",
                   "micro_batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "demo-grpo" / "summary.json").read_text())
    assert summary["objective"] == "grpo" and summary["steps"] == 2
    assert {"reward", "reward_field_f1", "reward_json_valid", "field_f1"} <= set(summary["eval_after"])
    spec = json.loads((tmp_path / "runs" / "demo-grpo" / "run.json").read_text())
    assert spec["config"]["init_adapter"] == str(tmp_path / "runs" / "demo" / "adapter")
    assert spec["config"]["rewards"] == ["field_f1", "json_valid"]
    assert _demo_in(tmp_path, cache_dir, "--grpo", "--dpo").returncode == 2


def _cli(cache_dir, *args, cwd=None):
    return cli.run(*args, env={"HWCOMPAT_CACHE_DIR": str(cache_dir)}, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_print_model_says_where_the_demo_model_is_and_a_config_can_name_it(tmp_path, cache_dir):
    """#27 newcomer item: the demo's model is printed (one line, stdout) and a user's own config names it."""
    from hwcompat.cli.demo import DEMO_MODEL

    res = _cli(cache_dir, "demo", "--print-model")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == f"{cache_dir / 'models' / 'smollm2-135m-instruct'}\n"
    assert (cache_dir / "models" / "smollm2-135m-instruct" / "model.safetensors").exists()
    demo_data = os.path.join(os.path.dirname(__file__), "..", "hwcompat", "demo", "data")
    (tmp_path / "c.yaml").write_text(f"model: {DEMO_MODEL}\ntrain_data: [{demo_data}/train.jsonl]\n"
                                     f"eval_data: [{demo_data}/eval.jsonl]\nmax_steps: 1\nmax_seq_len: 128\n"
                                     "eval_at_start: false\neval_metrics: none\nmicro_batch_size: 2\n"
                                     f"output_dir: {tmp_path / 'run'}\n")
    planned = _cli(cache_dir, "plan", str(tmp_path / "c.yaml"))  # plan names it too, without importing torch
    assert planned.returncode == 0 and "smollm2-135m-instruct" in planned.stdout, planned.stderr[-2000:]
    trained = _cli(cache_dir, "train", str(tmp_path / "c.yaml"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["model"] == res.stdout.strip()


@pytest.mark.slow
def test_a_demo_model_not_prepared_yet_is_named_with_the_command_that_prepares_it(tmp_path):
    cache = tmp_path / "empty-cache"
    (tmp_path / "c.yaml").write_text("model: demo:tiny\n")
    res = _cli(cache, "plan", str(tmp_path / "c.yaml"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model: demo:tiny is not prepared yet; `hwcompat demo --print-model --tiny` prepares it" in res.stderr
    hint = res.stderr.split("`")[1].split()
    printed = _cli(cache, *hint[1:])  # the command, as printed
    assert printed.returncode == 0 and printed.stdout.strip() == str(cache / "models" / "tiny-demo")
    again = _cli(cache, "plan", str(tmp_path / "c.yaml"))
    assert again.returncode == 0, again.stderr[-2000:]


def test_an_unknown_demo_name_lists_the_names(tmp_path):
    (tmp_path / "c.yaml").write_text("model: demo:llama\ntrain_data: [t.jsonl]\n")
    res = _cli(tmp_path / "cache", "train", str(tmp_path / "c.yaml"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ("model: 'demo:llama' is not a demo model; the names are demo:smollm2-135m-instruct (SmolLM2-135M-Instruct"
            in res.stderr)
