"""`hwcompat generate` and `hwcompat eval` on a finished tiny run: the adapter answers, metrics side by side."""

import json

import pytest

from tests import cli
from tests.train.conftest import make_config, task_rows, write_jsonl


def _cli(*args, timeout=300):
    return cli.run(*args, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("inspect")
    train = write_jsonl(tmp / "train.jsonl", task_rows(160, 1))
    evals = write_jsonl(tmp / "eval.jsonl", task_rows(24, 2))
    # fp32 whatever the CPU's default: the batched measures below equal the one-at-a-time ones to 1e-4 in fp32; with
    # a bf16 base, left padding changes the GEMMs' shapes and so their rounding (~3% of a random model's KL)
    res = _cli("train", make_config(tmp, tiny_model, train, evals, max_steps=100, learning_rate=0.005,
                                    dtype="float32"))
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp / "run", evals


@pytest.mark.slow
def test_generate_answers_with_the_adapter(finished_run):
    run, _ = finished_run
    res = _cli("generate", run, "What color is the lemon?", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "yellow"


@pytest.mark.slow
def test_generate_from_a_file_prints_jsonl(finished_run, tmp_path):
    run, _ = finished_run
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What color is the sky?"},
                                                 {"messages": [{"role": "user", "content": "What color is the frog?"}]}])
    res = _cli("generate", run, "--file", prompts, "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["What color is the sky?", "What color is the frog?"]
    assert all(r["output"] in {"red", "yellow", "green", "blue"} for r in rows), rows  # the task's answers
    single = _cli("generate", run, "What color is the frog?", "--max-new-tokens", "4").stdout.strip()
    assert rows[1]["output"] == single  # one prompt or a file: the same rendering


@pytest.mark.slow
def test_eval_reports_base_and_adapter_side_by_side(finished_run):
    run, evals = finished_run
    res = _cli("eval", run, "--data", evals)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["adapted"]["accuracy"] > out["base"]["accuracy"] + 0.3
    assert out["adapted"]["eval_loss"] < out["base"]["eval_loss"]
    assert "metric" in res.stderr and "adapted" in res.stderr
    assert "Skipping publisher trust check" not in res.stderr  # #40 §5: noise on every run
    # redirected: no bar frames; generation that takes under 30 s says nothing (tests/train/test_progress.py)
    assert "\r" not in res.stderr and "task metrics (generating)" not in res.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "{run}"], "give one prompt, or --file prompts.jsonl"),
    (["generate", "{run}", "hi", "--temperature", "-1"], "--temperature >= 0"),
    (["eval", "{run}", "--data", "/nope.jsonl"], "--data /nope.jsonl: not found"),
    (["generate", "/nope", "hi"], "/nope: not a run folder"),
])
def test_mistakes_are_clear(finished_run, args, message):
    run, _ = finished_run
    res = _cli(*[a.format(run=run) for a in args], timeout=60)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_eval_general_measures_forgetting_and_keeps_it(finished_run):
    run, _ = finished_run
    res = _cli("eval", run, "--general")
    assert res.returncode == 0, res.stderr[-2000:]
    g = json.loads(res.stdout)["general"]
    assert g["prompts"] == 100 and g["tokens"] > 100
    assert g["kl_per_token"] > 0  # the adapter moved the model; the base's answers became less likely under it
    assert g["base_answers_logp_per_token"]["adapted"] < g["base_answers_logp_per_token"]["base"] <= 0
    assert json.loads((run / "summary.json").read_text())["forgetting"] == g
    assert "KL(adapted||base)" in res.stderr
    # what the number means: the base itself, quantisation, the demo's adapter (catalog/forgetting.yaml)
    assert ("scale: 0 is the base itself; quantising the demo model moves it 0.0005 (q8_0) and 0.0218 (q4_k_m); the "
            "demo's 40-step SFT adapter measures 0.0844") in res.stderr
    assert ("warning:" in res.stderr) == (g["kl_per_token"] > 0.1)


def test_eval_needs_something_to_measure(finished_run):
    res = _cli("eval", finished_run[0], timeout=60)
    assert res.returncode == 2 and "give --data FILE (task metrics), --general (forgetting), or both" in res.stderr


