"""Layer streaming (offload: layers): same numbers as the resident model, bounded and counted device slots."""

import re
import json
import shutil

import pytest

from tests import cli
from tests.train.conftest import COLORS


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    from hwcompat.train.tiny import write_tiny

    texts = [f"What color is the {k}? {v}" for k, v in COLORS.items()] * 5 + ["### User:\n### Assistant:\n"]
    return write_tiny(tmp_path_factory.mktemp("tiny4") / "model", texts, chat_template=False, hidden=64, layers=4)


def _peft(path, dropout: float, streamed: bool, prefetch: int = 1, device: str = "cpu"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hwcompat.train import stream

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=dropout))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a moved adapter, so every gradient is non-trivial
    model.train()
    if streamed:
        stream.install(model, torch.device(device), prefetch)
    else:
        model.to(device)
    return model


def _batch(path, n=6):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = [f"What color is the {k}? {v}" for k, v in list(COLORS.items())[:n]]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def _loss_and_grads(model, batch):
    import torch

    from hwcompat.train.objectives.sft import ResponseLoss

    device = next(p.device for p in model.parameters() if p.requires_grad)
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(123)  # the same dropout masks on both sides (the streamed recompute replays them)
    loss = ResponseLoss(model)(batch, float((batch["labels"][:, 1:] != -100).sum()))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_streamed_loss_and_gradients_equal_the_resident_model(four_layer_model, dropout):
    import torch

    batch = _batch(four_layer_model)
    loss_r, grads_r = _loss_and_grads(_peft(four_layer_model, dropout, streamed=False), batch)
    loss_s, grads_s = _loss_and_grads(_peft(four_layer_model, dropout, streamed=True), batch)
    assert abs(loss_r - loss_s) <= 1e-6 * max(1.0, abs(loss_r))
    assert grads_r.keys() == grads_s.keys() and len(grads_r) == 4 * 7 * 2  # every adapter of every layer
    for name in grads_r:
        assert torch.allclose(grads_r[name], grads_s[name], atol=1e-6, rtol=1e-5), name
        assert grads_r[name].abs().sum() > 0, name


@pytest.mark.parametrize("prefetch", [1, 2])
def test_slots_are_bounded_and_each_layer_is_fetched_once_per_pass(four_layer_model, prefetch):
    import torch

    model = _peft(four_layer_model, 0.0, streamed=True, prefetch=prefetch)
    streamer = model.hwcompat_streamer
    batch = _batch(four_layer_model)
    steps = 3
    for _ in range(steps):  # three micro-steps: forward + backward each
        _loss_and_grads(model, batch)
    n = streamer.n
    assert n == 4 and len(streamer.slots) == prefetch + 1
    assert streamer.stats.max_resident <= prefetch + 1
    pending = {s.layer for s in streamer.slots if s.layer is not None}  # prefetched for the next forward
    assert pending == set(range(min(n, prefetch + 1)))
    for i in range(n):
        assert streamer.stats.uses[("forward", i)] == steps and streamer.stats.uses[("backward", i)] == steps
        assert streamer.stats.fetches[("backward", i)] == steps
        assert streamer.stats.fetches[("forward", i)] == steps + (i in pending)
    assert streamer.stats.evicted == 0
    copies = sum(streamer.stats.fetches.values())
    assert streamer.stats.bytes_moved == copies * streamer.layer_bytes
    # the frozen weights live once, on the host; no parameter is left pointing into a device slot
    slot_ptrs = {b.data_ptr() for s in streamer.slots for b in s.buffers.values()}
    for layer in streamer.params:
        for p, *_ in layer:
            assert p.untyped_storage().data_ptr() not in slot_ptrs
    with torch.no_grad():  # eval / generation: forward only, still bounded
        model(**{k: v for k, v in batch.items() if k != "labels"})
    assert streamer.stats.max_resident <= prefetch + 1 and streamer.stats.evicted <= prefetch + 1


def test_streamed_generation_equals_resident(four_layer_model):
    import torch

    batch = _batch(four_layer_model, n=2)
    outs = []
    for streamed in (False, True):
        model = _peft(four_layer_model, 0.0, streamed=streamed).eval()
        with torch.no_grad():
            outs.append(model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=6, do_sample=False, use_cache=True))
    assert torch.equal(outs[0], outs[1])


