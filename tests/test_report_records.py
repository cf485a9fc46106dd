"""#35: `hwcompat report` on run folders it did not write as they are: a damaged or hand-edited record is one line
naming the file (exit 2), never a traceback or a hang; runs compared say what each trained, keep the losses of
different methods apart, and never share a column name."""

import json
import os
from pathlib import Path

import pytest


def _run(folder, method="sft", summary=None, metrics=None, model="models/tiny", data="train.jsonl"):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"config": {"method": method, "model": model, "train_data": [data],
                                                            "max_steps": 4}}))
    lines = metrics if metrics is not None else [
        {"kind": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3, "tokens_per_s": 100.0, "memory_bytes": 2**30}
        for s in range(1, 5)] + [{"kind": "eval", "step": 4, "eval_loss": 0.5 if method == "sft" else 0.69}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary is not False:
        (folder / "summary.json").write_text(json.dumps(summary or {
            "steps": 4, "tokens_per_s": 100.0, "peak_memory_bytes": 2**30, "train_seconds": 1.0,
            "eval_after": {"eval_loss": 0.5 if method == "sft" else 0.69, "exact_match": 0.5}}))
    return folder


DAMAGE = [
    ("summary.json", '{"steps": 4, "tokens_per_s": "fast"}', "summary.json: damaged"),
    ("summary.json", '{"steps": 4, "regressed": [1, 2]}', "summary.json: damaged"),
    ("summary.json", "[1, 2]", "summary.json: damaged (expected a JSON object, got list)"),
    ("summary.json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}", "summary.json: damaged (nested too deeply)"),
    ("summary.json", b'{"steps": "\xff"}', "summary.json: damaged (not UTF-8 at byte 11)"),
    ("run.json", '{"config": [1]}', "run.json: damaged"),
    ("run.json", '{"config": {"method": "sft"}, "profile": "fp32"}', "run.json: damaged"),
    ("metrics.jsonl", b'{"kind": "train", "step": 1, "loss": 1.0}\n\xfe\n', "metrics.jsonl: damaged (not UTF-8"),
]


@pytest.mark.parametrize("name,content,message", DAMAGE)
def test_a_damaged_record_is_named_not_a_traceback(tmp_path, run_cli, name, content, message):
    run = _run(tmp_path / "run")
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    res = run_cli("report", str(run), "--out", str(tmp_path / "r.html"), timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{run / name.split(':')[0]}".rsplit("/", 1)[0] in res.stderr and message in res.stderr, res.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("record", [{"kind": "train", "step": 10**400, "loss": 1.0},
                                    {"kind": "train", "step": 2, "loss": 10**400},
                                    {"kind": "train", "step": 3, "loss": "NaN"},
                                    {"kind": "resume", "step": True}])
def test_numbers_no_float_holds_are_left_out_of_the_page(tmp_path, run_cli, record):
    run = _run(tmp_path / "run", summary={"steps": 10**400, "peak_memory_bytes": 10**400, "tokens_per_s": 1e308})
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n" + '{"kind": "train", "step": 4, "loss": 1e999}\n')
    res = run_cli("report", str(run), "--out", str(tmp_path / "r.html"), timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "<svg" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json"])
def test_a_fifo_in_place_of_a_record_is_refused_not_waited_on(tmp_path, run_cli, name):
    run = _run(tmp_path / "run", summary=False)
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)
    res = run_cli("report", str(run), "--out", str(tmp_path / "r.html"), timeout=30)
    assert res.returncode == 2 and f"{run / name}: damaged (is a pipe or FIFO" in res.stderr, res.stderr[-2000:]


