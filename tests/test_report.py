"""#27: report.html — every finished or stopped run writes one; `hwcompat report RUN [RUN ...]` rebuilds it or compares
runs. Checked in a real headless Chromium: no console error, no request beyond the file itself, every plot drawn,
and a screenshot taken."""

import json
import shutil
from html import unescape as html_unescape

import pytest

from tests import cli
from tests.browser import CHROMIUM, REQUIRE, checked_report as _checked, visit

needs_chromium = pytest.mark.skipif(CHROMIUM is None and not REQUIRE,
                                    reason="no chromium (apt-get install chromium); .ci/run installs it")

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_module):
    """A run stopped by SIGTERM at step 5 and resumed to 8, and a second run with another learning rate."""

    from tests.train.conftest import make_config, sigterm_site, task_rows, write_jsonl

    base = tmp_path_factory.mktemp("runs")
    train, evals = write_jsonl(base / "train.jsonl", task_rows(160, 1)), write_jsonl(base / "eval.jsonl", task_rows(24, 2))
    sigterm_site(base / "site")
    def train_cli(*args, **extra):
        return cli.train(*args, timeout=600, env=extra)

    runs = []
    for name, lr in (("a", 0.02), ("b", 0.005)):
        (base / name).mkdir()
        cfg = make_config(base / name, tiny_model_module, train, evals, max_steps=8, eval_every=4, learning_rate=lr,
                          eval_metrics="exact", output_dir=str(base / name / "run"))
        if name == "a":
            stopped = train_cli(cfg, PYTHONPATH=str(base / "site"), TEST_SIGTERM_AT_STEP="5")
            assert stopped.returncode == 143, stopped.stderr[-2000:]
            assert f"report: {base / 'a' / 'run' / 'report.html'}" in stopped.stderr
            html = (base / "a" / "run" / "report.html").read_text()
            assert "stopped at step 5 of 8 (resume with --resume)" in html  # a stopped run has its page too
        res = train_cli(base / name / "run" / "config.yaml", "--resume") if name == "a" else train_cli(cfg)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(base / name / "run")
    return runs


@pytest.fixture(scope="module")
def tiny_model_module(tmp_path_factory):
    from hwcompat.train.tiny import write_tiny
    from tests.train.conftest import COLORS

    texts = [f"What color is the {k}? {v}" for k, v in COLORS.items()] * 5 + ["### User:\n### Assistant:\n"]
    return write_tiny(tmp_path_factory.mktemp("tiny") / "model", texts, chat_template=False, hidden=64, layers=2)


@pytest.mark.slow
@needs_chromium
def test_a_runs_report_loads_offline_draws_every_plot_and_marks_the_resume(two_runs, tmp_path):
    run = two_runs[0]
    html = (run / "report.html").read_text()
    assert "finished: 8 steps" in html and "resumed @ 5" in html and "no metric fell" in html
    why = json.loads((run / "profile.json").read_text())["reasons"]["attention"]
    assert "the plan, before the run" in html and why[:60] in html_unescape(html)  # plan and the profile's why
    plots = _checked(run / "report.html", tmp_path, "run.png")
    assert plots == {"loss": 2, "learning rate": 1, "tokens/s": 1, "memory (peak so far)": 1}


@needs_chromium
def test_two_runs_compared_overlay_their_curves_and_sit_side_by_side(two_runs, tmp_path, run_cli):
    out = tmp_path / "compare.html"
    res = run_cli("report", *map(str, two_runs), "--out", str(out))
    assert res.returncode == 0 and res.stdout == f"wrote {out}\n", res.stderr
    plots = _checked(out, tmp_path, "compare.png")
    assert plots == {"train loss": 2, "eval loss": 2, "tokens/s": 2, "memory (peak so far)": 2}
    html = out.read_text()
    # two folders named run: distinct columns, each with its parent (#35: two "run" columns could not be told apart)
    names = [f"{p.name} ({p.parent.name}/{p.name})" for p in map(lambda x: x.resolve(), two_runs)]
    assert all(f"<th>{n}</th>" in html for n in names) and "exact_match" in html and "regressed" in html


