"""finetune: full and optimizer_offload: host (#38), on CPU with a tiny Llama.

Proven equal first: the resident full recipe against a plain torch/transformers loop written here, then the
host-offloaded recipe against the resident one (fp32: to the bit, since both step torch's fused CPU AdamW on the
same fp32 gradients; see train/host_optim.py), with gradient accumulation, clipping that acts, DPO and a resume.
"""

import json
import math

import pytest

from tests import cli
from tests.train.conftest import make_config, sigterm_site, write_jsonl

#: Settings every equivalence run shares: clipping that bites (max_grad_norm well under the raw norms),
#: accumulation over two micro-batches, a schedule that moves; fp32 whatever the CPU's default (equality to the bit
#: is an fp32 property: in bf16 the resident run casts fp32 masters per op, the offloaded one keeps a bf16 copy).
EQ = dict(finetune="full", learning_rate=0.003, max_steps=6, gradient_accumulation=2, max_grad_norm=0.3,
          micro_batch_size=4, eval_at_start=False, eval_metrics="none", batching="padded", warmup_ratio=0.2,
          lr_schedule="cosine", weight_decay=0.01, dtype="float32")


def _train(*args, env=None, timeout=300):
    return cli.run("train", *args, env=env, timeout=timeout)


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"], x["grad_norm"]) for x in rows if x["kind"] == "train"]


def _run(tmp_path, name, model, train, evals, emulate_file=None, **extra):
    folder = tmp_path / name
    folder.mkdir()
    cfg = make_config(folder, model, train, evals, **{**EQ, **extra})
    res = _train(cfg, *(["--emulate-file", emulate_file] if emulate_file else []))
    assert res.returncode == 0, res.stderr[-3000:]
    return folder / "run", res


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), k


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["host", "host+layers"])
def test_host_offload_equals_resident_to_the_bit(tmp_path, tiny_model, task_files, streamed):
    """Offloaded (and with offload=layers, its working copy streamed a layer at a time, each layer recomputed in
    backward) = resident with the same checkpointing, to the bit: a slot prefetched before a step and used after it
    would show here (train/stream.py invalidate)."""
    gc = {"gradient_checkpointing": True} if streamed else {}
    resident, res_a = _run(tmp_path, "a", tiny_model, *task_files, **gc)
    offloaded, res_b = _run(tmp_path, "b", tiny_model, *task_files, optimizer_offload="host",
                            **({"offload": "layers"} if streamed else {}))
    if streamed:
        assert "2 decoder layers streamed from host memory" in res_b.stderr and "2 on the device at a time" in res_b.stderr
    assert "fp32 weights + AdamW resident" in res_a.stderr
    assert "fp32 masters + AdamW in host RAM" in res_b.stderr
    la, lb = _losses(resident), _losses(offloaded)
    assert la == lb and len(la) == 6
    assert any(g > EQ["max_grad_norm"] for _, _, g in la)  # clipping acted on the steps compared
    _same(_weights(resident), _weights(offloaded))
    base = _weights_of(tiny_model)
    assert any(not bool((base[k] == v).all()) for k, v in _weights(resident).items())  # it trained
    s = json.loads((offloaded / "summary.json").read_text())
    assert s["finetune"] == "full" and s["output"] == "model" and s["optimizer_offload"] == "host"


