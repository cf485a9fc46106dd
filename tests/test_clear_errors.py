"""User mistakes that used to end in a traceback: each is one clear message (what, where, the fix) and an exit code."""

import errno
import json
import struct
from pathlib import Path

import pytest

from tests import cli

from hwcompat.errors import HwcompatError, InputError

def _cli(*args, timeout=300):
    return cli.run(*args, timeout=timeout)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("a") / "adapter"
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    m.save_pretrained(str(path))
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,why", [
    (lambda b: b[:4], "shorter than the 8-byte header length"),
    (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header length"),
    (lambda b: b[:8] + b"not json" + b[16:], "the header is not JSON"),
    (lambda b: b[: len(b) // 2], "truncated: the tensors need"),
])
def test_damaged_safetensors_named_in_merge_export_and_train(tmp_path, model, adapter, damage, why):
    bad = _copy(model, tmp_path / "tiny")  # the adapter names its base "tiny"
    f = bad / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    for res in (_cli("merge", adapter, "--base", bad, "--out", tmp_path / "merged"),
                _cli("export", bad, "--gguf", tmp_path / "m.gguf")):
        assert res.returncode == 2, res.stderr[-1500:]
        assert f"{f}: not a valid safetensors file (" in res.stderr and why in res.stderr
        assert "Traceback" not in res.stderr
    from hwcompat.pipeline.preflight import check_model
    with pytest.raises(InputError, match="not a valid safetensors file"):
        check_model(str(bad), allow_network=False)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"peft_type": "LORA", "lora_alpha": 8}', "r: missing (the LoRA rank)"),
    ('{"peft_type": "LORA", "r": "16", "lora_alpha": 8}', "r: expected a positive number, got '16'"),
    ('{"peft_type": "LORA", "r": 0, "lora_alpha": 8}', "r: expected a positive number, got 0"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj(": 8}}',
     "rank_pattern: 'q_proj(' is not a valid regular expression"),
])
@pytest.mark.slow
def test_every_corrupt_adapter_config_form(tmp_path, model, adapter, content, message):
    bad = _copy(adapter, tmp_path / "adapter")
    (bad / "adapter_config.json").write_text(content)
    res = _cli("merge", bad, "--base", model, "--out", tmp_path / "merged")
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
    assert f"{bad / 'adapter_config.json'}" in res.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_of_a_run_with_a_damaged_run_json(tmp_path, adapter):
    run = tmp_path / "run"
    _copy(adapter, run / "adapter")
    (run / "run.json").write_text("{broken")
    res = _cli("merge", run, "--out", tmp_path / "merged")
    assert res.returncode == 2 and "run.json is damaged" in res.stderr and "--base MODEL_DIR" in res.stderr


def test_disk_full_is_refused_before_writing(tmp_path, model, adapter, monkeypatch):
    import shutil
    from collections import namedtuple

    from hwcompat.export.gguf import export_gguf
    from hwcompat.merge import merge

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 10))
    with pytest.raises(HwcompatError, match=r"no space left for the merged model .* MB needed, 0 MB free.*Nothing was"):
        merge(adapter, model, tmp_path / "merged", log=lambda m: None)
    with pytest.raises(HwcompatError, match=r"no space left for the f16 GGUF"):
        export_gguf(model, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_checkpointing(tmp_path, monkeypatch):
    import torch

    from hwcompat.train import checkpoint

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as e:  # the loop decides what a full disk means (tests/train/test_disk_full.py)
        checkpoint.save(tmp_path, 7, model, opt, sched, None, {}, keep=2)
    from hwcompat.train.diskspace import disk_full

    assert disk_full(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []  # the partial checkpoint is gone


def test_symlink_loops_for_data_and_output_dir(tmp_path, model):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "loop.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": str(model), "train_data": [str(loop)], "output_dir": str(tmp_path / "r")}))
    res = _cli("train", cfg)
    assert res.returncode == 2 and f"{loop}: cannot read" in res.stderr and "Traceback" not in res.stderr
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    out = tmp_path / "out"
    out.symlink_to(out)
    cfg.write_text(json.dumps({"model": str(model), "train_data": [str(data)], "output_dir": str(out)}))
    res = _cli("train", cfg)
    assert res.returncode == 2 and "is a symbolic link that leads nowhere" in res.stderr, res.stderr[-1500:]
    assert "Traceback" not in res.stderr


def test_output_dir_that_cannot_be_created(tmp_path, model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": str(model), "train_data": [str(data)], "output_dir": str(blocker / "run")}))
    res = _cli("train", cfg)
    assert res.returncode == 2 and "cannot create it" in res.stderr and "Traceback" not in res.stderr
