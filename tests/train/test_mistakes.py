"""#40 §4: a model's mistakes turned into preference pairs. `hwcompat eval RUN --data F --predictions P --pairs Q`
writes each row's answer and metrics, and pairs (chosen = the reference; rejected = the model's wrong answer, or for
a row it gets right its likeliest wrong sample) that DPO reads as they are."""

import json

import pytest

from hwcompat.train import mistakes
from tests.train.conftest import make_config

ROWS = [mistakes.Row((("user", "q1"),), '{"a": ["x"]}', "d.jsonl:1"),
        mistakes.Row((("user", "q2"),), '{"a": ["y"]}', "d.jsonl:2"),
        mistakes.Row((("user", "q3"),), None, "d.jsonl:3")]


def test_predictions_carry_each_rows_answer_metrics_and_verdict():
    out = mistakes.predictions(ROWS, ['{"a": ["x"]}', '{"a": ["z"]}', "free text"], "json")
    assert [p["correct"] for p in out] == [True, False, None]  # a prompt-only row has no verdict
    assert out[1]["metrics"]["field_f1"] == 0.0 and out[1]["metrics"]["json_valid"] == 1.0
    assert out[0]["prompt"] == [{"role": "user", "content": "q1"}] and out[2]["metrics"] == {}


def test_pairs_from_mistakes_and_from_right_rows_confusable_answers():
    answers = ['{"a": ["x"]}', '{"a": ["z"]}', "free text"]
    sampled = {0: [('{"a": ["x"]}', -0.1), ('{"a": ["w"]}', -0.9), ('{"a": []}', -0.4)]}
    found = mistakes.confusable(ROWS, answers, "json", sampled)
    assert found == {0: '{"a": []}'}  # the wrong sample the model rates likeliest, never a right one
    pairs = mistakes.pairs(ROWS, answers, "json", found)
    assert [(p["source"], p["rejected"][0]["content"]) for p in pairs] == [("confusable", '{"a": []}'),
                                                                          ("mistake", '{"a": ["z"]}')]
    assert all(p["chosen"][0]["content"] == r.reference for p, r in zip(pairs, ROWS))
    assert mistakes.pairs(ROWS, answers, "json", {}) == pairs[1:]  # a right row without a wrong sample: no pair


@pytest.mark.slow
def test_eval_writes_predictions_and_pairs_that_dpo_trains_on(tmp_path, tiny_model, task_files, run_cli):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=30, eval_metrics="label", eval_at_start=False)
    assert run_cli("train", str(cfg), timeout=600).returncode == 0
    run, train_file = tmp_path / "run", task_files[0]
    preds, pairs = tmp_path / "preds.jsonl", tmp_path / "pairs.jsonl"
    res = run_cli("eval", str(run), "--data", str(train_file), "--predictions", str(preds), "--pairs", str(pairs),
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 160 and all({"prompt", "reference", "answer", "metrics", "correct"} <= set(r) for r in rows)
    got = [json.loads(x) for x in pairs.read_text().splitlines()]
    wrong = sum(not r["correct"] for r in rows)
    assert sum(p["source"] == "mistake" for p in got) == wrong
    assert "pairs" in res.stderr and "right" in res.stderr
    from hwcompat.data.pairs import load_pairs

    train, _, report = load_pairs([str(pairs)], [], 0.1, 0)
    assert not report.errors and len(train) > 0
    # nothing replaced without --overwrite; a missing --data said before anything loads
    again = run_cli("eval", str(run), "--data", str(train_file), "--pairs", str(pairs))
    assert again.returncode == 2 and "the file exists; pass --overwrite" in again.stderr
    assert run_cli("eval", str(run), "--pairs", str(tmp_path / "x.jsonl")).returncode == 2
    # the loop: DPO from the SFT adapter on the pairs
    dpo = make_config(tmp_path / "dpo", tiny_model, pairs, pairs, method="dpo", init_adapter=str(run / "adapter"),
                      max_steps=2, micro_batch_size=2, eval_metrics="none", eval_at_start=False,
                      output_dir=str(tmp_path / "dpo-run")) if (tmp_path / "dpo").mkdir() is None else None
    res = run_cli("train", str(dpo), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
