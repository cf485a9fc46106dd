"""`hwcompat env`: what it prints is safe to eval in each shell and says exactly the values."""

import shutil
import subprocess

import pytest

TRICKY = "a'b \"c\" \\d $HOME `x` ;e"


def test_variable_names_cannot_inject_commands(run_cli, tmp_path):
    marker = tmp_path / "p"
    res = run_cli("env", "--set", f"env.X;touch {marker}=1")
    assert res.returncode == 2 and "is not a valid environment variable name" in res.stderr
    assert res.stdout == "" and not marker.exists()


def test_code_loading_variables_need_allow_env(run_cli):
    res = run_cli("env", "--set", "env.LD_PRELOAD=/tmp/x.so")
    assert res.returncode == 2 and "--allow-env LD_PRELOAD" in res.stderr
    res = run_cli("env", "--set", "env.LD_PRELOAD=/tmp/x.so", "--allow-env", "LD_PRELOAD")
    assert res.returncode == 0 and "export LD_PRELOAD=/tmp/x.so" in res.stdout


def test_bash_eval_gives_back_the_exact_value(run_cli):
    out = run_cli("env", "--set", f"env.HWX={TRICKY}").stdout
    res = subprocess.run(["bash", "-c", out + '\nprintf %s "$HWX"'], capture_output=True, text=True)
    assert res.stdout == TRICKY.strip()


@pytest.mark.skipif(not shutil.which("fish"), reason="fish not installed (.ci/run installs it)")
def test_fish_source_gives_back_the_exact_value(run_cli):
    out = run_cli("env", "--shell", "fish", "--set", f"env.HWX={TRICKY}").stdout
    res = subprocess.run(["fish", "-c", out + '\nprintf %s "$HWX"'], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == TRICKY.strip()


def test_fish_quoting_rules_without_fish():
    from hwcompat.cli.env import _fish_quote
    assert _fish_quote("it's") == "'it\\'s'" and _fish_quote("a\\\\b") == "'a\\\\\\\\b'"


def test_dotenv_quotes_and_refuses_line_breaks():
    from hwcompat.cli.env import format_env
    from hwcompat.errors import InputError

    assert format_env({"A": 'x "y" $z'}, "dotenv") == 'A="x \\"y\\" \\$z"'
    with pytest.raises(InputError, match="line break"):
        format_env({"A": "x\ny"}, "dotenv")