def test_offload_layers_with_qlora_is_refused():
    from hwcompat.errors import InputError
    from hwcompat.train.config import TrainConfig, _validate

    with pytest.raises(InputError, match="offload=layers streams a plain LoRA base"):
        _validate(TrainConfig(model="m", train_data=["t"], offload="layers", qlora=True), "config")


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _same(wa, wb, tol=1e-6):
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= tol, k


def _train_pair(tmp_path, model, data, files=None, **extra):
    """The same run resident and streamed (``files`` written beside each config); returns both run folders."""
    from tests.train.conftest import make_config

    runs = []
    for offload in ("none", "layers"):
        d = tmp_path / offload
        d.mkdir()
        for name, text in (files or {}).items():
            (d / name).write_text(text)
        cfg = make_config(d, model, *data, offload=offload, eval_at_start=False, **extra)
        res = cli.train(cfg)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append((d / "run", res.stderr))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["length_grouped", "packed"])
def test_sft_streamed_run_equals_resident_run(tmp_path, four_layer_model, task_files, batching):
    (resident, _), (streamed, log) = _train_pair(tmp_path, four_layer_model, task_files, max_steps=6,
                                                 lora_dropout=0.1, batching=batching, eval_max_rows=4)
    assert "offload=layers: 4 decoder layers streamed from host memory" in log
    _same(_adapter(resident), _adapter(streamed))
    a, b = (json.loads((r / "summary.json").read_text()) for r in (resident, streamed))
    assert abs(a["eval_after"]["eval_loss"] - b["eval_after"]["eval_loss"]) < 1e-6


@pytest.mark.slow
def test_dpo_streamed_run_equals_resident_run(tmp_path, four_layer_model):
    from tests.train.conftest import write_jsonl
    from tests.train.conftest import pair_rows

    data = (write_jsonl(tmp_path / "p.jsonl", pair_rows(32, 1)), write_jsonl(tmp_path / "e.jsonl", pair_rows(8, 2)))
    (resident, _), (streamed, _) = _train_pair(tmp_path, four_layer_model, data, method="dpo", max_steps=4,
                                               micro_batch_size=4, learning_rate=0.003, eval_metrics="none")
    _same(_adapter(resident), _adapter(streamed))
    a, b = (json.loads((r / "summary.json").read_text())["eval_after"] for r in (resident, streamed))
    assert abs(a["reward_margin"] - b["reward_margin"]) < 1e-6


@pytest.mark.slow
def test_streamed_resume_equals_uninterrupted(tmp_path, four_layer_model, task_files):
    from tests.train.conftest import make_config

    cfg = make_config(tmp_path, four_layer_model, *task_files, offload="layers", max_steps=8, checkpoint_every=4,
                      lora_dropout=0.1, eval_at_start=False, eval_metrics="none")
    assert cli.train(cfg).returncode == 0
    run = tmp_path / "run"
    whole = _adapter(run)
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-0000008", ignore_errors=True)
    res = cli.train(run / "config.yaml", "--resume")
    assert res.returncode == 0 and "at step 4/8" in res.stderr, res.stderr[-3000:]
    _same(whole, _adapter(run))


