"""Untrusted input (#22): planted links, a folder's own code, shell output, Modelfile injection, special files, values
that must be refused, hangs and misleading messages.

Each test reproduces one reported case through the real CLI (or the one function every path goes through) and
asserts the message, the location and the exit code, and that nothing was written or lost. The run-folder and
resume cases are in tests/train/test_resume_and_cleanup.py, the signal phases in tests/train/test_signal_phases.py.
"""

import json
import os
import subprocess
import sys

import pytest

from tests import cli as hwcompat_cli
from tests.cli import assert_clean_error
from tests.conftest import TEXTS

CLEAN_ENV = hwcompat_cli.clean_env()


def cli(*args, env_extra=None, timeout=120, **kw):
    return hwcompat_cli.run(*args, env=env_extra, timeout=timeout, **kw)


# --- 1. files hwcompat writes never follow a planted link ----------------------------------------------------

def test_a_planted_lock_link_is_refused_and_its_target_untouched(model, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.symlink(victim, shared / ".m.gguf.lock")
    res = cli("export", model, "--gguf", shared / "m.gguf", "--no-verify")
    assert_clean_error(res, 2, "is a symbolic link")
    assert victim.read_text() == "precious\n" and not (shared / "m.gguf").exists()


def test_the_run_folder_lock_and_metrics_log_never_follow_links(tmp_path):
    from hwcompat.errors import InputError
    from hwcompat.fsutil import FolderLock, append_line

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / ".hwcompat.lock")
    with pytest.raises(InputError, match="symbolic link"):
        FolderLock(run, "hwcompat train")
    os.symlink(victim, run / "metrics.jsonl")
    with pytest.raises(InputError, match="symbolic link"):
        append_line(run / "metrics.jsonl", "{}")
    os.mkfifo(run / "fifo")
    with pytest.raises(InputError, match="not a regular file"):
        append_line(run / "fifo", "{}")
    assert victim.read_text() == "precious\n"


# --- 2. no folder's own Python code is ever offered or run -----------------------------------------------------

def _remote_code_folder(model, tmp_path):
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(model, folder)
    marker = tmp_path / "PWNED"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder, marker


@pytest.mark.slow
def test_data_check_refuses_a_tokenizer_that_needs_its_own_code(model, tmp_path, rows):
    folder, marker = _remote_code_folder(model, tmp_path)
    # a terminal on stdin would get transformers' "run the custom code? [y/N]": answer y to prove it is never asked
    res = cli("data", "check", rows, "--tokenizer", folder, input="y\n")
    assert_clean_error(res, 2, "auto_map", "trust_remote_code")
    assert not marker.exists()


