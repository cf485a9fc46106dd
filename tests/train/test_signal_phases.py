"""#22: every signal a user's process can get (SIGTERM, SIGINT, SIGHUP), in every phase of a run, ends with the work
saved and a true message: the final eval, a mid-run eval, and the export of `train --export gguf`.

Each run is the real worker in a subprocess. The signal is sent by the process to itself from inside the phase
(a wrapped function), so it lands exactly there, every time; the child gets a terminal's default dispositions
(a job started with `&` inherits SIGINT ignored).
"""

import json
import signal
import subprocess
import sys

import pytest

from tests import cli
from tests.train.conftest import make_config, prepare_run

def _config(tmp_path, model, files, **extra):
    # offload decided as the CLI decides it (prepare_run skips the plan), so a resume keeps the same setting
    return make_config(tmp_path, model, *files, offload="none", **extra)


CODE = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}


def _worker(run_dir, patch: str, *flags, timeout=180):  # noqa: D103
    code = f"""
import os, signal, sys, time
{patch}
from hwcompat.pipeline.worker import main
sys.exit(main([{str(run_dir)!r}, *{list(flags)!r}]))
"""

    def defaults():
        for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=defaults)


def _signal_in_generation(sig: int, at_call: int = 1, then_sleep: float = 0.0) -> str:
    """Patch the objective's generation so its ``at_call``-th call signals the process, then (optionally) keeps
    computing for ``then_sleep`` seconds: a bounded response means the signal stops it long before that."""
    return f"""
import hwcompat.train.objectives.sft as S
real = S.generate
calls = [0]
def generate(*a, **k):
    calls[0] += 1
    if calls[0] == {at_call}:
        os.kill(os.getpid(), {int(sig)})
        t = time.time()
        while time.time() - t < {then_sleep}:
            time.sleep(0.01)
    return real(*a, **k)
S.generate = generate
"""


def _signal_after_step(sig: int, at: int) -> str:
    """Patch the loop so the process signals itself right after step ``at`` is logged."""
    return f"""
import hwcompat.train.loop as L
real = L._log_step
def log_step(r, bar, step, *a):
    real(r, bar, step, *a)
    if step == {at}:
        os.kill(os.getpid(), {int(sig)})
L._log_step = log_step
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_in_the_final_eval_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model, task_files, sig):
    # checkpoint_every: 0 and eval_at_start: false: the final eval is the first generation of the run
    cfg = _config(tmp_path, tiny_model, task_files, max_steps=4, checkpoint_every=0, eval_at_start=False)
    run_dir = prepare_run(cfg)
    res = _worker(run_dir, _signal_in_generation(sig))
    assert res.returncode == CODE[sig], res.stderr[-2000:]
    assert "interrupted at step 4/4 (during the final eval" in res.stderr, res.stderr[-2000:]
    assert "checkpoint saved to" in res.stderr and "before training started" not in res.stderr
    assert "Traceback" not in res.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000004"]
    assert not (run_dir / "adapter").exists()
    res = cli.train(run_dir / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "at step 4/4" in res.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_in_a_mid_run_eval_acts_within_a_bounded_time(tmp_path, tiny_model, task_files):
    """`docker stop` gives 10 s before SIGKILL: an eval that would run on for 60 s must stop at the signal."""
    import time

    cfg = _config(tmp_path, tiny_model, task_files, max_steps=6, eval_every=2, checkpoint_every=0,
                      eval_at_start=False)
    run_dir = prepare_run(cfg)
    t0 = time.time()
    res = _worker(run_dir, _signal_in_generation(signal.SIGTERM, then_sleep=60.0))
    assert time.time() - t0 < 50, "the eval did not act on SIGTERM"
    assert res.returncode == 143, res.stderr[-2000:]
    assert "interrupted at step 2/6 (during the eval after it" in res.stderr, res.stderr[-2000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000002"]
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "eval"]
    assert evals == []  # the interrupted eval left no half record
    res = cli.train(run_dir / "config.yaml", "--resume", "eval_metrics=none")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_sigterm_during_the_export_keeps_the_adapter_and_says_how_to_export(tmp_path, tiny_model, task_files):
    cfg = _config(tmp_path, tiny_model, task_files, max_steps=2, eval_metrics="none", eval_at_start=False,
                      export="gguf", export_type="f16", checkpoint_every=0)
    run_dir = prepare_run(cfg)
    patch = """
import hwcompat.merge as M
real = M.merge
def merge(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
M.merge = merge
"""
    res = _worker(run_dir, patch)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "interrupted during the export" in res.stderr and "adapter is saved" in res.stderr
    assert "before training started" not in res.stderr and "Traceback" not in res.stderr
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert not (run_dir / "merged").exists() and not (run_dir / "model.gguf").exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # the printed export commands run as printed
    import shlex

    line = next(x for x in res.stderr.splitlines() if "Export it with:" in x)
    cmds = line.split("Export it with: ", 1)[1].split(" && ")
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "hwcompat"
        out = cli.run(*argv[1:], *(["--no-verify"] if argv[1] == "export" else []))
        assert out.returncode == 0, (cmd, out.stderr[-2000:])
    assert (run_dir / "model.gguf").exists() and (run_dir / "model.Modelfile").exists()


@pytest.mark.slow
def test_sighup_in_training_checkpoints_like_sigterm(tmp_path, tiny_model, task_files):
    cfg = _config(tmp_path, tiny_model, task_files, max_steps=6, eval_metrics="none", eval_at_start=False)
    run_dir = prepare_run(cfg)
    res = _worker(run_dir, _signal_after_step(signal.SIGHUP, 3))
    assert res.returncode == 129, res.stderr[-2000:]
    assert "interrupted at step 3/6" in res.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-0000003"]


@pytest.mark.slow
def test_nohup_keeps_sighup_ignored(tmp_path, tiny_model, task_files):
    """A run started under `nohup` (SIGHUP ignored) is not stopped by a closed terminal."""
    cfg = _config(tmp_path, tiny_model, task_files, max_steps=3, eval_metrics="none", eval_at_start=False)
    run_dir = prepare_run(cfg)
    res = _worker(run_dir, "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n" + _signal_after_step(signal.SIGHUP, 1))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