def _one_at_a_time():
    """The textbook measure, one prompt at a time (the implementation before #27 batched it): bench/eval_general.py's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "eval_general.py"
    spec = importlib.util.spec_from_file_location("eval_general", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.one_at_a_time


def test_batched_forgetting_equals_the_one_prompt_at_a_time_measure(finished_run):
    """#27: eval --general is batched (prompts of different lengths in one left-padded batch); the figures are the
    per-prompt loop's."""
    from hwcompat.data import GENERAL_PROMPTS
    from hwcompat.train import batching
    from hwcompat.train.forgetting import forgetting
    from hwcompat.train.inspect_run import _load

    run, _ = finished_run
    spec, model, tokenizer, device = _load(run)
    chat = batching.uses_chat_template(tokenizer, spec.config.chat_template)
    prompts = [json.loads(x)["prompt"] for x in GENERAL_PROMPTS.read_text().splitlines()][:12]
    got = forgetting(model, tokenizer, chat, device, "float32", new_tokens=12, batch=5, prompts=prompts, gen_batch=7)
    want = _one_at_a_time()(model, tokenizer, chat, prompts, new_tokens=12)
    assert got["tokens"] == want["tokens"]
    assert got["kl_per_token"] == pytest.approx(want["kl_per_token"], rel=1e-4, abs=1e-7)
    for who in ("base", "adapted"):
        assert got["base_answers_logp_per_token"][who] == pytest.approx(want["base_answers_logp_per_token"][who],
                                                                        rel=1e-4)


# --- #35 family 19: the containers training reads, eval and generate read too; an eval error speaks of eval -----

def _save_to_disk(folder, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


@pytest.mark.slow
def test_eval_and_generate_read_a_save_to_disk_folder(finished_run, tmp_path):
    run, _ = finished_run
    folder = _save_to_disk(tmp_path / "ds", task_rows(6, 3))
    res = _cli("eval", run, "--data", folder)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["adapted"]["n"] == 6
    res = _cli("generate", run, "--file", folder, "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout.splitlines()) == 6


@pytest.mark.slow
def test_an_eval_data_error_says_nothing_was_evaluated_once(finished_run, tmp_path):
    run, _ = finished_run
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "What color is the sky?", "completion": ""}])
    res = _cli("eval", run, "--data", bad)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"--data {bad}: data checks failed; nothing was evaluated" in res.stderr
    assert "nothing was trained" not in res.stderr
    assert res.stderr.count(f"{bad}:1: completion: empty") == 1


@pytest.mark.slow
def test_an_eval_row_the_run_cannot_fit_names_no_config_key(finished_run, tmp_path):
    run, _ = finished_run  # trained with max_seq_len: 64
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "What color is the sky? " * 40, "completion": "blue"}])
    res = _cli("eval", run, "--data", long)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "the run was trained with max_seq_len=64: shorten the prompt or drop the row" in res.stderr
    assert "raise max_seq_len" not in res.stderr


@pytest.mark.slow
def test_generate_reads_a_file_in_the_runs_columns(tiny_model, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in task_rows(32, 1)]
    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), train)
    res = _cli("train", make_config(tmp_path, tiny_model, train, train, max_steps=2,
                                    columns={"prompt": "question", "completion": "answer"}))
    assert res.returncode == 0, res.stderr[-2000:]
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "What color is the sky?"}]), prompts)
    res = _cli("generate", tmp_path / "run", "--file", prompts, "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["prompt"] == "What color is the sky?"


def test_the_request_crosses_the_exec_typed_and_nothing_else_is_taken():
    """#39 §3: cli/inspect.py sends one Request as JSON; argparse stays in cli/. A stray argv is refused (exit 2),
    without a traceback."""
    import subprocess
    import sys

    from hwcompat.train.inspect_run import Request, main

    req = Request("eval", "runs/x", data="d.jsonl", general=True, predictions="/tmp/p.jsonl", samples=3, seed=7)
    assert Request.from_json(req.to_json()) == req
    for argv in ([], ["eval", "runs/x", "--data", "d.jsonl"], ['{"what": "train", "run_dir": "x"}'],
                 ['{"what": "eval", "run_dir": "x", "columns": {}}'], ["{not json"]):
        assert main(argv) == 2, argv
    res = subprocess.run([sys.executable, "-m", "hwcompat.train.inspect_run", "generate", "runs/x"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "run it as `hwcompat generate` / `hwcompat eval`" in res.stderr