def _weights_of(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_resident_full_equals_a_plain_torch_loop(tmp_path, tiny_model, task_files):
    """The recipe's full fine-tune is the textbook loop: the same batches through a plain transformers forward,
    summed token cross-entropy over the window's token count, clip_grad_norm_, AdamW, LambdaLR."""
    import torch
    from transformers import AutoModelForCausalLM

    from hwcompat.train import distributed, loop, recipe
    from hwcompat.train.spec import load_spec
    from tests.train.conftest import prepare_run

    ours, _ = _run(tmp_path, "a", tiny_model, *task_files)
    folder = tmp_path / "b"
    folder.mkdir()
    run_dir = prepare_run(make_config(folder, tiny_model, *task_files, **EQ))
    r = recipe.setup(load_spec(run_dir / "run.json"), run_dir, distributed.init("cpu"), resume=False)
    stream = loop.micro_batches(r, 0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, trust_remote_code=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=EQ["learning_rate"], weight_decay=EQ["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, recipe.lr_lambda("cosine", int(0.2 * 6), 6))
    torch.manual_seed(42)
    losses = []
    for _ in range(EQ["max_steps"]):
        window = [next(stream)[1] for _ in range(EQ["gradient_accumulation"])]
        n = sum(b["n_target"] for b in window)
        total = 0.0
        for b in window:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                   reduction="sum")
            (ce / n).backward()
            total += (ce / n).item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), EQ["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    ours_losses = [loss for _, loss, _ in _losses(ours)]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ours_losses, losses)), (ours_losses, losses)
    theirs = {n: p.detach() for n, p in model.named_parameters()}
    mine = _weights(ours)
    # float tolerance, not bits: the plain loop's full-vocabulary logits and ours (the head on response rows only,
    # a chunk at a time: linear_logps) sum the same terms in another order, and fused vs single-tensor AdamW differ
    # in the last bit
    for k, v in theirs.items():
        assert (mine[k] - v).abs().max().item() <= 1e-6, k


@pytest.mark.slow
def test_resume_in_the_middle_of_an_offloaded_run_is_bit_identical(tmp_path, tiny_model, task_files):
    whole, _ = _run(tmp_path, "a", tiny_model, *task_files, optimizer_offload="host", max_steps=8)
    folder = tmp_path / "b"
    folder.mkdir()
    cfg = make_config(folder, tiny_model, *task_files, **{**EQ, "optimizer_offload": "host", "max_steps": 8})
    env = {"PYTHONPATH": str(sigterm_site(tmp_path / "site")), "TEST_SIGTERM_AT_STEP": "3"}
    res = _train(cfg, env=env)
    assert res.returncode == 143, res.stderr[-2000:]
    run = folder / "run"
    (ck,) = (run / "checkpoints").iterdir()
    from safetensors.torch import load_file

    kept = load_file(str(ck / "trainable.safetensors"))
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in kept.values())  # the fp32 masters
    res = _train(run / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "at step 3/8" in res.stderr
    _same(_weights(whole), _weights(run))
    assert _losses(whole) == _losses(run)


def _pairs(n, seed):
    import random

    from tests.train.conftest import COLORS

    rng = random.Random(seed)
    items, colours = sorted(COLORS), sorted(set(COLORS.values()))
    rows = []
    for _ in range(n):
        item = rng.choice(items)
        wrong = rng.choice([c for c in colours if c != COLORS[item]])
        rows.append({"prompt": f"What color is the {item}?", "chosen": COLORS[item], "rejected": wrong})
    return rows


@pytest.mark.slow
def test_full_dpo_offloaded_equals_resident_and_its_reference_is_the_start(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48, 1))
    evals = write_jsonl(tmp_path / "pairs_eval.jsonl", _pairs(12, 2))
    extra = dict(method="dpo", learning_rate=5e-4, eval_at_start=True, max_steps=4)
    resident, _ = _run(tmp_path, "a", tiny_model, train, evals, **extra)
    offloaded, _ = _run(tmp_path, "b", tiny_model, train, evals, optimizer_offload="host", **extra)
    _same(_weights(resident), _weights(offloaded))
    assert _losses(resident) == _losses(offloaded)
    s = json.loads((resident / "summary.json").read_text())
    # the reference is the model as loaded: before the first step every log-ratio is 0, the loss is log 2
    assert s["eval_before"]["reward_margin"] == 0.0
    assert math.isclose(s["eval_before"]["eval_loss"], math.log(2), rel_tol=1e-6)  # float32 logsigmoid
    losses = [loss for _, loss, _ in _losses(resident)]
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-6)  # step 1: the policy is still its reference
    assert min(losses[1:]) < math.log(2) - 0.05  # and then it learns the preferences


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trainable_patterns_train_only_what_they_name(tmp_path, tiny_model, task_files, bf16_cpu, dtype):
    """In bf16 too: the frozen weights train beside as a bf16 copy, and model/ must hold the fp32 source's own
    values for them (they came out rounded to bf16 before #41's fix), bit for bit."""
    run, res = _run(tmp_path, "a", tiny_model, *task_files, trainable=["*.mlp.*"], max_steps=3, dtype=dtype,
                    emulate_file=bf16_cpu)
    assert json.loads((run / "summary.json").read_text())["dtype"] == dtype
    base, out = _weights_of(tiny_model), _weights(run)
    changed = {k for k in base if not bool((base[k] == out[k]).all())}
    assert changed and all(".mlp." in k for k in changed), changed
    assert {out[k].dtype for k in out} == {base[k].dtype for k in base}
    assert "trains" in res.stderr


