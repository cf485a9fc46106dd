"""The planner's full fine-tuning terms (#38): resident AMP and optimizer_offload=host, exactly."""

import json
from dataclasses import replace

import pytest

from hwcompat import plan as P
from hwcompat.cli import main
from hwcompat.errors import InputError
from tests.shapes import QWEN3_4B, tiny_model_of as _model


def _shape(tmp_path, model_type="llama"):
    _model(model_type, tmp_path)
    return P.load_shape(str(tmp_path))


@pytest.mark.parametrize("dtype, copies", [("bfloat16", 2), ("float16", 2), ("float32", 0)])
def test_resident_full_terms_are_amp_s_sixteen_bytes_plus_the_autocast_copy(tmp_path, dtype, copies):
    shape = _shape(tmp_path)
    n = shape.params()
    bd = P.estimate(shape, P.PlanInput(method="full"), dtype, "sdpa", "nvidia", 80 << 30).breakdown
    assert bd["base_weights"] == 4 * n and bd["gradients"] == 4 * n and bd["optimizer_states"] == 8 * n
    assert bd["autocast_copies"] == copies * n


def test_host_offload_terms_card_and_host(tmp_path):
    shape = _shape(tmp_path)
    n = shape.params()
    host = P.Host(ram_bytes=64 << 30, pcie_generation=4, pcie_width=16)
    plan = P.estimate(shape, P.PlanInput(method="full", optimizer_offload="host"), "bfloat16", "sdpa", "nvidia",
                      80 << 30, host=host)
    bd = plan.breakdown
    assert bd["base_weights"] == 2 * n and bd["optimizer_states"] == 0
    assert bd["gradients"] == min(2 * n, P.HOST_GRAD_IN_FLIGHT + 2 * max(shape.tensor_sizes()))
    ho = plan.host_optimizer
    assert ho.host_bytes == 16 * n + 2 * n + P.HOST_RUNTIME  # masters, grads, moments; pinned bf16 staging
    assert ho.bytes_per_step == 2 * 2 * n and ho.link == "PCIe 4.0 x16" and ho.host_fits
    amd = P.estimate(shape, P.PlanInput(method="full", optimizer_offload="host"), "float16", "sdpa", "amd",
                     80 << 30, host=host)
    assert amd.host_optimizer.host_bytes == 16 * n + P.HOST_RUNTIME  # staging is the CUDA path's


def test_host_terms_match_what_the_host_optimizer_holds(tmp_path):
    """The 16 bytes per parameter are the real objects': masters + their gradients (HostOffload) and torch's
    AdamW state after a step."""
    import torch

    from hwcompat.train.host_optim import HostOffload

    model, _ = _model("llama", tmp_path)
    n = P.load_shape(str(tmp_path)).params()
    host = HostOffload(model, torch.device("cpu"), torch.float32)
    assert host.host_bytes() == 16 * n
    opt = torch.optim.AdamW(host.masters, fused=True)
    for m in host.masters:
        m.grad = torch.zeros_like(m)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    masters = sum(m.numel() * m.element_size() for m in host.masters)
    grads = sum(m.grad.numel() * m.grad.element_size() for m in host.masters)
    assert state == 8 * n and masters == 4 * n and grads == 4 * n