def test_every_transformers_load_passes_trust_remote_code_explicitly():
    import ast
    from pathlib import Path

    import hwcompat

    missing = []
    for f in Path(hwcompat.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                if ast.unparse(node.func).startswith("PeftModel"):
                    continue  # an adapter: peft loads no code
                explicit = any(k.arg == "trust_remote_code" for k in node.keywords)
                via_kwargs = any(k.arg is None for k in node.keywords) and "trust_remote_code" in f.read_text()
                if not (explicit or via_kwargs):
                    missing.append(f"{f.name}:{node.lineno}")
    assert missing == []


@pytest.mark.slow
def test_a_missing_tokenizer_path_is_named_not_a_repo_id_error(tmp_path, rows):
    res = cli("data", "check", rows, "--tokenizer", tmp_path / "no-such-model")
    assert_clean_error(res, 2, "no such folder")
    assert "Repo id" not in res.stderr


# --- 3. every shell's output is safe to source -------------------------------------------------------------------

HOSTILE = ["`touch {m}`", "$(touch {m})", "a'b\"c\\d $HOME ; touch {m}", "\\`touch {m}\\`", "x\\"]


@pytest.mark.parametrize("value", HOSTILE)
def test_dotenv_sourced_by_sh_runs_nothing_and_keeps_the_value(tmp_path, value):
    marker = tmp_path / "PWNED"
    value = value.format(m=marker)
    res = cli("env", "--shell", "dotenv", "--set", f"env.HWX={value}")
    assert res.returncode == 0, res.stderr
    dotenv = tmp_path / ".env"
    dotenv.write_text(res.stdout)
    out = subprocess.run(["sh", "-c", f"set -a; . {dotenv}; printf %s \"$HWX\""], capture_output=True, text=True)
    assert not marker.exists()
    assert out.stdout == value.strip()


@pytest.mark.parametrize("value", HOSTILE)
def test_bash_output_sourced_runs_nothing(tmp_path, value):
    marker = tmp_path / "PWNED"
    value = value.format(m=marker)
    res = cli("env", "--set", f"env.HWX={value}")
    out = subprocess.run(["bash", "-c", res.stdout + '\nprintf %s "$HWX"'], capture_output=True, text=True)
    assert not marker.exists() and out.stdout == value.strip()


# --- 4. Modelfile directives cannot be injected ---------------------------------------------------------------

def test_a_system_prompt_that_would_close_the_block_is_refused_before_anything_is_written(model, tmp_path):
    out = tmp_path / "out"
    res = cli("export", model, "--gguf", out / "m.gguf", "--ollama", "--no-verify",
              "--system", 'hi"""\nFROM /etc/passwd\nPARAMETER num_ctx 1')
    assert_clean_error(res, 2, "--system", "Nothing was written")
    assert not out.exists() or not any(out.iterdir())


def test_a_gguf_name_with_a_line_break_is_refused(model, tmp_path):
    out = tmp_path / "out"
    res = cli("export", model, "--gguf", out / "m.gguf\nADAPTER evil.bin", "--ollama", "--no-verify")
    assert_clean_error(res, 2, "FROM line")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_the_printed_ollama_create_is_quoted_and_the_modelfile_parses(model, tmp_path):
    import shlex

    out = tmp_path / "my out"
    res = cli("export", model, "--gguf", out / "My_Model.gguf", "--ollama", "--no-verify",
              "--system", "Answer with 'JSON' only.\nBe brief.")
    assert res.returncode == 0, res.stderr
    cmd = next(x for x in res.stdout.splitlines() if x.startswith("run: ")).removeprefix("run: ")
    argv = shlex.split(cmd)
    assert argv[:2] == ["ollama", "create"] and argv[3] == "-f" and argv[4] == str(out / "My_Model.Modelfile")
    lines = (out / "My_Model.Modelfile").read_text().splitlines()
    directives = [x.split()[0] for x in lines if x and not x.startswith("#") and x.split()[0].isupper()]
    assert "ADAPTER" not in directives and directives.count("FROM") == 1 and directives.count("SYSTEM") == 1


@pytest.mark.parametrize("temperature", ["nan", "inf", "-5", "1e-300", "1000"])
def test_modelfile_temperature_must_be_usable(model, tmp_path, temperature):
    res = cli("export", model, "--gguf", tmp_path / "m.gguf", "--ollama", "--no-verify", "--temperature",
              temperature)
    assert_clean_error(res, 2, "--temperature")
    assert not (tmp_path / "m.gguf").exists()


def test_a_modelfile_that_is_a_folder_is_said_before_the_gguf_is_written(model, tmp_path):
    (tmp_path / "m.Modelfile").mkdir()
    res = cli("export", model, "--gguf", tmp_path / "m.gguf", "--ollama", "--no-verify")
    assert_clean_error(res, 2, "is a folder")
    assert not (tmp_path / "m.gguf").exists()


# --- 11. only regular files are read, with a bound ---------------------------------------------------------------

def _fifo(tmp_path, name):
    path = tmp_path / name
    os.mkfifo(path)
    return path


def test_data_check_of_a_fifo_with_no_writer_does_not_hang(tmp_path):
    res = cli("data", "check", _fifo(tmp_path, "train.jsonl"), timeout=60)
    assert res.returncode == 1 and "pipe or FIFO" in res.stderr and "Traceback" not in res.stderr


def test_data_check_of_dev_zero_is_refused_at_once(tmp_path):
    res = cli("data", "check", "/dev/zero", timeout=60)
    assert res.returncode == 1 and "is a device" in res.stderr


def test_dev_null_is_the_one_stated_exception():
    from hwcompat.userfile import read_regular

    assert read_regular("/dev/null", "config") == b""


def test_a_fifo_config_and_emulate_file_do_not_hang(tmp_path):
    res = cli("train", _fifo(tmp_path, "config.yaml"), timeout=60)
    assert_clean_error(res, 2, "pipe or FIFO")
    res = cli("detect", "--emulate-file", _fifo(tmp_path, "readings.yaml"), timeout=60)
    assert_clean_error(res, 2, "pipe or FIFO")


def test_a_fifo_in_the_profiles_dir_does_not_hang_detect(tmp_path):
    import shutil

    from hwcompat.datafiles import data_dir

    profiles = tmp_path / "profiles"
    shutil.copytree(data_dir("profiles"), profiles)
    _fifo(profiles, "zz.yaml")
    res = cli("detect", env_extra={"HWCOMPAT_PROFILES_DIR": str(profiles)}, timeout=60)
    assert res.returncode != 0 and "pipe or FIFO" in res.stderr and "Traceback" not in res.stderr


def test_process_substitution_data_is_refused_with_the_fix(tmp_path, model):
    """`train_data=<(…)` is a pipe: the launcher would read it and the trainer would see it empty."""
    script = f"{sys.executable} -m hwcompat data check <(printf '%s\\n' '{{\"prompt\":\"a\",\"completion\":\"b\"}}')"
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=CLEAN_ENV, timeout=60)
    assert res.returncode == 1 and "pipe or FIFO" in res.stderr and "write the content to a file" in res.stderr


