"""selftest on this machine's CPU for real (through `hwcompat train`), and on a GPU when there is one."""

import json

import pytest

from hwcompat import selftest


@pytest.mark.slow
def test_selftest_cpu_runs_the_shipped_recipe(run_cli, tmp_path):
    """The selftest's training is `hwcompat train`: the run folder holds the recipe's own records."""
    out, keep = tmp_path / "st.json", tmp_path / "work"
    res = run_cli("selftest", "--json", "--steps", "12", "--out", str(out), "--keep", str(keep), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["passed"] and data["profile"] == "cpu" and not data["emulated"]
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["kernels"]["ok"] and checks["finite"]["ok"] and checks["learns"]["ok"]
    assert checks["memory"]["ok"] is None  # no allocator statistics on the CPU
    assert data["tokens_per_s"] > 0 and data["achieved_tflops"] > 0 and data["mfu"] is None
    run = keep / "run"
    spec = json.loads((run / "run.json").read_text())
    assert spec["config"]["method"] == "sft" and spec["profile"]["name"] == "cpu"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in steps if r["kind"] == "train"] == data["losses"] and len(data["losses"]) == 12
    assert json.loads((run / "summary.json").read_text())["profile"] == "cpu"


@pytest.mark.slow
def test_selftest_emulated_profile_path_on_the_cpu(run_cli, tmp_path):
    """--emulate m40 --cpu-emulation: the Maxwell profile's choices through the launcher, no MFU against a card."""
    out = tmp_path / "st.json"
    res = run_cli("selftest", "--steps", "6", "--emulate", "m40", "--cpu-emulation", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["profile"] == "maxwell" and data["dtype"] == "float32" and data["emulated"]
    assert data["mfu"] is None and "PASS  learns" in res.stdout and res.stdout.strip().endswith("PASS")


def test_selftest_refuses_an_emulated_card_without_cpu_emulation_and_a_used_folder(run_cli, tmp_path):
    res = run_cli("selftest", "--emulate", "v100")
    assert res.returncode == 2 and "--cpu-emulation" in res.stderr
    (tmp_path / "mine.txt").write_text("keep")
    res = run_cli("selftest", "--keep", str(tmp_path))
    assert res.returncode == 2 and "not an empty folder" in res.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_failed_training_is_a_failed_check_with_the_reason(tmp_path):
    import subprocess

    res = selftest.SelftestResult("card", "volta", "float16", "sdpa", "eager", False, [])
    proc = subprocess.CompletedProcess([], 1, "", "RuntimeError: CUDA error: no kernel image is available\n")
    selftest._judge(res, proc, tmp_path / "run", on_gpu=True, fix_hint="pip install torch --index-url X")
    (check,) = res.checks
    assert check.ok is False and "no kernel image" in check.detail and check.fix.startswith("pip install")


def test_learning_checks():
    ok = selftest.learning_checks([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [1.0] * 6)
    assert [c.ok for c in ok] == [True, True]
    flat = selftest.learning_checks([6.0] * 6, [1.0] * 6)
    assert [c.ok for c in flat] == [True, False]
    nan = selftest.learning_checks([6.0, float("nan")], [1.0, 1.0])
    assert nan[0].ok is False and "float32" in nan[0].fix


def test_lora_flops_count_frozen_weights_at_four_and_trained_at_six():
    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=10)
    frozen = 8 * 8 * 2 + 8 * 4 * 2 + 8 * 16 * 3 + 8 * 10  # q o, k v, MLP, head
    trained = 2 * ((8 + 8) * 2 + (8 + 4) * 2 + (8 + 16) * 3)
    assert selftest.lora_flops_per_token(cfg, 2, 32) == 4 * frozen + 6 * trained + 6 * 32 * 8


def test_lora_flops_match_what_torch_counts_in_a_real_step():
    """#39 §1: an independent oracle, torch.utils.flop_counter.FlopCounterMode over a real LoRA forward and backward
    (peft, all-linear, eager attention). The matmuls are the formula's, less what autograd skips in the first layer
    (its q/k/v input carries no gradient: no input gradient of the frozen q/k/v, none through their adapters' A);
    eager attention computes the masked half of the scores too, so it counts twice the formula's causal figure."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from hwcompat import selftest

    cfg = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="eager"))
    rank, batch, seq = 4, 2, 16
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    ids = torch.randint(0, 100, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = {str(op): n / (batch * seq) for op, n in counter.get_flop_counts()["Global"].items()}
    h, kv = 64, 32
    attention = 6 * cfg["num_hidden_layers"] * seq * h
    first_layer = 2 * (h * h + 2 * h * kv) + 2 * rank * h * 3
    assert counts["aten.mm"] == selftest.lora_flops_per_token(cfg, rank, seq) - attention - first_layer
    assert counts["aten.bmm"] == 2 * attention


def test_model_flops_match_nemo_automodel_count():
    """#25: NeMo AutoModel's llama3_flops per token: 6 FLOPs per weight (GEMM forward, wgrad, dgrad) plus causal
    attention and the head. On a GQA-free Llama it is 6N + 6 * layers * seq * hidden, counted by hand here."""
    from hwcompat import selftest

    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=10)
    weights = 2 * (4 * 8 * 8 + 3 * 8 * 16) + 8 * 10  # q k v o, gate up down per layer; the head
    assert selftest.model_flops_per_token(cfg, 32) == 6 * weights + 6 * 2 * 32 * 8
    # Llama-3-8B at 8,192 tokens: NeMo's count is ~1.3x our LoRA count (no weight gradients of frozen weights)
    l3 = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=128256)
    ratio = selftest.model_flops_per_token(l3, 8192) / selftest.lora_flops_per_token(l3, 16, 8192)
    assert 1.2 < ratio < 1.6


@pytest.mark.gpu
def test_selftest_gpu(run_cli, tmp_path):
    out = tmp_path / "st.json"
    res = run_cli("selftest", "--json", "--out", str(out), timeout=900)
    data = json.loads(out.read_text())
    assert res.returncode == 0 and data["passed"], res.stdout + res.stderr
    assert data["mfu"] is None or 0 < data["mfu"] < 1
    assert {c["name"]: c["ok"] for c in data["checks"]}["memory"] is True


@pytest.mark.parametrize("card,profile,peak_card,peak", [
    ("rtx5090", "blackwell", "NVIDIA GeForce RTX 5090", 209.5),  # old: B200's 2250, an MFU 10x too low
    ("b200", "blackwell", "NVIDIA B200", 2250.0),
    ("mi355x", "cdna4", "AMD Instinct MI355X", 2516.6),          # old: cdna3's MI300X 1307.4
    ("mi300x", "cdna3", "AMD Instinct MI300X", 1307.4),
])
def test_mfu_is_against_this_cards_own_peak(card, profile, peak_card, peak):
    """#36.12: per-device peaks (catalog/throughput.yaml); a card with no row gets no MFU, not another card's."""
    from dataclasses import replace

    from hwcompat.probe.emulate import from_catalog
    from hwcompat.profiles import load_profiles
    from hwcompat.readings import HostReading
    from hwcompat.resolve import resolve_host
    from hwcompat.selftest import device_peak
    from hwcompat.software import Software

    plan = resolve_host(HostReading(tuple(from_catalog([card]))), load_profiles(), Software())
    d = plan.devices[0]
    assert d.profile.name == profile
    assert device_peak(d, d.profile) == (peak_card, peak)
    gb10 = replace(d.reading, name="NVIDIA GB10") if profile == "blackwell" else None
    if gb10 is not None:
        assert device_peak(replace(d, reading=gb10), d.profile) == ("", None)