def test_auto_streams_a_7b_model_on_an_emulated_m40(tmp_path):
    """The launcher's decision for a 7B fp32 model on a 24 GB Maxwell card, on a host with 64 GiB of RAM."""

    model = tmp_path / "llama7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}))
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "hi", "completion": "there"}\n')
    base = [f"model={model}", f"train_data={data}", "max_seq_len=2048", "micro_batch_size=1"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    res = cli.train(cfg, *base, "--emulate", "m40,cpu", "--print-config")
    assert res.returncode == 0, res.stderr
    assert re.search(r'^offload +: "layers"  # plan \(offload: auto\)$', res.stdout, re.M)
    assert "27.4 GiB pinned host RAM" in res.stdout
    res = cli.train(cfg, *base, "offload=none", "--emulate", "m40,cpu", "--print-config")
    assert "will not fit on Tesla M40 24GB" in res.stdout and "offload=layers" in res.stdout


@pytest.mark.slow
def test_maxwell_profile_streams_on_the_cpu_emulation(tmp_path, tiny_model, task_files):
    """The M40's profile (fp32, no compile) with offload=layers, run on the CPU as the CI matrix does."""
    from tests.train.conftest import make_config

    cfg = make_config(tmp_path, tiny_model, *task_files, offload="layers", max_steps=3, eval_at_start=False,
                      eval_metrics="none")
    res = cli.train(cfg, "--emulate", "m40,cpu", "--cpu-emulation")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "profile maxwell" in res.stderr and "offload=layers: 2 decoder layers streamed" in res.stderr
    spec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert spec["config"]["offload"] == "layers" and spec["profile"]["name"] == "maxwell"


def test_offload_layers_with_several_processes_is_refused(tmp_path, tiny_model, task_files):
    from tests.train.conftest import make_config

    res = cli.train(make_config(tmp_path, tiny_model, *task_files, offload="layers"), "--devices", "2")
    assert res.returncode == 2 and "offload=layers streams the base to one card" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [1, 3])
def test_streamed_on_the_gpu_equals_resident_with_copies_on_a_side_stream(four_layer_model, prefetch):
    """The CUDA path: pinned host copies, a copy stream and events; same loss and gradients, same bounds."""
    import torch

    batch = _batch(four_layer_model)
    loss_r, grads_r = _loss_and_grads(_peft(four_layer_model, 0.1, streamed=False, device="cuda"), batch)
    model = _peft(four_layer_model, 0.1, streamed=True, prefetch=prefetch, device="cuda")
    streamer = model.hwcompat_streamer
    assert streamer.copy_stream is not None and all(f.is_pinned() for h in streamer.host for f in h.values())
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss_s, grads_s = _loss_and_grads(model, batch)
    torch.cuda.synchronize()
    assert abs(loss_r - loss_s) <= 1e-6 * max(1.0, abs(loss_r))
    for name in grads_r:
        assert torch.allclose(grads_r[name], grads_s[name], atol=1e-6, rtol=1e-5), name
    assert streamer.stats.max_resident <= prefetch + 1 and streamer.stats.evicted == 0
    for i in range(streamer.n):
        assert streamer.stats.uses[("forward", i)] == 2 and streamer.stats.fetches[("backward", i)] == 2
    frozen = [p for layer in streamer.params for p, *_ in layer]
    assert all(p.device.type == "cpu" for p in frozen)  # between uses, the weights are the host copy


@pytest.mark.slow
def test_grpo_streamed_run_equals_resident_run(tmp_path, four_layer_model, task_files):
    """#37 §1: GRPO with offload=layers: the rollouts decode through the streamed layers (no-grad visits, the
    prefetch wrapping round to layer 0 for each new token), the loss recomputes them as SFT's does; the same
    completions are sampled and the same adapter comes out as the resident run's. In fp32: the resident rollout
    samples from weights with the adapter merged in, the streamed one through the adapter, and in bf16 the two
    round apart enough to draw different tokens (both are the policy; SFT's pair above is equal in bf16 too)."""
    rewards = {"my_rewards.py": "def short(prompts, completions, references, **kwargs):\n"
                                "    return [-len(c) / 40.0 for c in completions]\n"}
    (resident, _), (streamed, log) = _train_pair(
        tmp_path, four_layer_model, task_files, files=rewards, method="grpo", rewards=["my_rewards:short"],
        micro_batch_size=8, num_generations=4, max_completion_length=8, max_steps=3, eval_metrics="none",
        eval_max_rows=4, learning_rate=3e-3, dtype="float32")
    assert "offload=layers: 4 decoder layers streamed from host memory" in log
    _same(_adapter(resident), _adapter(streamed))
    recs = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
            for r in (resident, streamed)]
    assert [r["completion_length"] for r in recs[0]] == [r["completion_length"] for r in recs[1]]
    assert [r["reward"] for r in recs[0]] == pytest.approx([r["reward"] for r in recs[1]], abs=1e-6)
