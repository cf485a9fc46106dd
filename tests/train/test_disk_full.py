"""#35 family 3: a disk that fills mid-run, a nearly full disk at the start, a host out of memory: each ends with
what ran out, at which step, what was kept and the command to resume — the steps since the last checkpoint saved
into the space reserved at the start, no traceback, no "Exception ignored" noise. Faults are injected into a real
`hwcompat train` through a sitecustomize (as the SIGTERM tests do): no test can fill this machine's disk."""

import json

import pytest

from tests.train.conftest import make_config

FAULT_SITE = """
import errno, os
fault = os.environ.get("TEST_FAULT")
if fault:
    import hwcompat.fsutil as F
    import hwcompat.train.loop as L
    at = int(os.environ.get("TEST_FAULT_AT_STEP", "0"))
    if fault == "enospc-metrics":  # the metrics line of step `at` meets a full disk, once
        real_append, done = F.append_line, []
        def append_line(path, line):
            if not done and f'"step": {at}, "kind": "train"' in line:
                done.append(1)
                raise OSError(errno.ENOSPC, "No space left on device")
            real_append(path, line)
        F.append_line = append_line
    if fault == "enospc-start":  # posix_fallocate finds the disk nearly full
        def fallocate(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")
        os.posix_fallocate = fallocate
    if fault == "enospc-adapter":  # the final adapter write meets a full disk
        import hwcompat.train.loop as L2
        real_atomic = L2.atomic_dir
        def atomic_dir(path, *a, **k):
            if path.name == "adapter":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_atomic(path, *a, **k)
        L2.atomic_dir = atomic_dir
    if fault == "memory":  # the host's memory runs out in step `at`
        real_step = L._step
        def step(r, stream, signals):
            if r.step + 1 == at:
                raise MemoryError()
            return real_step(r, stream, signals)
        L._step = step
"""


@pytest.fixture
def fault_site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT_SITE)
    return site


def _steps(run):
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_keeps_every_step_and_resumes(tmp_path, tiny_model, task_files, run_cli,
                                                               fault_site):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=6, checkpoint_every=0, eval_metrics="none",
                      eval_at_start=False)
    env = {"PYTHONPATH": str(fault_site), "TEST_FAULT": "enospc-metrics", "TEST_FAULT_AT_STEP": "4"}
    res = run_cli("train", str(cfg), env=env, timeout=600)
    run = tmp_path / "run"
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    err = res.stderr
    assert f"the disk of {run} is full (no space left on device) at step 4/6, while writing metrics.jsonl" in err
    assert "kept: every step up to 4, in the checkpoint" in err and "written into the space reserved" in err
    assert f"resume with: hwcompat train {run / 'config.yaml'} --resume" in err
    assert _steps(run) == [1, 2, 3, 4] and (run / "checkpoints" / "step-0000004").is_dir()
    assert not list(run.glob(".hwcompat-reserve.*"))  # the reserve is given back on every way out
    again = run_cli("train", str(run / "config.yaml"), "--resume", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_nearly_full_disk_is_said_before_the_first_step(tmp_path, tiny_model, task_files, run_cli, fault_site):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=2, eval_at_start=False)
    res = run_cli("train", str(cfg), env={"PYTHONPATH": str(fault_site), "TEST_FAULT": "enospc-start"}, timeout=600)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "not enough free disk for this run's checkpoints" in res.stderr and "nothing was trained" in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_full_disk_at_the_adapter_keeps_the_steps_for_the_resume(tmp_path, tiny_model, task_files, run_cli,
                                                                  fault_site):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=3, eval_metrics="none", eval_at_start=False)
    res = run_cli("train", str(cfg), env={"PYTHONPATH": str(fault_site), "TEST_FAULT": "enospc-adapter"}, timeout=600)
    run = tmp_path / "run"
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "at step 3/3, while writing the adapter" in res.stderr and (run / "checkpoints" / "step-0000003").is_dir()
    again = run_cli("train", str(run / "config.yaml"), "--resume", timeout=600)
    assert again.returncode == 0 and (run / "adapter" / "adapter_model.safetensors").is_file(), again.stderr[-3000:]


@pytest.mark.slow
def test_host_memory_running_out_is_one_message_without_interpreter_noise(tmp_path, tiny_model, task_files, run_cli,
                                                                         fault_site):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=6, checkpoint_every=2, eval_metrics="none",
                      eval_at_start=False)
    env = {"PYTHONPATH": str(fault_site), "TEST_FAULT": "memory", "TEST_FAULT_AT_STEP": "4"}
    res = run_cli("train", str(cfg), env=env, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr[-3000:]
    assert "the host ran out of memory at step 3/6 (training: MemoryError)" in res.stderr
    assert "kept: the checkpoint of step 2" in res.stderr and "--resume" in res.stderr
