"""#40 §5: the first install command is right for the machine it runs on: `hwcompat env --install-torch` names the
card's wheel index (the CPU build on a CPU machine, with PyPI as its fallback; a card's own index, no stand-in)."""

import os
import shlex
import subprocess

import pytest

from tests import cli
from packaging.requirements import Requirement


def _line(*args):
    return cli.run("env", "--install-torch", *args)


def _commands(line):
    return [shlex.split(part) for part in line.split(" || ")]


@pytest.mark.parametrize("args, index, fallback", [
    (["2.13.0", "--emulate", "cpu"], "https://download.pytorch.org/whl/cpu", True),
    (["--emulate", "m40"], "https://download.pytorch.org/whl/cu126", False),
    (["2.13.0", "--emulate", "rtx4090"], "https://download.pytorch.org/whl/cu130", False),
    (["2.13.0", "--emulate", "rx6600"], None, False),
    (["--emulate", "b580"], "https://download.pytorch.org/whl/xpu", False),
])
def test_the_printed_install_parses_and_names_the_cards_index(args, index, fallback):
    res = _line(*args)
    assert res.returncode == 0, res.stderr
    cmds = _commands(res.stdout.strip())
    assert len(cmds) == (2 if fallback else 1)
    first = cmds[0]
    assert first[:4] == ["python3", "-m", "pip", "install"]
    req = Requirement(first[4])
    assert req.name == "torch" and ("==2.13.0" in str(req.specifier)) == ("2.13.0" in args)
    if index:
        assert first[first.index("--index-url") + 1] == index
    if fallback:
        assert cmds[1] == ["python3", "-m", "pip", "install", first[4]]  # PyPI's wheel of the same requirement


def test_a_version_outside_the_cards_window_is_refused():
    res = _line("2.15.0", "--emulate", "m40")
    assert res.returncode == 2 and "the maxwell profile needs torch<2.15" in res.stderr


def test_the_cpu_line_runs(tmp_path):
    """Executed as the README runs it (a dry run: this machine has the pinned torch, so pip resolves it offline)."""
    res = _line("2.13.0")
    env = {**os.environ, "PIP_RETRIES": "0", "PIP_TIMEOUT": "5"}
    line = res.stdout.strip().replace("pip install", "pip install --dry-run -q")
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_readmes_commands_are_what_ci_and_this_test_run():
    from hwcompat.images import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("## Two commands", 1)[1].split("```bash\n")[1:3]]
    demo, tests = blocks
    assert demo.split(" && ")[:2] == ["python3 -m pip install -e .",
                                     'eval "$(python3 -m hwcompat env --install-torch 2.13.0)"']
    assert demo.endswith("python3 -m hwcompat demo")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == tests  # .ci/run runs the README's test command verbatim
