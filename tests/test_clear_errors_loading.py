"""Loading what the user points at (tokenizers, chat templates, adapters, runs to eval, merge and export inputs): a
mistake that was a traceback (#22) is one clear message (what, where, the fix) and an exit code."""

import json
import shutil
import struct

import pytest

from tests.cli import assert_clean_error, run as cli


def _copy(model, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(model, dst)
    return dst


# --- tokenizers and chat templates ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_with_a_corrupt_tokenizer_json_is_a_clear_error(model, tmp_path, rows):
    tok = _copy(model, tmp_path, "tok")
    (tok / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model}\ntokenizer: {tok}\ntrain_data: [{rows}]\noutput_dir: {tmp_path / 'run'}\n"
                   "max_steps: 1\neval_metrics: none\nnum_threads: 1\n")
    res = cli("train", cfg, timeout=300)
    assert_clean_error(res, 2, f"tokenizer {tok}: cannot load it")


def _gemma_like(model, tmp_path):
    """A tokenizer whose chat template refuses a system message, as Gemma's does."""
    tok = _copy(model, tmp_path, "gemma")
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok / "chat_template.jinja").unlink(missing_ok=True)
    return tok


@pytest.mark.slow
def test_a_chat_template_that_raises_is_a_data_error_with_file_and_line(model, tmp_path):
    tok = _gemma_like(model, tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                    + "\n" + json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}) + "\n")
    res = cli("data", "check", data, "--tokenizer", tok)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{data}:2: the tokenizer's chat template refused this conversation (System role not supported)" in \
        res.stderr, res.stderr[-2000:]


def test_data_check_max_seq_len_below_range_blames_the_flag(rows):
    res = cli("data", "check", rows, "--max-seq-len", "-5")
    assert_clean_error(res, 2, "--max-seq-len -5: must be in")
    assert f"{rows}:1" not in res.stderr


# --- init_adapter ---------------------------------------------------------------------------------------------------

def _init_adapter_run(tmp_path, model, rows, adapter):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model}\ntrain_data: [{rows}]\noutput_dir: {tmp_path / 'run2'}\ninit_adapter: {adapter}\n"
                   "max_steps: 1\neval_metrics: none\nnum_threads: 1\nlora_r: 16\nlora_alpha: 32\n")
    return cli("train", cfg, timeout=300)


def _adapter_copy(trained_run, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", dst)
    return dst


@pytest.mark.slow
def test_init_adapter_config_that_is_a_list(trained_run, model, rows, tmp_path):
    a = _adapter_copy(trained_run, tmp_path)
    (a / "adapter_config.json").write_text("[1, 2]")
    assert_clean_error(_init_adapter_run(tmp_path, model, rows, a), 2, "expected a JSON object")


def test_init_adapter_with_r_as_a_string_says_so(trained_run, model, rows, tmp_path):
    a = _adapter_copy(trained_run, tmp_path)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = str(cfg["r"])
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    res = _init_adapter_run(tmp_path, model, rows, a)
    assert_clean_error(res, 2, 'r: expected a number, got "16"')
    assert "set lora_r" not in res.stderr


def test_init_adapter_truncated(trained_run, model, rows, tmp_path):
    a = _adapter_copy(trained_run, tmp_path)
    f = a / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    assert_clean_error(_init_adapter_run(tmp_path, model, rows, a), 2, "adapter_model.safetensors", "truncated")


def test_init_adapter_from_another_base(trained_run, rows, tmp_path):
    from hwcompat.train.tiny import write_tiny

    other = write_tiny(tmp_path / "other" / "tiny", ["some other text entirely"] * 20, hidden=64, layers=2,
                       chat_template=True)
    res = _init_adapter_run(tmp_path, other, rows, trained_run / "adapter")
    assert_clean_error(res, 2, "was trained on another base model")


# --- eval / generate ------------------------------------------------------------------------------------------------

def test_eval_general_with_a_damaged_summary_is_said_before_the_compute(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".hwcompat.lock"))
    (run / "summary.json").write_text('{"steps": ')
    res = cli("eval", run, "--general", timeout=300)
    assert_clean_error(res, 2, "summary.json", "not valid JSON")
    assert "general prompts" not in res.stderr


@pytest.mark.slow
def test_generate_with_a_half_written_adapter(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".hwcompat.lock"))
    f = run / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:300])
    assert_clean_error(cli("generate", run, "hello"), 2, "adapter_model.safetensors", "not a valid safetensors file")


@pytest.mark.slow
def test_generate_after_the_base_model_folder_is_gone(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".hwcompat.lock"))
    spec = json.loads((run / "run.json").read_text())
    spec["config"]["model"] = str(tmp_path / "moved-away")
    (run / "run.json").write_text(json.dumps(spec))
    res = cli("generate", run, "hello")
    assert_clean_error(res, 2, "base model", "is gone")
    assert "Repo id" not in res.stderr


# --- merge and export inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_merge_with_a_base_config_that_is_not_an_object(trained_run, model, tmp_path, text, message):
    base = _copy(model, tmp_path, "base")
    (base / "config.json").write_text(text)
    res = cli("merge", trained_run, "--base", base, "--out", tmp_path / "out", "--force")
    assert_clean_error(res, 2, "config.json", message)
    assert not (tmp_path / "out").exists()


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_an_unknown_safetensors_dtype_is_named(trained_run, model, tmp_path):
    base = _copy(model, tmp_path, "base")

    def f8(h):
        name = next(k for k in h if k != "__metadata__" and h[k]["dtype"] == "F32")
        h[name]["dtype"] = "F8_E4M3"
    _rewrite_header(base / "model.safetensors", f8)
    res = cli("merge", trained_run, "--base", base, "--out", tmp_path / "out", "--force")
    assert_clean_error(res, 2, "F8_E4M3", "does not read")


def test_a_header_whose_shapes_disagree_with_offsets(model, tmp_path, rows):
    base = _copy(model, tmp_path, "base")

    def grow(h):
        name = next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)
        h[name]["shape"] = [h[name]["shape"][0] * 2, h[name]["shape"][1]]
    _rewrite_header(base / "model.safetensors", grow)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {base}\ntrain_data: [{rows}]\noutput_dir: {tmp_path / 'run'}\n")
    for args in (["export", base, "--gguf", tmp_path / "m.gguf", "--no-verify"], ["train", cfg]):
        res = cli(*args)
        assert res.returncode == 2 and "its offsets hold" in res.stderr and "Traceback" not in res.stderr, (
            args, res.stderr[-2000:])


@pytest.mark.parametrize("edit,message", [
    (lambda cfg: cfg.pop("intermediate_size"), "intermediate_size: expected a positive integer"),
    (None, "not valid JSON"),
])
def test_export_with_a_damaged_config(model, tmp_path, edit, message):
    m = _copy(model, tmp_path)
    if edit is None:
        (m / "config.json").write_text("{")
    else:
        cfg = json.loads((m / "config.json").read_text())
        edit(cfg)
        (m / "config.json").write_text(json.dumps(cfg))
    res = cli("export", m, "--gguf", tmp_path / "out.gguf", "--no-verify")
    assert_clean_error(res, 2, message)
    assert not (tmp_path / "out.gguf").exists()


def test_export_ollama_with_a_damaged_tokenizer_config(model, tmp_path):
    m = _copy(model, tmp_path)
    (m / "tokenizer_config.json").write_text("{")
    res = cli("export", m, "--gguf", tmp_path / "out.gguf", "--no-verify", "--ollama")
    assert res.returncode == 2 and "tokenizer_config.json" in res.stderr and "Traceback" not in res.stderr, \
        res.stderr[-2000:]