# --- 12 and 15: config values that must be refused -----------------------------------------------------------------

def _config(tmp_path, model, rows, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: {model}\ntrain_data: [{rows}]\noutput_dir: {tmp_path / 'run'}\n" + text)
    return path


def test_num_threads_beyond_the_usable_cores_is_refused(tmp_path, model, rows):
    res = cli("train", _config(tmp_path, model, rows, ""), "num_threads=4096", "--print-config")
    assert_clean_error(res, 2, "num_threads=4096", f"may use {len(os.sched_getaffinity(0))} core(s)",
                       "command line")


def test_a_key_given_twice_is_an_error_with_its_line(tmp_path, model, rows):
    res = cli("train", _config(tmp_path, model, rows, "learning_rate: 1e-4\nlearning_rate: 1e-2\n"),
              "--print-config")
    assert_clean_error(res, 2, "cfg.yaml:5", "'learning_rate' is given twice (first on line 4)")


def test_a_nul_in_the_system_prompt_is_refused(tmp_path, model, rows):
    res = cli("train", _config(tmp_path, model, rows, 'system_prompt: "be \\0 brief"\n'), "--print-config")
    assert_clean_error(res, 2, "system_prompt", "NUL")


def test_a_non_utf8_system_prompt_from_argv_is_refused(tmp_path, model, rows):
    cfg = _config(tmp_path, model, rows, "")
    res = cli("train", cfg, b"system_prompt=caf\xe9", b"--print-config", text=False, timeout=60)
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 2 and "system_prompt" in err and "Traceback" not in err, err[-2000:]


def test_system_prompt_of_brackets_is_text_not_nesting(tmp_path, model, rows):
    res = cli("train", _config(tmp_path, model, rows, f'system_prompt: "{"[" * 201}"\n'), "--print-config")
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_output_dir_is_an_error(tmp_path, model, rows, value):
    res = cli("train", _config(tmp_path, model, rows, ""), f"output_dir={value}", "--print-config")
    assert_clean_error(res, 2, "output_dir is empty")


def test_a_range_error_from_the_command_line_names_the_command_line(tmp_path, model, rows):
    res = cli("train", _config(tmp_path, model, rows, ""), "learning_rate=5", "--print-config")
    assert_clean_error(res, 2, "command line: learning_rate: must be in")
    assert "cfg.yaml" not in res.stderr


def test_a_non_utf8_byte_in_output_dir_is_refused_before_training(tmp_path, model, rows):
    cfg = _config(tmp_path, model, rows, "max_steps: 1\n")
    res = cli("train", cfg, b"output_dir=" + str(tmp_path).encode() + b"/run\xff", text=False)
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 2 and "not UTF-8" in err and "Traceback" not in err, err[-2000:]
    assert not any(p.name.startswith("run") for p in tmp_path.iterdir())


@pytest.mark.parametrize("prompt,text", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant' after 'user'"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "expected 'user' after 'the start'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
     "expected 'assistant' after 'user', got 'system'"),
    ([{"role": "system", "content": "s"}], "the last turn must be 'user'"),
])
def test_dpo_conversational_prompts_follow_the_sft_turn_order(tmp_path, prompt, text):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": "x", "rejected": "y"}) + "\n")
    res = cli("data", "check", path, "--method", "dpo")
    assert res.returncode == 1 and f"{path}:1: prompt" in res.stderr and text in res.stderr, res.stderr