@needs_chromium
def test_the_browser_check_itself_sees_errors_and_requests(tmp_path):
    """The harness is not vacuous: a console error and a network request on a page are both caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><html><body><script>console.error("boom")</script>'
                    '<img src="http://192.0.2.1/x.png"></body></html>')
    v = visit(page.as_uri(), "1", screenshot=False)
    assert "boom" in " ".join(v.console_errors) and "http://192.0.2.1/x.png" in v.requests


def test_report_rebuilds_and_refuses_what_it_must_not_replace(two_runs, tmp_path, run_cli):
    run = two_runs[1]
    (run / "report.html").unlink()
    res = run_cli("report", str(run))
    assert res.returncode == 0 and (run / "report.html").exists(), res.stderr
    mine = tmp_path / "mine"
    shutil.copytree(run, mine)
    (mine / ".hwcompat-outputs.json").write_text(json.dumps({"names": []}))  # the ledger does not list report.html
    res = run_cli("report", str(mine))
    assert res.returncode == 2 and "exists and hwcompat did not write it; give --out FILE" in res.stderr
    (tmp_path / "compare.html").write_text("mine")
    res = run_cli("report", *map(str, two_runs), cwd=str(tmp_path))
    assert res.returncode == 2 and "compare.html already exists; pass --overwrite" in res.stderr
    assert (tmp_path / "compare.html").read_text() == "mine"
    res = run_cli("report", str(tmp_path))
    assert res.returncode == 2 and "not a run folder (no run.json)" in res.stderr and "Traceback" not in res.stderr


def test_dpo_rewards_and_export_figures_are_on_the_page(tmp_path):
    from hwcompat.train.report import Run, render_run

    evals = [{"step": s, "kind": "eval", "eval_loss": 0.7 - s / 100, "reward_accuracy": s / 10, "reward_margin": s / 20}
             for s in (0, 4, 8)]
    run = Run(tmp_path, evals=evals, train=[{"step": s, "kind": "train", "loss": 1 / s, "lr": 1e-4,
                                             "tokens_per_s": 100.0, "memory_bytes": 2**30} for s in range(1, 9)],
              export={"gguf": "model.gguf", "qtype": "q8_0", "passed": True, "verified": True,
                      "distributions": {"mean_kl": 0.0012, "top1_agreement": 0.98},
                      "generations": {"identical": 7, "prompts": 8}, "tokenization": {"mismatches": 0, "strings": 40}})
    html = render_run(run)
    assert 'data-title="DPO rewards (eval)"' in html and "reward_accuracy" in html
    assert "Export, verified in llama.cpp" in html and "0.0012" in html and "7/8" in html
    run.export = {"gguf": "model.gguf", "qtype": "f16", "verified": False, "passed": None, "why_not": "--no-verify"}
    assert "not verified in llama.cpp (--no-verify)" in render_run(run)


def test_the_page_header_names_files_not_this_machines_folders_and_says_what_was_trained(tmp_path):
    """#39 §4 / true reports: the header named every folder of the machine that ran it (the README's screenshot
    showed /root/.cache/…) and said "LoRA r=16" of a full fine-tune."""
    from hwcompat.train.report import Run, render_run

    train = [{"step": 1, "kind": "train", "loss": 1.0, "lr": 1e-4, "tokens_per_s": 10.0, "memory_bytes": 2**30}]
    cfg = {"method": "sft", "train_data": ["/home/ana/private/tickets.jsonl", "/srv/x/more.jsonl"],
           "model": "/root/.cache/hwcompat/models/smollm2-135m-instruct", "lora_r": 16, "finetune": "lora"}
    sub = render_run(Run(tmp_path, train=train, spec={"config": cfg})).split('<p class="sub">', 1)[1].split("</p>")[0]
    assert "sft on tickets.jsonl, more.jsonl · model smollm2-135m-instruct · LoRA r=16" in sub
    assert "/home/ana" not in sub and "/root" not in sub
    full = render_run(Run(tmp_path, train=train, spec={"config": {**cfg, "finetune": "full"}}))
    assert "· full fine-tune" in full and "LoRA" not in full.split("</p>")[0]
