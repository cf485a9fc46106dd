"""#39 §1: the planner's streamed-step terms against oracles that do not restate its formulas: the link rate against
what NVIDIA's bandwidthTest measures on a real PCIe link, and the compute term against the FLOPs torch counts
(torch.utils.flop_counter) in a real frozen-base step with gradient checkpointing."""

import json

import pytest

from hwcompat import plan as P


@pytest.mark.parametrize("gen,measured", [(3, 12.3e9), (4, 25.0e9)])
def test_the_link_rate_is_what_a_pinned_copy_measures(gen, measured):
    """bandwidthTest's pinned host-to-device figures (catalog/throughput.yaml cites them): ~12.3 GB/s on PCIe 3.0 x16,
    ~25 GB/s on 4.0 x16. The planner's rate for the same links lies within 5 % of each."""
    from hwcompat.plan.host import pcie_link

    _, _, rate = pcie_link(P.Host(pcie_generation=gen, pcie_width=16))
    assert rate == pytest.approx(measured, rel=0.05)
    _, _, eight = pcie_link(P.Host(pcie_generation=gen, pcie_width=8))
    assert eight == pytest.approx(rate / 2)  # half the lanes, half the rate


def test_the_streamed_compute_term_is_the_flops_torch_counts(tmp_path):
    """A streamed LoRA micro-step runs the frozen base forward, again in backward (each layer recomputed), and its
    input gradients: torch counts those matmul FLOPs here on a tiny Llama (no adapters, which the term leaves out).
    The planner's term must cover them (it also counts the embedding and the head as full layers, so it may be
    above) and stay within 10 % of them where the embedding and the head are small beside the decoder."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from hwcompat.plan.host import throughput_table

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=32,
                                      tie_word_embeddings=False, attn_implementation="eager")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, seq = 2, 16
    ids = torch.randint(0, 32, (batch, seq))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # what an adapter's gradient needs
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds, labels=ids).loss.backward()
    counted = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counted.items() if str(op) in ("aten.mm", "aten.addmm"))
    peak = 1.0  # TFLOPS: any figure; the term is FLOPs over it
    plan = P.estimate(P.load_shape(str(tmp_path)), P.PlanInput(seq_len=seq, batch_size=batch, offload="layers",
                                                               lora_rank=8),
                      "float32", "eager", "nvidia", 80 * P.GIB, host=P.Host(ram_bytes=64 * P.GIB, peak_tflops=peak))
    planned = plan.stream.compute_seconds * peak * 1e12 * throughput_table()["sustained_fraction"]
    assert matmuls <= planned <= 1.10 * matmuls, (planned, matmuls)


def test_the_estimate_reads_no_file_once_its_inputs_are_made(tmp_path, monkeypatch):
    """#39 §3: estimate is a pure function of its inputs; the throughput table travels in the Host."""
    import builtins

    import hwcompat.yamlfile

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32}))
    shape = P.load_shape(str(tmp_path))
    host = P.Host(ram_bytes=64 * P.GIB, pcie_generation=4, pcie_width=16, peak_tflops=10.0)

    def refuse(*a, **k):
        raise AssertionError("estimate read a file")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(hwcompat.yamlfile, "load_packaged_yaml", refuse)
    streamed = P.estimate(shape, P.PlanInput(seq_len=64, offload="layers"), "bfloat16", "sdpa", "nvidia", 8 * P.GIB,
                          host=host)
    hosted = P.estimate(shape, P.PlanInput(method="full", seq_len=64, optimizer_offload="host"), "bfloat16", "sdpa",
                        "nvidia", 8 * P.GIB, host=host)
    assert streamed.stream.copy_seconds > 0 and hosted.host_optimizer.copy_seconds > 0


@pytest.mark.parametrize("accumulation", [1, 3])
def test_the_host_optimizer_copies_are_the_bytes_a_real_step_moves(tmp_path, accumulation):
    """bytes_per_step against the copies a real optimizer_offload=host step makes (train/host_optim.py): every
    gradient that leaves the working copy, counted where autograd hands it over (once per micro-step), and every
    weight written back into the working copy, counted by a dispatch mode on copy_ into a working parameter."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from hwcompat.train.host_optim import HostOffload
    from tests.shapes import tiny_model_of

    model, _ = tiny_model_of("llama", tmp_path)
    model = model.to(torch.bfloat16)
    down = []
    for p in model.parameters():  # registered first, so it sees the gradient before HostOffload takes it
        p.register_post_accumulate_grad_hook(lambda p: down.append(p.grad.numel() * p.grad.element_size()))
    host = HostOffload(model, torch.device("cpu"), torch.bfloat16)
    working = {p.untyped_storage().data_ptr() for p in host.working}

    class Writes(TorchDispatchMode):
        up = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default and args[0].untyped_storage().data_ptr() in working:
                Writes.up += args[0].numel() * args[0].element_size()
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(accumulation):
        model(input_ids=ids, labels=ids).loss.backward()
        host.flush()
    torch.optim.AdamW(host.masters, fused=True).step()
    with Writes():
        host.push()
    moved = sum(down) + Writes.up
    inp = P.PlanInput(method="full", optimizer_offload="host", gradient_accumulation=accumulation)
    planned = P.estimate(P.load_shape(str(tmp_path)), inp, "bfloat16", "sdpa", "nvidia", 80 << 30,
                         host=P.Host(ram_bytes=64 << 30)).host_optimizer.bytes_per_step
    assert Writes.up > 0 and len(down) == accumulation * len(host.working)
    assert planned == moved, f"planned {planned:,} bytes per step, a real step moved {moved:,}"