@pytest.mark.parametrize("settings, says", [
    (["trainable=model.layers.9.*"], "names no parameter"),
    (["trainable=[*.mlp.*]"], "trainable=[model.layers.1?.*,lm_head.weight]"),  # YAML's alias star: advice that runs
    (["qlora=true"], "a 4-bit base cannot be trained"),
    (["optimizer_offload=host", "finetune=lora"], "set finetune=full"),
    (["offload=layers"], "set optimizer_offload=host too"),
    (["optimizer_offload=host", "optimizer=adamw_8bit"], "set optimizer=adamw"),
])
@pytest.mark.slow
def test_full_settings_that_cannot_work_are_refused_clearly(tmp_path, tiny_model, task_files, settings, says):
    cfg = make_config(tmp_path, tiny_model, *task_files, **EQ)
    res = _train(cfg, *settings)
    assert res.returncode == 2, res.stderr[-2000:]
    assert says in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_full_model_folder_loads_in_transformers_and_keeps_the_source_dtype(tmp_path, tiny_model, task_files):
    import torch
    from transformers import AutoModelForCausalLM

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).save_pretrained(str(src))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model / f).exists():
            (src / f).write_bytes((tiny_model / f).read_bytes())
    run, _ = _run(tmp_path, "a", src, *task_files, max_steps=2, optimizer_offload="host")
    loaded = AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype="auto", trust_remote_code=False)
    assert loaded.dtype == torch.bfloat16
    assert {t.dtype for t in _weights(run).values()} == {torch.bfloat16}
    assert json.loads((run / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (run / "model" / "tokenizer.json").exists()


@pytest.mark.slow
def test_full_run_exports_to_gguf_without_a_merge(tmp_path, tiny_model, task_files):
    import gguf
    import numpy as np

    run, res = _run(tmp_path, "a", tiny_model, *task_files, max_steps=2, export="gguf", export_type="f32")
    assert not (run / "merged").exists() and (run / "model.gguf").exists()
    assert "FROM ./model.gguf" in (run / "model.Modelfile").read_text()
    reader = gguf.GGUFReader(str(run / "model.gguf"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    trained = _weights(run)["model.embed_tokens.weight"].numpy()
    assert np.array_equal(np.asarray(embd.data).reshape(trained.shape), trained)  # the trained weights, as written


@pytest.mark.slow
def test_eval_and_generate_read_a_full_run_and_compare_it_with_its_base(tmp_path, tiny_model, task_files):
    run, _ = _run(tmp_path, "a", tiny_model, *task_files, max_steps=20, eval_at_start=True, eval_metrics="auto",
                  gradient_accumulation=1, learning_rate=0.002)
    res = cli.run("eval", run, "--data", task_files[1])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    s = json.loads((run / "summary.json").read_text())
    # the base is the run's starting model (its weights swapped in), the adapted one the model/ folder
    assert math.isclose(out["base"]["eval_loss"], s["eval_before"]["eval_loss"], rel_tol=1e-5)
    assert math.isclose(out["adapted"]["eval_loss"], s["eval_after"]["eval_loss"], rel_tol=1e-5)
    res = cli.run("generate", run, "What color is the lemon?")
    assert res.returncode == 0 and res.stdout.strip(), res.stderr[-2000:]


def test_a_users_model_folder_in_output_dir_is_never_replaced(tmp_path, tiny_model, task_files):
    folder = tmp_path / "a"
    folder.mkdir()
    cfg = make_config(folder, tiny_model, *task_files, **{**EQ, "max_steps": 1})
    mine = folder / "run" / "model"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    res = _train(cfg)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "model" in res.stderr and (mine / "notes.txt").read_text() == "mine"
    res = _train(cfg, "--overwrite")
    assert res.returncode == 2 and (mine / "notes.txt").read_text() == "mine"  # not ours: never deleted


@pytest.mark.slow
def test_two_ddp_processes_equal_one_with_twice_the_accumulation(tmp_path, tiny_model, task_files):
    """A resident full fine-tune under DDP (gloo on CPU): two processes = one process with 2x the accumulation (the
    batch plan gives each step the same block of micro-batches either way), to float precision (the all-reduce sums
    in another order)."""
    one, _ = _run(tmp_path, "a", tiny_model, *task_files, max_steps=3, gradient_accumulation=2)
    folder = tmp_path / "b"
    folder.mkdir()
    cfg = make_config(folder, tiny_model, *task_files, **{**EQ, "max_steps": 3, "gradient_accumulation": 1})
    res = _train(cfg, "--devices", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _weights(one), _weights(folder / "run")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    res = _train(cfg, "--devices", "2", "optimizer_offload=host", "output_dir=" + str(folder / "run2"))
    assert res.returncode == 2 and "optimizer_offload=host runs on one process" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_fp16_profile_offloaded_steps_through_the_grad_scaler(tmp_path, tiny_model, task_files):
    """A Volta's fp16 profile (emulated on the CPU): fp16 working copy, fp32 host masters, the GradScaler unscaling
    host gradients and skipping a step on overflow; the scaler's state is in the checkpoint."""
    import torch

    folder = tmp_path / "a"
    folder.mkdir()
    cfg = make_config(folder, tiny_model, *task_files, **{**EQ, "optimizer_offload": "host", "max_steps": 4,
                                                          "dtype": None})  # the profile's own: fp16
    res = _train(cfg, "--emulate", "v100", "--cpu-emulation", "checkpoint_every=2", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = folder / "run"
    assert json.loads((run / "summary.json").read_text())["dtype"] == "float16"
    assert all(math.isfinite(loss) for _, loss, _ in _losses(run))
    optim = torch.load(run / "checkpoints" / "step-0000002" / "optim.pt", weights_only=True)
    assert optim["scaler"] is not None and optim["scaler"]["scale"] > 0