def test_auto_picks_resident_then_checkpointing_then_host(tmp_path):
    shape = _shape(tmp_path)

    def run_on(card_bytes, ram):
        def run(inp):
            return P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", card_bytes, host=P.Host(ram_bytes=ram))
        return run

    inp = P.PlanInput(method="full", seq_len=64, batch_size=1)
    big = P.decide_offload(shape, inp, "auto", run_on(80 << 30, 64 << 30), optimizer_offload="auto")
    assert big.optimizer_offload == "none" and not big.gradient_checkpointing and not big.changed
    resident = P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", 80 << 30).peak_bytes
    hosted = P.estimate(shape, P.PlanInput(method="full", seq_len=64, batch_size=1, optimizer_offload="host"),
                        "bfloat16", "sdpa", "nvidia", 80 << 30).peak_bytes
    small = P.decide_offload(shape, inp, "auto", run_on((resident + hosted) // 2, 64 << 30),
                             optimizer_offload="auto")
    assert small.optimizer_offload == "host" and "optimizer_offload=host" in small.changed
    poor = P.decide_offload(shape, inp, "auto", run_on((resident + hosted) // 2, 1 << 20), optimizer_offload="auto")
    assert poor.optimizer_offload == "none" and not poor.plan.fits
    assert any("host RAM is the limit" in n for n in poor.plan.notes)
    written = P.decide_offload(shape, inp, "auto", run_on(80 << 30, 64 << 30), optimizer_offload="host")
    assert written.optimizer_offload == "host"


@pytest.fixture
def qwen3_4b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    return str(tmp_path)


def test_qwen3_4b_full_on_a_24_gb_card_is_offloaded_and_says_the_host_ram(qwen3_4b, capsys):
    """The issue's acceptance plan: resident does not fit a 24 GB card; offloaded does, with the host RAM named."""
    assert main(["plan", "--model", qwen3_4b, "--emulate", "rtx4090", "--method", "full", "--host-ram-gib", "96",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["inputs"]["optimizer_offload"] == "host"
    assert out["breakdown"]["base_weights"] == P.load_shape(qwen3_4b).params() * 2  # the bf16 working copy
    assert out["host_optimizer"]["host_fits"] and 60 << 30 < out["host_optimizer"]["host_bytes"] < 96 << 30
    assert any("the resident full fine-tune does not fit" in n for n in out["notes"])
    assert main(["plan", "--model", qwen3_4b, "--emulate", "rtx4090", "--method", "full",
                 "optimizer_offload=none"]) == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "optimizer_states" in text
    assert main(["plan", "--model", qwen3_4b, "--emulate", "rtx4090", "--method", "full", "--host-ram-gib", "32"]) == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "host RAM is the limit" in text and "about 1.8B parameters" in text  # (32 - 1.5) GiB / 18 B


def test_streamed_host_offload_terms(tmp_path):
    """offload=layers with optimizer_offload=host: the card holds the embeddings, head and norms plus prefetch + 1
    layers of the working copy; the host holds that copy too (pinned), beside the 16 bytes a parameter."""
    shape = _shape(tmp_path)
    n = shape.params()
    inp = P.PlanInput(method="full", optimizer_offload="host", offload="layers", prefetch=1)
    plan = P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", 80 << 30, host=P.Host(ram_bytes=64 << 30))
    bd = plan.breakdown
    assert bd["base_weights"] == 2 * shape.resident_params() and bd["streamed_slots"] == 2 * 2 * shape.layer_params()
    assert plan.inputs.gradient_checkpointing  # each layer recomputed in backward
    pinned = shape.layers * shape.layer_params() * 2
    assert plan.host_optimizer.host_bytes == 16 * n + 2 * n + pinned + P.HOST_RUNTIME
    assert plan.stream is not None and plan.stream.host_ram_bytes is None  # one host figure: the optimizer's
    with pytest.raises(InputError, match="set optimizer_offload=host too"):
        P.estimate(shape, P.PlanInput(method="full", offload="layers"), "bfloat16", "sdpa", "nvidia", 80 << 30)


def test_auto_streams_the_working_copy_when_even_the_offloaded_copy_does_not_fit(tmp_path):
    shape = P.shape_from_config(QWEN3_4B, "qwen3-4b")
    base = P.PlanInput(method="full", seq_len=64, batch_size=1, gradient_checkpointing=True,
                       optimizer_offload="host")
    hosted = P.estimate(shape, base, "bfloat16", "sdpa", "nvidia", 80 << 30).peak_bytes
    streamed = P.estimate(shape, replace(base, offload="layers"), "bfloat16", "sdpa", "nvidia", 80 << 30).peak_bytes
    assert streamed < hosted
    card = (streamed + hosted) // 2

    def run(inp):
        return P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", card, host=P.Host(ram_bytes=128 << 30))

    choice = P.decide_offload(shape, P.PlanInput(method="full", seq_len=64, batch_size=1), "auto", run,
                              optimizer_offload="auto")  # e.g. a 4B model on an 8 GB card
    assert (choice.offload, choice.optimizer_offload, choice.gradient_checkpointing) == ("layers", "host", True)
    assert "offload=layers" in choice.changed and choice.plan.fits
    no_stream = P.decide_offload(shape, P.PlanInput(method="full", seq_len=64, batch_size=1), "auto", run,
                                 may_stream=False, optimizer_offload="auto")
    assert not no_stream.plan.fits
