"""Config loading: origins, unknown keys with suggestions, types, --print-config."""

import re
import pytest

from hwcompat.cli import main
from hwcompat.errors import InputError
from hwcompat.train.config import load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    (tmp_path / "t.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    return p


def test_origins_and_relative_paths(tmp_path):
    p = _write(tmp_path, "model: m\ntrain_data: [t.jsonl]\nlearning_rate: 0.001\n")
    loaded = load_config(p, ["learning_rate=5e-4", "lora_target_modules=q_proj,v_proj", "qlora=true"])
    cfg = loaded.config
    assert cfg.learning_rate == 5e-4 and loaded.origins["learning_rate"] == "command line"
    assert loaded.origins["model"] == "config file" and loaded.origins["seed"] == "default"
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.qlora is True
    assert cfg.train_data == [str(tmp_path / "t.jsonl")]  # relative to the config file


@pytest.mark.parametrize("text,override,message", [
    ("model: m\ntrain_data: [t.jsonl]\nlearning_rat: 1\n", None, "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
    ("model: m\ntrain_data: [t.jsonl]\n", "micro_batch=2", "command line: unknown key 'micro_batch'; did you mean 'micro_batch_size'?"),
    ("model: m\ntrain_data: [t.jsonl]\nmax_steps: lots\n", None, "max_steps: expected an integer, got 'lots'"),
    ("model: m\ntrain_data: [t.jsonl]\n", "qlora=maybe", "qlora: expected true or false, got 'maybe'"),
    ("model: m\ntrain_data: [t.jsonl]\ndata_format: csv\n", None,
     "data_format: 'csv' is not one of: auto, prompt_completion, messages, sharegpt, alpaca"),
    ("model: m\ntrain_data: [t.jsonl]\n", "lora_dropout=1.5", "lora_dropout: must be in [0, 1)"),
    ("train_data: [t.jsonl]\n", None, "model: missing"),
    ("model: m\ntrain_data: [t.jsonl\n", None, "not valid YAML"),
    ("- a\n", None, "expected a mapping of key: value, got list"),
])
def test_bad_config(tmp_path, text, override, message):
    p = _write(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_config(p, [override] if override else [])
    assert message in str(e.value)


def test_print_config_shows_profile_origins(tmp_path, capsys):
    p = _write(tmp_path, "model: m\ntrain_data: [t.jsonl]\n")
    assert main(["train", str(p), "--print-config", "--emulate", "v100", "micro_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# device: Tesla V100-SXM2-32GB (nvidia:0) (emulated), profile volta")
    assert re.search(r'^dtype +: "float16"  # profile$', out, re.M)
    assert re.search(r'^compile_backend +: "inductor"  # profile$', out, re.M)
    assert re.search(r'^micro_batch_size +: 2  # command line$', out, re.M)
    assert 'env.PYTORCH_CUDA_ALLOC_CONF : "expandable_segments:True"  # profile' in out


def test_config_contradicting_hardware_is_refused(tmp_path, capsys):
    p = _write(tmp_path, "model: m\ntrain_data: [t.jsonl]\ndtype: bfloat16\n")
    assert main(["train", str(p), "--print-config", "--emulate", "v100"]) == 2
    err = capsys.readouterr().err
    assert "dtype=bfloat16: Tesla V100-SXM2-32GB (sm_70) has no bf16 hardware" in err
    assert "set force=true to try anyway" in err


def test_force_overrides_with_reason(tmp_path, capsys):
    p = _write(tmp_path, "model: m\ntrain_data: [t.jsonl]\ncompile_backend: inductor\nforce: true\n")
    assert main(["train", str(p), "--print-config", "--emulate", "p40"]) == 0
    captured = capsys.readouterr()
    assert re.search(r'^compile_backend +: "inductor"  # config file$', captured.out, re.M)
    assert "force=true: running despite: compile_backend=inductor" in captured.err


def test_emulated_gpu_cannot_really_train(tmp_path, capsys):
    p = _write(tmp_path, "model: m\ntrain_data: [t.jsonl]\n")
    assert main(["train", str(p), "--emulate", "t4"]) == 2
    assert "is emulated: there is no such card to train on" in capsys.readouterr().err
