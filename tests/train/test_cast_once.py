"""#41 §3: under autocast a LoRA layer without dropout takes its bf16 input as it is (peft cast it to the adapter's
fp32 and autocast cast it straight back): the same loss and gradients to the bit, fewer bytes kept for backward."""

import pytest

torch = pytest.importorskip("torch")


def _lora(tiny_model, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hwcompat.train.model import _adapters_in_fp32

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, trust_remote_code=False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter, so B's path carries a gradient to A
    return _adapters_in_fp32(model)


def _step(model, ids):
    """Loss, every adapter gradient and the bytes autograd kept (each storage once), under bf16 autocast."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, sum(kept.values())


def test_the_same_step_to_the_bit_with_less_kept(tiny_model):
    from hwcompat.train.model import _cast_once

    ids = torch.randint(3, 60, (2, 12))
    plain = _step(_lora(tiny_model, 0.0), ids)
    once = _step(_cast_once(_lora(tiny_model, 0.0)), ids)
    assert once[0] == plain[0] and once[1].keys() == plain[1].keys()
    assert all(torch.equal(once[1][n], plain[1][n]) for n in plain[1])
    assert once[2] < plain[2]  # q/k/v (and gate/up) share their input again: the round trip's copies are gone


def test_outside_autocast_and_with_dropout_peft_casts_as_before(tiny_model):
    from hwcompat.train.model import _cast_once

    model = _cast_once(_lora(tiny_model, 0.0))
    x = torch.randn(1, 3, model.config.hidden_size, dtype=torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer._cast_input_dtype(x, torch.float32).dtype == torch.float32  # no autocast: peft's cast stays
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._cast_input_dtype(x, torch.float32) is x
    dropped = _cast_once(_lora(tiny_model, 0.1))
    layer = dropped.base_model.model.model.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 dropout would round 1/(1-p): the fp32 path stays
        assert layer._cast_input_dtype(x, torch.float32).dtype == torch.float32
