"""The planner's deterministic terms checked exactly against real tiny models; CLI and train gate."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from hwcompat.choices import DTYPE_BYTES
from hwcompat import plan as P
from hwcompat.cli import main
from hwcompat.errors import InputError
from tests import cli
from tests.shapes import QWEN3_4B, QWEN7B, TINY, tiny_model_of as _model

@pytest.mark.parametrize("model_type", sorted(TINY))
def test_parameter_and_lora_counts_are_exact(model_type, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = _model(model_type, tmp_path)
    shape = P.load_shape(str(tmp_path))
    assert shape.params() == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.lora_params(8) == trainable


def test_optimizer_and_weight_bytes_are_exact(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = _model("llama", tmp_path)
    shape = P.load_shape(str(tmp_path))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    loss = model(torch.randint(0, 300, (1, 8)), labels=torch.randint(0, 300, (1, 8))).loss
    loss.backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    plan = P.estimate(shape, P.PlanInput(lora_rank=4, seq_len=8), "float32", "sdpa", "cpu", 1 << 40)
    assert plan.breakdown["optimizer_states"] == state_bytes
    assert plan.breakdown["adapter_weights"] == sum(p.numel() * 4 for p in params)
    assert plan.breakdown["base_weights"] == sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                                 if not p.requires_grad)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(InputError, match="model_type 'mamba' is not supported by the planner; supported: llama"):
        P.load_shape(str(tmp_path))


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama", **TINY["llama"]}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert P.load_shape("org/tiny").hidden == 64
    with pytest.raises(InputError, match="no config.json there"):
        P.load_shape("org/absent")


@pytest.fixture
def qwen7b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN7B))
    return str(tmp_path)


def test_7b_lora_on_m40_does_not_fit_and_says_why(qwen7b, capsys):
    assert main(["plan", "--model", qwen7b, "--emulate", "m40", "--suggest", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["device_bytes"] == 25769803776
    assert set(out["breakdown"]) >= {"base_weights", "adapter_weights", "gradients", "optimizer_states",
                                     "activations", "logits", "runtime_overhead"}
    assert out["peak_bytes"] == sum(out["breakdown"].values())
    assert out["breakdown"]["base_weights"] == P.load_shape(qwen7b).params() * 4  # fp32 on Maxwell
    assert "cannot run QLoRA" in out["suggestions"][-1]["change"]


def test_qlora_7b_on_4090_fits_and_suggests_limits(qwen7b, capsys):
    assert main(["plan", "--model", qwen7b, "--emulate", "rtx4090", "--method", "qlora",
                 "--gradient-checkpointing", "--suggest"]) == 0
    out = capsys.readouterr().out
    assert "-> fits, headroom" in out and "max_seq_len=" in out and "micro_batch_size=" in out


def test_suggestions_put_the_cheapest_fitting_change_first(qwen7b, capsys):
    main(["plan", "--model", qwen7b, "--emulate", "a100", "--seq-len", "8192", "--batch-size", "4", "--suggest",
          "--json"])
    s = json.loads(capsys.readouterr().out)["suggestions"]
    assert s[0]["fits"] and " + " not in s[0]["change"]


def test_eager_attention_adds_the_s2_term(qwen7b):
    shape = P.load_shape(qwen7b)
    inp = P.PlanInput(seq_len=4096)
    sdpa = P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", 80 << 30)
    eager = P.estimate(shape, inp, "bfloat16", "eager", "nvidia", 80 << 30)
    assert sdpa.breakdown["attention_scores"] == 0
    # 28 heads x S^2 x (the fp32 softmax + its bf16 cast; tests/train/test_plan_activations.py measures it) x 28 layers
    assert eager.breakdown["attention_scores"] == 28 * 4096 * 4096 * (4 + 2) * 28


def test_checkpointing_cuts_activations(qwen7b):
    shape = P.load_shape(qwen7b)
    off = P.estimate(shape, P.PlanInput(), "bfloat16", "sdpa", "nvidia", 80 << 30)
    on = P.estimate(shape, P.PlanInput(gradient_checkpointing=True), "bfloat16", "sdpa", "nvidia", 80 << 30)
    assert on.breakdown["activations"] < off.breakdown["activations"] / 10


def test_plan_does_not_import_torch(qwen7b):
    code = ("import sys, io, contextlib\nfrom hwcompat.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):"
            f"\n    main(['plan', '--model', {qwen7b!r}, '--emulate', 'p40', '--suggest'])\nprint('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False", res.stderr


def test_train_refuses_a_run_that_will_not_fit(tmp_path):
    big = tmp_path / "model"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({**QWEN7B, "num_hidden_layers": 80, "hidden_size": 8192,
                                                 "intermediate_size": 29568, "num_attention_heads": 64,
                                                 "num_key_value_heads": 8}))
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n' * 4)
    res = cli.train("/dev/null", f"model={big}", f"train_data={data}", f"output_dir={tmp_path / 'run'}")
    assert res.returncode == 1, res.stderr
    assert "this run will not fit on" in res.stderr and "--force tries anyway" in res.stderr
    assert not (tmp_path / "run").exists()


def test_logits_are_one_chunk_and_the_response_fraction_matters_only_below_it(qwen7b):
    """The loss holds one chunk of logits (fp32 + the bf16 copy): 220 rows at a 152k vocabulary, fewer when fewer
    response rows than that need logits (tests/train/test_linear_logps.py measures the chunk itself)."""
    shape = P.load_shape(qwen7b)
    full = P.estimate(shape, P.PlanInput(), "bfloat16", "sdpa", "nvidia", 80 << 30)
    tenth = P.estimate(shape, P.PlanInput(logit_fraction=0.1), "bfloat16", "sdpa", "nvidia", 80 << 30)
    rows = P.logit_chunk_rows(shape.vocab)
    assert rows == 220 and full.breakdown["logits"] == rows * shape.vocab * (4 + 2)
    assert tenth.breakdown["logits"] == 205 * shape.vocab * (4 + 2)  # ceil(2048 x 0.1) rows < a chunk
    assert tenth.breakdown["activations"] == full.breakdown["activations"]


def test_train_plans_with_its_datas_response_share(tmp_path):
    from hwcompat.train.config import load_config
    from hwcompat.pipeline.preflight import check_data

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "x" * 90, "completion": "y" * 10}) + "\n")
    _, share = check_data(load_config(None, [f"model={tmp_path}", f"train_data={data}", "eval_fraction=0.5"]))
    assert share == pytest.approx(0.1 * 1.25 + 0.02)


@pytest.mark.parametrize("field,value,message", [
    ("num_hidden_layers", -4, "num_hidden_layers must be a positive integer (at most 10,000), got -4"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer (at most 10,000), got 0"),
    ("hidden_size", 3584.5, "hidden_size must be a positive integer (at most 1,048,576), got 3584.5"),
    ("vocab_size", "152064", "vocab_size must be a positive integer (at most 16,777,216), got '152064'"),
    ("num_key_value_heads", 5, "num_attention_heads (28) is not a multiple of num_key_value_heads (5)"),
])
def test_impossible_shapes_are_refused_not_planned(tmp_path, field, value, message):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN7B, field: value}))
    res = cli.run("plan", "--model", tmp_path, "--emulate", "m40")
    assert res.returncode == 2 and message in res.stderr and "fits" not in res.stdout, res.stderr + res.stdout


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    res = cli.run("plan", "--model", tmp_path)
    assert res.returncode == 2 and "must hold a JSON object, got list" in res.stderr


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizer_state_bytes_are_exact_against_bitsandbytes(optimizer, tmp_path):
    """bitsandbytes' real optimizer: uint8 states + block scales for big tensors, fp32 states for small ones."""
    import bitsandbytes.optim as bnb_optim
    import torch
    from peft import LoraConfig, get_peft_model

    from hwcompat.train.optim import EIGHT_BIT

    model, _ = _model("llama", tmp_path)
    shape = P.load_shape(str(tmp_path))
    model = get_peft_model(model, LoraConfig(r=64, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = sorted(p.numel() for p in params)
    assert sizes[0] < P.BNB_MIN_8BIT_SIZE <= sizes[-1]  # both kinds of state are exercised
    opt = getattr(bnb_optim, EIGHT_BIT[optimizer])(params, lr=1e-3)
    loss = model(torch.randint(0, 300, (1, 8)), labels=torch.randint(0, 300, (1, 8))).loss
    loss.backward()
    opt.step()
    seen, state_bytes = set(), 0
    for s in opt.state.values():
        for k, t in s.items():
            if torch.is_tensor(t) and k != "step" and id(t) not in seen:  # the quantisation maps are shared
                seen.add(id(t))
                state_bytes += t.numel() * t.element_size()
    plan = P.estimate(shape, P.PlanInput(lora_rank=64, seq_len=8, optimizer=optimizer), "float32", "sdpa", "cpu",
                      1 << 40)
    assert plan.breakdown["optimizer_states"] == state_bytes


@pytest.mark.parametrize("cards,args", [
    ("m40", ["--method", "lora"]), ("p40", ["--seq-len", "8192", "--batch-size", "8"]),
    ("rtx4090", ["--method", "full"]), ("rx6600", ["micro_batch_size=4", "max_seq_len=4096"]),
    ("a100", ["--seq-len", "8192", "--batch-size", "4"]), ("v100", ["optimizer=adamw_8bit"]),
])
def test_every_suggestion_is_a_setting_hwcompat_train_accepts(qwen7b, capsys, cards, args):
    from hwcompat.train.config import TrainConfig, apply_overrides

    assert main(["plan", "--model", qwen7b, "--emulate", cards, "--suggest", "--json", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suggestions"]
    for s in out["suggestions"]:
        items = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in s["settings"].items()]
        apply_overrides(TrainConfig(model="m", train_data=["d"]), items)  # an unknown key or value raises
        if items:
            assert s["change"].startswith(" ".join(items))
    assert not any(s["change"].startswith(("method=", "--", "sgd")) for s in out["suggestions"])


def test_8bit_optimizer_is_suggested_only_where_the_card_runs_it(qwen7b, capsys):
    def changes(card):
        main(["plan", "--model", qwen7b, "--emulate", card, "--suggest", "--json", "--seq-len", "4096"])
        return [s["change"] for s in json.loads(capsys.readouterr().out)["suggestions"]]

    assert any("optimizer=adamw_8bit" in c for c in changes("p40"))
    assert not any("optimizer=" in c for c in changes("m40"))  # no bitsandbytes kernels for sm_52


def test_plan_speaks_the_config_language(qwen7b, capsys):
    assert main(["plan", "--model", qwen7b, "--emulate", "p40", "--json", "max_seq_len=512", "micro_batch_size=2",
                 "optimizer=adamw_8bit", "gradient_checkpointing=true"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    assert (inputs["seq_len"], inputs["batch_size"], inputs["optimizer"], inputs["gradient_checkpointing"]) == (
        512, 2, "adamw_8bit", True)
    assert main(["plan", "--model", qwen7b, "--emulate", "p40", "max_seq_length=512"]) == 2
    assert "unknown key 'max_seq_length'; did you mean 'max_seq_len'" in capsys.readouterr().err
    assert main(["plan", "--model", qwen7b, "--emulate", "p40", "optimizer=sgd"]) == 2
    assert "optimizer: 'sgd' is not one of: adamw, adamw_8bit, paged_adamw_8bit" in capsys.readouterr().err


def test_plan_input_from_a_train_config_is_what_train_checks():
    from hwcompat.train.config import TrainConfig

    cfg = TrainConfig(model="m", train_data=["d"], max_seq_len=777, micro_batch_size=3, lora_r=5, qlora=True,
                      lora_dropout=0.0, optimizer="paged_adamw_8bit", lora_target_modules=["q_proj"])
    inp = P.plan_input(cfg, logit_fraction=0.5)
    assert inp == P.PlanInput(method="qlora", seq_len=777, batch_size=3, lora_rank=5, lora_targets=["q_proj"],
                              gradient_checkpointing=False, optimizer="paged_adamw_8bit", lora_dropout=False,
                              logit_fraction=0.5)


def test_dpo_plan_counts_two_sequences_per_pair(qwen7b, capsys):
    from hwcompat.train.config import TrainConfig

    def plan(*args):
        main(["plan", "--model", qwen7b, "--emulate", "a100", "--json", "--seq-len", "512", *args])
        return json.loads(capsys.readouterr().out)

    lora, dpo = plan(), plan("--method", "dpo")
    assert dpo["breakdown"]["activations"] == 2 * lora["breakdown"]["activations"]
    assert dpo["breakdown"]["logits"] == lora["breakdown"]["logits"]  # one chunk of logits either way (> 220 rows)
    assert dpo["breakdown"]["optimizer_states"] == lora["breakdown"]["optimizer_states"]
    assert any("computed once per row without gradients and kept" in n and "upper bound" in n for n in dpo["notes"])
    assert plan("method=dpo")["breakdown"] == dpo["breakdown"]  # the config key says the same
    assert P.plan_input(TrainConfig(model="m", train_data=["d"], method="dpo")).sequences_per_row == 2


# --- layer streaming (offload: layers) ---------------------------------------------------------------------

LLAMA7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
QWEN3_14B = {"model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
             "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
             "tie_word_embeddings": False}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_layer_and_resident_params_partition_the_model(model_type, tmp_path):
    model, cfg = _model(model_type, tmp_path)
    shape = P.load_shape(str(tmp_path))
    layer0 = sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.layer_params() == layer0  # exactly what the streamer moves per visit
    assert shape.layers * shape.layer_params() + shape.resident_params() == shape.params()


def test_streamed_terms_are_the_slots_the_host_copy_and_two_passes_of_copies(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA7B))
    shape = P.load_shape(str(tmp_path))
    host = P.Host(ram_bytes=64 * P.GIB, pcie_generation=3, pcie_width=16, peak_tflops=7.0)
    inp = P.PlanInput(seq_len=2048, offload="layers", prefetch=2)
    plan = P.estimate(shape, inp, "float32", "sdpa", "nvidia", 24 * P.GIB, host=host)
    layer = shape.layer_params() * 4
    assert plan.breakdown["base_weights"] == shape.resident_params() * 4
    assert plan.breakdown["streamed_slots"] == 3 * layer  # prefetch + 1 slots
    checkpointed = P.estimate(shape, P.PlanInput(seq_len=2048, gradient_checkpointing=True), "float32", "sdpa",
                              "nvidia", 24 * P.GIB)
    assert plan.breakdown["activations"] == checkpointed.breakdown["activations"]  # recompute is implied
    st = plan.stream
    assert st.layer_bytes == layer and st.host_bytes == shape.params() * 4 + layer + P.HOST_RUNTIME
    assert st.bytes_per_micro_step == 2 * 32 * layer
    rate = 8e9 * 0.9846 * 16 / 8 * 0.78  # PCIe 3.0 x16, 128b/130b, pinned-copy efficiency
    assert st.link_bytes_per_s == pytest.approx(rate) and st.copy_seconds == pytest.approx(st.bytes_per_micro_step / rate)
    assert st.compute_seconds == pytest.approx(6 * shape.params() * 2048 / (7.0e12 * 0.6))
    assert st.step_seconds == max(st.compute_seconds, st.copy_seconds)
    assert plan.fits and st.host_fits
    small_host = P.estimate(shape, inp, "float32", "sdpa", "nvidia", 24 * P.GIB,
                            host=P.Host(ram_bytes=16 * P.GIB, pcie_generation=3, pcie_width=16))
    assert not small_host.fits and "host RAM is the limit" in small_host.notes[-1]
    assert small_host.stream.step_seconds is None  # unknown card speed: only the copy time is estimated
    with pytest.raises(InputError, match="does not apply to qlora"):
        P.estimate(shape, P.PlanInput(method="qlora", offload="layers"), "float16", "sdpa", "nvidia", P.GIB)


@pytest.mark.parametrize("name,dtype,tflops", [
    ("Tesla M40 24GB", "float32", 7.0), ("Tesla V100-PCIE-16GB", "float16", 112.0),
    ("Tesla V100-SXM2-32GB", "float16", 125.0), ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0), ("Tesla M40 24GB", "bfloat16", None), ("Unknown Card", "float32", None),
])
def test_peak_throughput_comes_from_the_catalog(name, dtype, tflops):
    assert P.peak_tflops(name, dtype) == tflops


def test_auto_offload_streams_only_when_resident_does_not_fit_and_streamed_does(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA7B))
    shape = P.load_shape(str(tmp_path))

    def on(card_bytes, ram):
        return lambda i: P.estimate(shape, i, "float32", "sdpa", "nvidia", card_bytes, host=P.Host(ram_bytes=ram))

    inp = P.PlanInput(seq_len=2048)
    assert P.decide_offload(shape, inp, "auto", on(200 * P.GIB, 64 * P.GIB)).offload == "none"  # fits resident
    choice = P.decide_offload(shape, inp, "auto", on(24 * P.GIB, 64 * P.GIB))
    assert choice.offload == "layers" and choice.plan.fits and choice.plan.stream is not None
    assert "even with gradient checkpointing" in choice.changed and not choice.gradient_checkpointing
    assert P.decide_offload(shape, inp, "auto", on(24 * P.GIB, 16 * P.GIB)).offload == "none"  # host RAM too small
    assert P.decide_offload(shape, inp, "auto", on(2 * P.GIB, 64 * P.GIB)).offload == "none"  # nothing fits
    assert P.decide_offload(shape, inp, "none", on(24 * P.GIB, 64 * P.GIB)).offload == "none"
    asked = P.decide_offload(shape, inp, "layers", on(200 * P.GIB, 64 * P.GIB))
    assert asked.offload == "layers" and asked.changed == ""  # asked for: nothing to explain


def test_auto_takes_checkpointing_before_streaming_and_keeps_a_setting_the_user_wrote(tmp_path):
    """#25: Qwen3-4B at seq 4096 on a 24 GB card fits resident with checkpointing; auto used to stream it."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    shape = P.load_shape(str(tmp_path))

    def run(i):
        return P.estimate(shape, i, "bfloat16", "sdpa", "nvidia", 24 * P.GIB, host=P.Host(ram_bytes=64 * P.GIB))

    inp = P.PlanInput(seq_len=4096, batch_size=4)
    assert not run(inp).fits and run(replace(inp, gradient_checkpointing=True)).fits
    choice = P.decide_offload(shape, inp, "auto", run)
    assert (choice.offload, choice.gradient_checkpointing) == ("none", True) and choice.plan.fits
    assert "gradient_checkpointing=true" in choice.changed and "cheaper than streaming" in choice.changed
    kept = P.decide_offload(shape, inp, "auto", run, may_checkpoint=False)  # the user wrote false: not changed
    assert (kept.offload, kept.gradient_checkpointing, kept.plan.fits, kept.changed) == ("none", False, False, "")
    suggestions = P.suggest(shape, kept.plan, "nvidia", quant_ok=True)
    assert suggestions[0].fits and suggestions[0].settings == {"gradient_checkpointing": True}


def test_train_says_what_auto_changed_and_keeps_a_written_setting(tmp_path, capsys):
    """--print-config of `hwcompat train` on an emulated 4090: the origin and the note say it; written false refuses."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(QWEN3_4B))
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    (tmp_path / "c.yaml").write_text(json.dumps({"model": str(tmp_path / "model"), "max_seq_len": 4096,
                                                  "train_data": [str(tmp_path / "d.jsonl")],
                                                  "output_dir": str(tmp_path / "run")}))
    args = ["train", str(tmp_path / "c.yaml"), "--emulate", "rtx4090", "--print-config"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"gradient_checkpointing\s*: true  # plan \(offload: auto\)", out), out
    assert "changed: gradient_checkpointing=true (offload: auto)" in out
    assert main(args + ["gradient_checkpointing=false"]) == 0  # print-config shows the verdict, runs nothing
    out = capsys.readouterr().out
    assert "this run will not fit" in out and "Change: gradient_checkpointing=true" in out


@pytest.mark.parametrize("config,card,dtype", [(LLAMA7B, "m40", "float32"), (QWEN3_14B, "v100-16", "float16")])
def test_plan_streams_7b_on_an_m40_and_14b_on_a_16gb_v100(tmp_path, capsys, config, card, dtype):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path), "--emulate", f"{card},cpu", "--seq-len", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["inputs"]["offload"] == "layers" and out["dtype"] == dtype
    assert out["stream"]["link"] == "PCIe 3.0 x16" and out["stream"]["host_fits"]
    assert out["stream"]["step_seconds"] >= out["stream"]["copy_seconds"] > 0
    assert main(["plan", "--model", str(tmp_path), "--emulate", f"{card},cpu", "--seq-len", "2048",
                 "offload=none", "--suggest", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"]
    fitting = [s for s in out["suggestions"] if s["fits"]]
    assert fitting and fitting[0]["settings"] == {"offload": "layers"}


def test_suggestion_names_host_ram_as_the_limit(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA7B))
    emu = tmp_path / "emu.yaml"
    emu.write_text("- {vendor: nvidia, name: Tesla M40 24GB, compute_capability: '5.2', memory_bytes: 25769803776}\n"
                   "- {vendor: cpu, name: small host, memory_bytes: 17179869184, cpu_cores: 8}\n")
    assert main(["plan", "--model", str(tmp_path), "--emulate-file", str(emu), "--seq-len", "2048", "offload=none",
                 "--suggest"]) == 0
    out = capsys.readouterr().out
    assert "offload=layers" in out and "host RAM is the limit" in out


def test_plan_of_a_train_config_is_what_train_runs(tmp_path, capsys):
    """#25: one set of defaults; `hwcompat plan CONFIG` plans `hwcompat train CONFIG` (data share, auto decision)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(QWEN3_4B))
    rows = [{"prompt": "question " * 30, "completion": "answer " * 10}] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(json.dumps({"model": str(tmp_path / "model"), "max_seq_len": 4096,
                                                  "train_data": [str(tmp_path / "d.jsonl")],
                                                  "output_dir": str(tmp_path / "run")}))
    assert main(["plan", str(tmp_path / "c.yaml"), "--emulate", "rtx4090", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert main(["train", str(tmp_path / "c.yaml"), "--emulate", "rtx4090", "--print-config"]) == 0
    note = capsys.readouterr().out.rsplit("# plan: peak ", 1)[1]
    assert note.startswith(f"{planned['peak_bytes'] / P.GIB:.2f} GiB")
    inputs = planned["inputs"]
    assert (inputs["seq_len"], inputs["batch_size"], inputs["gradient_checkpointing"]) == (4096, 4, True)
    assert 0 < inputs["logit_fraction"] < 0.5  # the data's response share, as train computes it
    assert any("`hwcompat train` changes: gradient_checkpointing=true" in n for n in planned["notes"])

    from hwcompat.train.config import TrainConfig

    assert main(["plan", "--model", str(tmp_path / "model"), "--emulate", "rtx4090", "--json"]) == 0
    bare = json.loads(capsys.readouterr().out)["inputs"]
    assert (bare["seq_len"], bare["batch_size"]) == (TrainConfig.max_seq_len, TrainConfig.micro_batch_size)


def test_suggest_combines_changes_with_a_shorter_sequence(qwen7b, capsys):
    """#25: a 7B at seq 8192 x 2 on an 8 GB RX 6600: no set of changes fits at 8192, streaming at a shorter one does."""
    main(["plan", "--model", qwen7b, "--emulate", "rx6600,cpu", "--seq-len", "8192", "--batch-size", "2",
          "--suggest", "--json"])
    s = json.loads(capsys.readouterr().out)["suggestions"]
    fits = [x for x in s if x["fits"]]
    assert fits and all("max_seq_len" in x["settings"] for x in fits)
    # 3392 before #36.6: SDPA on RDNA2 is its math kernel, whose S^2 scores (one layer, checkpointed) now count;
    # 2176 before #39: a layer's activations as autograd keeps them (tests/train/test_plan_activations.py): the
    # norms' fp32 inputs and each fp16 adapter's own cast of its input
    assert fits[0]["settings"] == {"offload": "layers", "max_seq_len": 1792}
    assert not any({"offload", "gradient_checkpointing"} <= set(x["settings"]) for x in fits)  # streaming implies it
    assert all(x["settings"]["max_seq_len"] >= P.MIN_SUGGESTED_SEQ for x in fits)


def test_memory_limit_plans_the_smaller_card_and_is_refused_where_nothing_enforces_it(tmp_path, capsys):
    """#26: memory_limit_gib=16 on a 24 GB card plans 16 GiB (train and plan alike); on the CPU it is an input error."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(QWEN3_4B))
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    (tmp_path / "c.yaml").write_text(json.dumps({"model": str(tmp_path / "model"), "max_seq_len": 512,
                                                  "train_data": [str(tmp_path / "d.jsonl")],
                                                  "output_dir": str(tmp_path / "run")}))
    args = ["train", str(tmp_path / "c.yaml"), "--emulate", "rtx4090", "--print-config"]
    assert main(args + ["memory_limit_gib=16"]) == 0
    assert re.search(r"# plan: peak [\d.]+ GiB of 16\.0 GiB", capsys.readouterr().out)
    assert main(["plan", str(tmp_path / "c.yaml"), "--emulate", "rtx4090", "--json", "memory_limit_gib=16"]) == 0
    assert json.loads(capsys.readouterr().out)["device_bytes"] == 16 * P.GIB
    assert main(args + ["memory_limit_gib=64"]) == 0  # --print-config shows the verdict, runs nothing
    assert "# memory_limit_gib=64: NVIDIA GeForce RTX 4090 has only 24.0 GiB" in capsys.readouterr().out
    assert main(["plan", str(tmp_path / "c.yaml"), "--emulate", "rtx4090", "memory_limit_gib=64"]) == 2
    assert "has only 24.0 GiB" in capsys.readouterr().err
    cpu = ["train", str(tmp_path / "c.yaml"), "--emulate", "rtx4090", "--cpu-emulation", "memory_limit_gib=16"]
    assert main(cpu) == 2
    assert "nothing enforces it" in capsys.readouterr().err


# --- #36.6: SDPA's math kernel holds the S^2 scores -------------------------------------------------------------

@pytest.mark.parametrize("card,math_kernel", [("rx6600", True), ("a770", True), ("rtx4090", False), ("b580", False)])
def test_sdpa_without_a_fused_kernel_counts_the_scores(qwen7b, capsys, card, math_kernel):
    """Old value: 0 for every sdpa card; the profiles of RDNA1/2, MI100 and Alchemist say SDPA runs its math
    kernel there (hardware.fused_sdpa: false, with its source), which holds b x h x s^2 scores per layer."""
    assert main(["plan", "--model", qwen7b, "--emulate", card, "--seq-len", "2048", "--batch-size", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    shape = P.load_shape(qwen7b)
    db = DTYPE_BYTES[out["dtype"]]
    holding = 1 if out["inputs"]["gradient_checkpointing"] else shape.layers  # a checkpointed run: one layer's
    # the math kernel keeps eager's scores (fp32 softmax + its half cast; measured for eager on the CPU)
    expected = shape.heads * 2048 * 2048 * P.score_bytes(shape, db) * holding if math_kernel else 0
    assert out["breakdown"]["attention_scores"] == expected
    assert out["attention"] == ("sdpa-math" if math_kernel else "sdpa")
