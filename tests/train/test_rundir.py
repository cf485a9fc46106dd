"""The run folder's rules (hwcompat/train/rundir.py): lock, restart, resume, leftovers, umask."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from hwcompat.errors import InputError
from hwcompat.fsutil import FolderLock, atomic_write_text, clean_stale
from hwcompat.train.config import TrainConfig, load_config
from hwcompat.train.rundir import open_run_dir, resume_changes
from tests import cli
from tests.train.conftest import make_config, prepare_run, sigterm_site


def _cfg(tmp_path, **kw):
    d = TrainConfig(model="/m", train_data=["/t.jsonl"], output_dir=str(tmp_path / "run")).to_dict()
    d.update(kw)
    return d


def _recorded_run(tmp_path, step=4, **kw):
    run = tmp_path / "run"
    (run / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (run / "checkpoints" / f"step-{step:07d}" / "state.json").write_text(json.dumps({"step": step}))
    (run / "run.json").write_text(json.dumps({"config": _cfg(tmp_path, **kw)}))
    (run / "config.yaml").write_text("model: /m\n")
    return run


def test_a_second_writer_is_refused_with_the_owner(tmp_path):
    first = open_run_dir(str(tmp_path / "run"), _cfg(tmp_path), False, False)
    with pytest.raises(InputError, match=rf"is in use by PID {os.getpid()} \(hwcompat train\)"):
        open_run_dir(str(tmp_path / "run"), _cfg(tmp_path), False, False)
    first.lock.release()
    open_run_dir(str(tmp_path / "run"), _cfg(tmp_path), False, False).lock.release()


def test_refused_resume_changes_nothing_in_the_folder(tmp_path):
    run = _recorded_run(tmp_path, lora_r=16)
    def files():  # the lock file is the one thing a refused start leaves (it must outlive every writer)
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".hwcompat.lock"}

    before = files()
    with pytest.raises(InputError, match=r"--resume: learning_rate, lora_r cannot change on a resume .*lora_r=16"):
        open_run_dir(str(run), _cfg(tmp_path, lora_r=8, learning_rate=1e-3), True, False)
    assert files() == before


def test_schedule_changes_are_allowed_and_named():
    changes = resume_changes({"max_steps": 10, "eval_every": 0, "lora_r": 16},
                             {"max_steps": 20, "eval_every": 5, "lora_r": 16}, done=10)
    assert changes == {"max_steps": {"from": 10, "to": 20}, "eval_every": {"from": 0, "to": 5}}


def test_resume_never_moves_a_run_backwards():
    with pytest.raises(InputError, match="already made 40 steps; max_steps=10 would move it backwards"):
        resume_changes({"max_steps": 40}, {"max_steps": 10}, done=40)


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_failed_before_its_first_checkpoint_starts_over(tmp_path, resume):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": _cfg(tmp_path)}))
    (run / "metrics.jsonl").write_text("{}\n")
    out = open_run_dir(str(run), _cfg(tmp_path), resume, overwrite=False)
    assert out.resume is False and not (run / "metrics.jsonl").exists() and not (run / "run.json").exists()
    assert out.notes and ("starting over" in out.notes[0])
    out.lock.release()


def test_a_finished_run_needs_overwrite(tmp_path):
    run = _recorded_run(tmp_path)
    with pytest.raises(InputError, match="already holds a run; continue it with --resume"):
        open_run_dir(str(run), _cfg(tmp_path), False, False)
    assert (run / "checkpoints").exists()


def test_damaged_run_json_is_a_clear_error(tmp_path):
    run = _recorded_run(tmp_path)
    (run / "run.json").write_text("{not json")
    with pytest.raises(InputError, match=r"run.json is damaged .*start over with --overwrite"):
        open_run_dir(str(run), _cfg(tmp_path), True, False)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(InputError, match="is a file; choose a folder path"):
        open_run_dir(str(tmp_path / "run"), _cfg(tmp_path), False, False)


def test_only_hwcompats_own_leftovers_are_removed(tmp_path):
    (tmp_path / ".step-0000004.ab12cd_3.tmp").mkdir()
    (tmp_path / ".config.yaml.x1y2z3w4.tmp").write_text("half")
    (tmp_path / ".adapter.old").mkdir()
    (tmp_path / ".mynotes.tmp").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    assert sorted(clean_stale(tmp_path)) == [".adapter.old", ".config.yaml.x1y2z3w4.tmp", ".step-0000004.ab12cd_3.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mynotes.tmp", "notes.txt"]


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_relative_output_dir_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    cfg = tmp_path / "proj" / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": "/m", "train_data": ["t.jsonl"], "output_dir": "runs/x"}))
    monkeypatch.chdir(tmp_path)
    assert load_config(cfg).config.output_dir == str(tmp_path / "proj" / "runs" / "x")


def test_folder_lock_names_its_owner_in_the_file(tmp_path):
    lock = FolderLock(tmp_path, "hwcompat merge")
    assert (tmp_path / ".hwcompat.lock").read_text().strip() == f"PID {os.getpid()} (hwcompat merge)"
    lock.release()


# --- end to end: the CLI with a tiny model ------------------------------------------------------------

def _train(*args, timeout=300):
    return cli.run("train", *args, timeout=timeout)


def test_a_finished_run_resumed_from_an_older_checkpoint_cannot_go_backwards(tmp_path):
    run = _recorded_run(tmp_path, step=30, max_steps=40)
    (run / "summary.json").write_text(json.dumps({"steps": 40}))
    with pytest.raises(InputError, match="already made 40 steps; max_steps=35"):
        open_run_dir(str(run), _cfg(tmp_path, max_steps=35), True, False)
    out = open_run_dir(str(run), _cfg(tmp_path, max_steps=60), True, False)
    assert out.resume and out.from_step == 30 and out.changes == {"max_steps": {"from": 40, "to": 60}}


def test_a_finished_run_without_checkpoints_says_so(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(InputError, match=r"finished \(step 3\) and kept no checkpoint"):
        open_run_dir(str(run), _cfg(tmp_path), True, False)


@pytest.mark.slow
def test_refused_resume_keeps_the_run_resumable_and_changes_are_recorded(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=4, checkpoint_every=2, eval_at_start=False,
                      eval_metrics="none")
    assert _train(cfg).returncode == 0
    run = tmp_path / "run"
    kept = {n: (run / n).read_bytes() for n in ("config.yaml", "run.json")}
    res = _train(run / "config.yaml", "--resume", "lora_r=8")
    assert res.returncode == 2 and "lora_r cannot change on a resume" in res.stderr, res.stderr[-1500:]
    assert "Traceback" not in res.stderr
    assert {n: (run / n).read_bytes() for n in kept} == kept
    res = _train(run / "config.yaml", "--resume", "max_steps=3")
    assert res.returncode == 2 and "already made 4 steps; max_steps=3 would move it backwards" in res.stderr
    res = _train(run / "config.yaml", "--resume", "max_steps=6")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resume: max_steps 4 -> 6 from step 2" in res.stderr
    spec = json.loads((run / "run.json").read_text())
    assert spec["resumes"] == [{"at_step": 2, "changed": {"max_steps": {"from": 4, "to": 6}}}]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 6
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_two_trainings_into_one_folder(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=1_000_000, eval_at_start=False,
                      eval_metrics="none")
    first = cli.popen("train", cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    try:
        for extra in ([], ["--overwrite"]):
            res = _train(cfg, *extra)
            assert res.returncode == 2 and f"is in use by PID {first.pid} (hwcompat train)" in res.stderr, res.stderr
        assert metrics.exists()  # --overwrite did not clear a live run
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143


# --- models: local safetensors only, no network unless asked ---------------------------------------------

def test_model_checks_before_any_load(tmp_path):
    from hwcompat.pipeline.preflight import check_model, is_hub_id

    with pytest.raises(InputError, match="no such folder. It looks like a Hugging Face Hub id"):
        check_model("HuggingFaceTB/SmolLM2-135M", allow_network=False)
    check_model("HuggingFaceTB/SmolLM2-135M", allow_network=True)
    with pytest.raises(InputError, match=r"cannot load it: no such folder\.$"):
        check_model(str(tmp_path / "nope"), allow_network=True)
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match=r"only pytorch_model.bin \(pickle\) weights.*safetensors only"):
        check_model(str(m), allow_network=False)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(m / "model.safetensors"))
    check_model(str(m), allow_network=False)
    assert is_hub_id("org/name") and not is_hub_id(str(m)) and not is_hub_id("./x/y")


def test_trainer_environment_is_offline_unless_allowed():
    from types import SimpleNamespace

    from hwcompat.pipeline.processes import child_env

    dev = SimpleNamespace(reading=SimpleNamespace(vendor="cpu", emulated=False, index=0))
    profile = SimpleNamespace(env={})
    assert child_env(profile, dev, None)["HF_HUB_OFFLINE"] == "1"
    assert child_env(profile, dev, None, online=True)["HF_HUB_OFFLINE"] == "0"


@pytest.mark.slow
def test_docker_stop_mid_accumulation_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_model,
                                                                                        task_files):
    """SIGTERM (docker stop) while one optimizer step spans hundreds of micro-batches: saved and exited well inside
    docker's 10 s grace, and the resume equals an uninterrupted run."""
    from safetensors.torch import load_file

    def config(name):
        d = tmp_path / name
        d.mkdir()
        return make_config(d, tiny_model, *task_files, max_steps=2, micro_batch_size=1, gradient_accumulation=400,
                           eval_at_start=False, eval_metrics="none", learning_rate=0.01)

    assert _train(config("a")).returncode == 0
    # micro-batch 200 of step 1's 400 (it was a 1 s sleep after the model line: a fast machine finished the step)
    stamp = tmp_path / "signalled-at"
    env = dict(PYTHONPATH=str(sigterm_site(tmp_path / "site")), TEST_SIGTERM_AT_MICRO="200",
               TEST_SIGTERM_STAMP=str(stamp))
    log = tmp_path / "b.log"
    with open(log, "w") as err:
        proc = cli.popen("train", config("b"), stderr=err, env=env)
        proc.wait(timeout=300)
        exited = time.time()
    text = log.read_text()
    assert proc.returncode == 143, text[-2000:]
    assert exited - float(stamp.read_text()) < 10  # docker stop's grace, SIGKILL after it
    assert "micro-batch" in text and "that step is redone on resume" in text
    run_b = tmp_path / "b" / "run"
    assert list((run_b / "checkpoints").glob("step-*"))
    res = _train(run_b / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    wa = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-5, k


@pytest.mark.parametrize("sig,code,text", [(signal.SIGTERM, 143, "terminated before training started"),
                                           (signal.SIGINT, 130, "interrupted before training started")])
@pytest.mark.slow
def test_signals_before_the_loop_exit_with_a_message(tmp_path, tiny_model, task_files, sig, code, text):
    run_dir = prepare_run(make_config(tmp_path, tiny_model, *task_files, max_steps=2))
    code_text = f"""
import os, signal, sys
import hwcompat.train.objectives.sft as L  # the objective reads its data during setup
real = L.load_datasets
def during_setup(*a, **k):
    os.kill(os.getpid(), {int(sig)})
    return real(*a, **k)
L.load_datasets = during_setup
from hwcompat.pipeline.worker import main
sys.exit(main([{str(run_dir)!r}]))
"""
    # A job started with `&` by a non-interactive shell inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler (the Unix convention for background jobs): give the child a terminal's default.
    res = subprocess.run([sys.executable, "-c", code_text], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert res.returncode == code and text in res.stderr, res.stderr[-2000:]
    assert "second Ctrl-C" not in res.stderr and "Traceback" not in res.stderr