# --- 16. merge compares what identifies the model, not its folder's name --------------------------------------------

@pytest.mark.slow
def test_merging_into_an_already_merged_model_is_refused(trained_run, tmp_path):
    merged = tmp_path / "merged"
    assert cli("merge", trained_run, "--out", merged).returncode == 0
    res = cli("merge", trained_run, "--base", merged, "--out", tmp_path / "twice")
    assert_clean_error(res, 2, "is a merged model", "twice")
    assert not (tmp_path / "twice").exists()


def test_another_model_in_a_folder_of_the_same_name_is_refused(trained_run, tmp_path):
    from hwcompat.train.tiny import write_tiny

    other = write_tiny(tmp_path / "x" / "tiny", TEXTS[:5] + ["other words entirely"], hidden=64, layers=2,
                       chat_template=True)
    res = cli("merge", trained_run, "--base", other, "--out", tmp_path / "out")
    assert_clean_error(res, 2, "not the model the adapter was trained on")
    assert not (tmp_path / "out").exists()


# --- 17. sampling settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", ["inf", "nan", "1e-300", "-1"])
def test_generate_temperature_must_be_usable(trained_run, temperature):
    res = cli("generate", trained_run, "hello", "--temperature", temperature)
    assert_clean_error(res, 2, "--temperature")


@pytest.mark.slow
def test_generate_file_rows_are_checked_like_training_rows(trained_run, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps({"messages": ["not an object"]}),
                               json.dumps({"messages": [{"role": "assistant", "content": "only me"}]}),
                               json.dumps({"messages": [{"role": "user", "content": None}]}),
                               json.dumps({"prompt": "\ud800"})]) + "\n")
    res = cli("generate", trained_run, "--file", path)
    assert_clean_error(res, 2, f"{path}:1", f"{path}:2", f"{path}:3", f"{path}:4")


# --- 18. export --data: checked before the GGUF is written; prompt-only rows verify -----------------------------------

def test_export_data_rows_are_checked_before_the_gguf_is_written(model, tmp_path):
    from hwcompat.export.verify import prompts_from

    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(Exception, match=r"eval.jsonl:1: prompt: expected a string"):
        prompts_from(str(bad), 4)
    good = tmp_path / "prompts.jsonl"
    good.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    convs, refs = prompts_from(str(good), 4)
    assert refs is None and [c[-1] for c in convs] == [("assistant", ""), ("assistant", "")]
    answered = tmp_path / "answered.jsonl"
    answered.write_text(json.dumps({"prompt": "hello", "completion": "hi"}) + "\n")
    assert prompts_from(str(answered), 4)[1] == ["hi"]


# --- 7. SIGHUP (a closed terminal) ends merge and export as cleanly as SIGTERM ----------------------------------------

def test_sighup_during_export_exits_129_and_leaves_nothing(model, tmp_path):
    res = hwcompat_cli.run_patched("export", model, "--gguf", tmp_path / "m.gguf", "--no-verify", code="""
        import os, signal
        # a test run under nohup passes on an ignored SIGHUP, which hwcompat keeps ignored (by design): a user's
        # terminal hangup is what this test sends, so start from the default disposition
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        import hwcompat.export.gguf as G
        real = G._convert
        def convert(*a, **k):
            os.kill(os.getpid(), signal.SIGHUP)
            return real(*a, **k)
        G._convert = convert
    """)
    assert res.returncode == 129, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "terminated" in res.stderr
    assert list(tmp_path.iterdir()) == []
