"""#27: progress a person and a machine can both read — tqdm's bar on a terminal; one plain line per N steps or per
30 s (no control characters) in a file, a pipe or `docker logs`; third-party bars off there too."""

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import termios

import pytest

from tests import cli

from hwcompat.progress import Progress, duration, quiet_library_bars


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_redirected_loop_prints_a_plain_line_every_tenth_of_the_run_and_the_last_step():
    out, clock = io.StringIO(), Clock()
    bar = Progress(40, stream=out, clock=clock)
    for step in range(40):
        clock.t += 1.5
        bar.update(1, loss=f"{1 / (step + 1):.4f}", tok_s="1,234")
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == [f"step {n}/40 ({n * 100 // 40}%)" for n in range(4, 41, 4)]
    assert lines[0] == "step 4/40 (10%) | loss 0.2500 | tok_s 1,234 | elapsed 6s | eta 54s"
    assert lines[-1] == "step 40/40 (100%) | loss 0.0250 | tok_s 1,234 | elapsed 1m00s"  # no eta at the end
    assert not re.search(r"[\r\x1b]", out.getvalue())


def test_a_slow_loop_says_something_every_30_seconds_between_its_step_lines():
    out, clock = io.StringIO(), Clock()
    bar = Progress(4000, stream=out, clock=clock)
    for _ in range(10):
        clock.t += 20.0
        bar.update(1, loss="1.0")
    assert len(out.getvalue().splitlines()) == 5  # at 40 s, 80 s, 120 s, 160 s, 200 s: never silent for 30 s
    last = out.getvalue().splitlines()[-1]  # 3,990 steps at 20 s: 79,800 s
    assert last == "step 10/4000 (0%) | loss 1.0 | elapsed 3m20s | eta 22h10m00s", last


def test_a_resumed_run_counts_its_eta_from_the_steps_it_ran_itself():
    out, clock = io.StringIO(), Clock()
    bar = Progress(40, initial=20, stream=out, clock=clock, every=10)
    for _ in range(10):
        clock.t += 1.0
        bar.update(1)
    assert out.getvalue().splitlines() == ["step 30/40 (75%) | elapsed 10s | eta 10s"]


def test_a_short_inner_loop_is_silent_in_a_log_unless_it_takes_30_seconds():
    out, clock = io.StringIO(), Clock()
    with Progress(4, desc="task metrics (generating)", unit="batch", transient=True, stream=out, clock=clock) as bar:
        for _ in range(4):
            clock.t += 2.0
            bar.update(1)
    assert out.getvalue() == ""
    with Progress(4, desc="task metrics (generating)", unit="batch", transient=True, stream=out, clock=clock) as bar:
        for _ in range(4):
            clock.t += 20.0
            bar.update(1)
    assert out.getvalue().splitlines() == ["task metrics (generating): batch 2/4 (50%) | elapsed 40s | eta 40s",
                                           "task metrics (generating): batch 4/4 (100%) | elapsed 1m20s"]


def test_a_disabled_progress_prints_nothing():
    out = io.StringIO()
    with Progress(10, stream=out, enabled=False) as bar:
        for _ in range(10):
            bar.update(1)
    assert out.getvalue() == ""


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 59, 61, 3600, 3725)] == ["0s", "59s", "1m01s", "1h00m00s", "1h02m05s"]


def test_third_party_bars_are_turned_off_only_off_a_terminal_and_a_users_setting_is_kept():
    env = {}
    quiet_library_bars(env, io.StringIO())
    assert env == {"TQDM_DISABLE": "1"}
    env = {"TQDM_DISABLE": "0"}
    quiet_library_bars(env, io.StringIO())
    assert env == {"TQDM_DISABLE": "0"}
    master, slave = pty.openpty()
    try:
        env = {}
        with os.fdopen(os.dup(slave), "w") as tty:
            quiet_library_bars(env, tty)
        assert env == {}
    finally:
        os.close(master)
        os.close(slave)


def _tiny_run(tmp_path, tiny_model, task_files):
    from tests.train.conftest import make_config

    return make_config(tmp_path, tiny_model, *task_files, max_steps=20, eval_every=10, eval_metrics="exact")


@pytest.mark.slow
def test_a_redirected_training_log_has_plain_lines_and_no_bar_frames(tmp_path, tiny_model, task_files, run_cli):
    cfg = _tiny_run(tmp_path, tiny_model, task_files)
    res = run_cli("train", str(cfg), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not re.search(r"[\r\x1b]", res.stderr), repr(res.stderr[-1500:])
    assert "Loading weights" not in res.stderr  # transformers' own bar follows the same rule
    steps = re.findall(r"^step (\d+)/20 \(\d+%\) \| loss \d+\.\d{4} \| tok_s [\d,]+ \| elapsed \S+", res.stderr,
                       flags=re.M)
    assert steps == [str(n) for n in range(2, 21, 2)], res.stderr[-2000:]


@pytest.mark.slow
def test_on_a_terminal_the_training_draws_tqdms_bar(tmp_path, tiny_model, task_files):
    cfg = _tiny_run(tmp_path, tiny_model, task_files)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal's size: tqdm fits to it
    proc = cli.popen("train", cfg, stdout=subprocess.DEVNULL, stderr=slave, full_env=cli.clean_env(drop=("TQDM_",)))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and re.search(r"20/20 \[[^\]]*loss=\d+\.\d{4}, tok_s=[\d,]+\]", text), text[-1500:]
    assert not re.search(r"^step \d+/20 \(", text, flags=re.M)  # the plain lines are for logs only
