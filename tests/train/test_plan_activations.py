"""#39 §1: the planner's activation term against an independent oracle, autograd itself.

Each case loads a tiny model of a supported family the way training does (``train.model.load_model``: peft LoRA with
fp32 adapters, a full fine-tune's fp32 masters or its half working copy), runs a forward under the profile's autocast
and adds up the storages ``torch.autograd.graph.saved_tensors_hooks`` sees while one middle decoder layer runs. Two
batch sizes cancel what does not grow with the batch (weights' casts, rotary tables); two sequence lengths split the
per-token bytes from the S^2 ones. The planner must agree to the byte: dropping any term it counts fails here.
"""

from types import SimpleNamespace

import pytest

FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM", "sdpa"),
            "mistral": ("MistralConfig", "MistralForCausalLM", "sdpa"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "sdpa"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "sdpa"),  # per-head q/k norms
            "gemma": ("GemmaConfig", "GemmaForCausalLM", "sdpa"),  # norms multiply in fp32
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "eager"),  # sandwich norms, soft-capped eager attention
            "phi3": ("Phi3Config", "Phi3ForCausalLM", "sdpa"),  # fused qkv and gate_up
            "llama-eager": ("LlamaConfig", "LlamaForCausalLM", "eager"),
            # hwcompat's CPU kernel: GQA without repeat_kv, the probabilities kept
            "llama-cpu_bf16": ("LlamaConfig", "LlamaForCausalLM", "cpu_bf16"),
            "qwen3-cpu_bf16": ("Qwen3Config", "Qwen3ForCausalLM", "cpu_bf16"),
            "phi3-cpu_bf16": ("Phi3Config", "Phi3ForCausalLM", "cpu_bf16")}
#: GQA (4 heads, 2 kv heads), head_dim 32, every width distinct enough that a dropped term shows.
SIZES = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, head_dim=32, pad_token_id=0)
RANK = 8
#: (what trains, the profile's dtype): LoRA in fp32 (Maxwell/Pascal, the CPU) and bf16; a resident full fine-tune
#: (fp32 masters, autocast); with optimizer_offload: host, its bf16 working copy.
CASES = [("adapters", "float32"), ("adapters", "bfloat16"), ("masters", "float32"), ("masters", "bfloat16"),
         ("working copy", "bfloat16")]


def _load(family, trained, dtype, folder):
    import torch
    import transformers

    from hwcompat.train.config import TrainConfig
    from hwcompat.train.model import load_model

    config_cls, model_cls, attention = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**SIZES)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(cfg).save_pretrained(folder)
    tc = TrainConfig(model=str(folder), train_data=["unused"], lora_r=RANK, lora_alpha=16, lora_dropout=0.0,
                     gradient_checkpointing=False, finetune="lora" if trained == "adapters" else "full",
                     optimizer_offload="host" if trained == "working copy" else "none")
    model = load_model(tc, SimpleNamespace(dtype=dtype, attention=attention), torch.device("cpu"))
    model.train()
    return model, cfg, attention


def _saved_bytes(model, dtype, batch, seq):
    """Bytes of the distinct storages autograd keeps while ``layers.1`` runs (parameters excluded)."""
    import torch

    from hwcompat.train.model import autocast

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.1"))
    inside, seen = [False], {}

    def pack(t):
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    ids = torch.randint(0, SIZES["vocab_size"], (batch, seq))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), dtype):
            model(input_ids=ids, labels=ids)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())


def _measured(model, dtype, short=48, long=80):
    """(bytes per token, bytes per sample per S^2): per sample P(S) = a*S + q*S^2, from batches of 4 minus 2."""
    per_sample = {s: (_saved_bytes(model, dtype, 4, s) - _saved_bytes(model, dtype, 2, s)) / 2 for s in (short, long)}
    square = (per_sample[long] / long - per_sample[short] / short) / (long - short)
    return per_sample[short] / short - square * short, square


@pytest.mark.parametrize("trained,dtype", CASES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_planner_counts_what_autograd_saves(family, trained, dtype, tmp_path):
    from hwcompat.plan import layer_activation_bytes, score_bytes, shape_from_config

    model, cfg, attention = _load(family, trained, dtype, tmp_path)
    per_token, per_square = _measured(model, dtype)
    shape = shape_from_config({**cfg.to_dict(), "model_type": cfg.model_type}, "tiny")
    act_db = 4 if dtype == "float32" else 2
    assert per_token == layer_activation_bytes(shape, RANK, trained, False, act_db, attention), (per_token, per_square)
    assert per_square == (shape.heads * score_bytes(shape, act_db, attention) if attention != "sdpa" else 0)


def test_the_estimate_uses_it_for_every_layer_and_the_scores(tmp_path):
    """The plan's activations term is layers x batch x seq x the per-layer bytes (no checkpointing), its
    attention_scores term the oracle's S^2 bytes per layer (eager)."""
    from hwcompat.plan import PlanInput, layer_activation_bytes, score_bytes, shape_from_config
    from hwcompat.plan.estimate import _activation_terms

    import transformers

    shape = shape_from_config(transformers.Gemma2Config(**SIZES).to_dict(), "tiny")
    inp = PlanInput(batch_size=2, seq_len=64, lora_rank=RANK, lora_dropout=False, gradient_checkpointing=False)
    bd = _activation_terms(shape, inp, 2, "eager", [])
    assert bd["activations"] == 3 * 2 * 64 * layer_activation_bytes(shape, RANK, "adapters", False, 2, "eager")
    assert bd["attention_scores"] == 3 * 2 * shape.heads * 64 * 64 * score_bytes(shape, 2)