def test_compared_runs_say_what_they_trained_and_keep_method_losses_apart(tmp_path, run_cli):
    a = _run(tmp_path / "a" / "latest", "sft", model="models/base", data="sft.jsonl")
    b = _run(tmp_path / "b" / "latest", "dpo", model="runs/sft/merged", data="pairs.jsonl")
    out = tmp_path / "c.html"
    res = run_cli("report", str(a), str(b), "--out", str(out), timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    page = out.read_text()
    assert "<th>latest (a/latest)</th><th>latest (b/latest)</th>" in page
    for cell in ("<td>model</td><td>models/base</td><td>runs/sft/merged</td>",
                 "<td>method</td><td>sft</td><td>dpo</td>", "<td>train data</td><td>sft.jsonl</td><td>pairs.jsonl</td>",
                 "<td>eval_loss (dpo: DPO sigmoid loss of the pairs)</td><td>-</td><td>0.6900</td>",
                 "<td>eval_loss (sft: token NLL of the answers)</td><td>0.5000</td><td>-</td>"):
        assert cell in page, cell
    assert "different methods (dpo, sft)" in page
    assert 'data-title="eval loss — sft: token NLL of the answers"' in page
    assert 'data-title="eval loss"' not in page  # never one chart for two different quantities


def test_two_links_to_distinct_runs_get_distinct_columns(tmp_path, run_cli):
    a, b = _run(tmp_path / "x" / "run1"), _run(tmp_path / "y" / "run2")
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    (tmp_path / "p" / "latest").symlink_to(a)
    (tmp_path / "q" / "latest").symlink_to(b)
    out = tmp_path / "c.html"
    res = run_cli("report", str(tmp_path / "p" / "latest"), str(tmp_path / "q" / "latest"), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "<th>latest (run1)</th><th>latest (run2)</th>" in out.read_text()


def test_a_stopped_run_shows_no_after_and_no_guard_verdict(tmp_path, run_cli):
    """#40 §3: a stopped run's page showed the step-0 eval as "after" with "ok — no metric fell"."""
    metrics = [{"kind": "eval", "step": 0, "eval_loss": 2.0, "exact_match": 0.1},
               {"kind": "train", "step": 1, "loss": 1.5, "lr": 2e-4}]
    run = _run(tmp_path / "run", summary=False, metrics=metrics)
    out = tmp_path / "r.html"
    assert run_cli("report", str(run), "--out", str(out)).returncode == 0
    page = out.read_text()
    assert "no metric fell" not in page and "no after yet, so no guard verdict" in page
    assert "<td>exact_match</td><td>0.1000</td><td>-</td><td>-</td>" in page
    metrics.append({"kind": "eval", "step": 4, "eval_loss": 1.0, "exact_match": 0.5})
    run = _run(tmp_path / "run2", summary=False, metrics=metrics)
    assert run_cli("report", str(run), "--out", str(tmp_path / "r2.html")).returncode == 0
    page = (tmp_path / "r2.html").read_text()
    assert "<th>step 4</th>" in page and "the latest eval (step 4) is shown" in page


def test_plots_start_at_zero():
    from hwcompat.train.charts import Series, chart
    from hwcompat.train.report import Run, render_run

    c = chart("learning rate", [Series("lr", [(1, 0.000172), (2, 0.0002)], "#000")])
    assert c.ticks[2] == "0" and "0.000172" not in c.ticks
    page = render_run(Run(Path("run"), train=[{"step": s, "kind": "train", "lr": lr} for s, lr in
                                              ((1, 0.000172), (2, 0.0002))]))
    assert 'text-anchor="end">0</text>' in page and 'text-anchor="end">0.000172</text>' not in page


def test_what_a_run_recorded_is_text_on_the_page_never_markup():
    """The page is a Jinja2 template with autoescaping: a prompt, a completion, a profile reason or a data file's
    name that holds markup is shown as text (no home-made escaping left to forget)."""
    from hwcompat.train.report import Run, render_run

    evil = '<img src=x onerror="alert(1)">'
    run = Run(Path("run"), train=[{"step": 1, "kind": "train", "loss": 1.0}],
              spec={"config": {"train_data": [evil]}, "profile": {"name": evil, "reasons": {"dtype": evil}}},
              samples=[{"step": 1, "samples": [{"prompt": evil, "completions": [evil], "rewards": [1.0]}]}])
    page = render_run(run)
    assert "<img" not in page and page.count("&lt;img src=x onerror=&#34;alert(1)&#34;&gt;") >= 4
