"""#37: GRPO on your own metric. The loss types and importance-sampling levels against the papers' formulas on
hand-made tensors, the advantages, the chunked log-probabilities against one pass, the KV-expanded rollout against
G separate generations, the rewards' errors, and `hwcompat train` end to end: a reward that rises, a bad reward
refused before loading or stopped with its checkpoint kept, SIGTERM + resume bit-identical."""

import json
import math
import os
import signal
import statistics
import time
from types import SimpleNamespace

import pytest

from hwcompat.errors import InputError
from hwcompat.train.config import TrainConfig
from tests import cli
from tests.train.conftest import make_config

torch = pytest.importorskip("torch")


# --- the loss, against the formulas ------------------------------------------------------------------------

LOGP = [[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.9, 0.0, 0.0], [-2.0, -0.1, -1.5, -0.7]]
OLD = [[-1.1, -1.5, -0.9, 0.0], [-0.3, -1.4, 0.0, 0.0], [-1.6, -0.1, -1.0, -0.2]]
REF = [[-1.2, -1.9, -0.4, 0.0], [-0.5, -0.8, 0.0, 0.0], [-1.9, -0.3, -1.2, -0.9]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
ADV = [0.7, -1.2, 0.4]


def _expected(cfg, level):
    """The clipped surrogate (+ beta k3 KL) per token, computed with Python floats from the papers' formulas."""
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    rows = []
    for lp, old, ref, m, a in zip(LOGP, OLD, REF, MASK, ADV):
        n = sum(m)
        seq = sum((x - o) * k for x, o, k in zip(lp, old, m)) / n  # GSPO: the length-normalised log-ratio
        row = []
        for x, o, r, k in zip(lp, old, ref, m):
            w = math.exp(seq if level == "sequence" else x - o)
            clipped = min(max(w, 1 - cfg.epsilon), 1 + high)
            loss = -min(w * a, clipped * a)
            if cfg.beta:
                loss += cfg.beta * (math.exp(r - x) - (r - x) - 1)
            row.append(loss * k)
        rows.append(row)
    return rows


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,high", [(0.0, None), (0.04, 0.28)])
def test_each_loss_type_and_level_equals_the_formula(loss_type, level, beta, high):
    from hwcompat.train.objectives.grpo_loss import reduce, token_losses

    cfg = TrainConfig(method="grpo", loss_type=loss_type, importance_sampling_level=level, beta=beta,
                      epsilon=0.2, epsilon_high=high, max_completion_length=6)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    losses, _ = token_losses(t(LOGP), t(OLD), t(REF), t(ADV), t(MASK), cfg)
    got = reduce(losses, t(MASK), cfg).item()
    rows = _expected(cfg, level)
    if loss_type == "grpo":  # Shao et al.: each completion's mean over its tokens, summed (÷ completions later)
        want = sum(sum(r) / sum(m) for r, m in zip(rows, MASK))
    elif loss_type == "dr_grpo":  # Liu et al.: every token, ÷ the completion budget (and completions later)
        want = sum(map(sum, rows)) / cfg.max_completion_length
    else:  # DAPO: every token (÷ the window's tokens later)
        want = sum(map(sum, rows))
    assert got == pytest.approx(want, rel=1e-12)


def test_on_policy_the_loss_gradient_is_the_policy_gradient():
    """num_iterations=1: old = logp detached, so w = 1 and d loss / d logp = -A per token (dapo, beta 0)."""
    from hwcompat.train.objectives.grpo_loss import reduce, token_losses

    cfg = TrainConfig(method="grpo")
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(MASK, dtype=torch.float64)
    losses, w = token_losses(logp, logp.detach(), None, torch.tensor(ADV, dtype=torch.float64), mask, cfg)
    reduce(losses, mask, cfg).backward()
    assert torch.equal(w, torch.ones_like(w))
    assert torch.allclose(logp.grad, -torch.tensor(ADV, dtype=torch.float64).unsqueeze(-1) * mask)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_each_reward_against_its_group(scale):
    from hwcompat.train.objectives.grpo_loss import advantages

    r = [1.0, 0.0, 0.5, 0.5, 0.2, 0.9, 0.1, 0.4]
    got = advantages(torch.tensor(r, dtype=torch.float64), 4, scale).tolist()
    want = []
    for g in (r[:4], r[4:]):
        mean = statistics.mean(g)
        std = {"group": statistics.stdev(g), "batch": statistics.stdev(r), "none": None}[scale]
        want += [(x - mean) / (std + 1e-4) if std is not None else x - mean for x in g]
    assert got == pytest.approx(want, rel=1e-9)


# --- log-probabilities and rollouts on a real (tiny) model ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from hwcompat.train.tiny import build_model, build_tokenizer

    tok = build_tokenizer([f"What color is the {w}? red green blue" for w in ("sky", "grass", "apple")] * 5,
                          chat_template=False)
    return tok, build_model(tok, hidden=64, layers=2).eval()


def _objective(tok, model, **cfg):
    from hwcompat.train.objectives.grpo import GRPO

    config = TrainConfig(method="grpo", rewards=["exact_match"], micro_batch_size=8, num_generations=4,
                         max_completion_length=10, max_seq_len=64, **cfg)
    obj = GRPO(config, SimpleNamespace(dtype="float32"), torch.device("cpu"))
    obj.tokenizer = tok
    obj.bind(model, "eager")
    return obj


@pytest.mark.parametrize("share", [False, True], ids=["a row per completion", "a row per prompt"])
def test_chunked_completion_logps_equal_one_pass(tiny, share):
    """The loss's log-probabilities (chunked head; the prompt computed once per group with the 4-D mask, or G
    times) equal log_softmax of the model's own full logits in padded rows."""
    from hwcompat.train import rollout
    from hwcompat.train.objectives.grpo_rows import Prompt

    tok, model = tiny
    obj = _objective(tok, model)
    prompts = [Prompt(tok.encode("What color is the sky? red green blue"), "", None, "x:1"),
               Prompt(tok.encode("apple"), "", None, "x:2")]
    out = rollout.generate(model, [p.ids for p in prompts], 4, 10, 1.0, 1.0, obj.eos, tok.pad_token_id, 7)
    obj.can_share = False
    padded = obj._tensors(prompts, out, tok.pad_token_id)
    obj.can_share = share
    batch = obj._tensors(prompts, out, tok.pad_token_id)
    assert ("segments" in batch) is share
    with torch.no_grad():
        got = obj.token_logps(batch)
        ids, width = padded["input_ids"], padded["prompt_width"]
        logits = model(input_ids=ids, attention_mask=padded["attention_mask"],
                       position_ids=padded["position_ids"]).logits.float()
        want = logits[:, width - 1:-1].log_softmax(-1).gather(-1, ids[:, width:].unsqueeze(-1)).squeeze(-1)
    mask = batch["loss_mask"] > 0
    assert mask.sum() == sum(len(c) for c in out.completions)
    assert torch.allclose(got[mask], want[mask], atol=1e-5) and (got[~mask] == 0).all()
    if share:  # the prompt once per group: fewer tokens through the model than G padded rows
        assert batch["n_tokens"] < padded["n_tokens"]


def test_the_kv_expanded_rollout_equals_g_separate_generations(tiny):
    """One prefill, the cache repeated G ways, rows leaving as they end: the same tokens as generating each
    completion alone (no cache, no padding) with the same noise row."""
    from hwcompat.train import rollout

    tok, model = tiny
    prompts = [tok.encode("What color is the sky?"), tok.encode("grass")]
    eos = {tok.eos_token_id, *tok.encode(" is")}  # common tokens as ends: rows end at different steps
    g, steps, seed = 4, 12, 12
    with torch.no_grad():
        out = rollout.generate(model, prompts, g, steps, 0.9, 0.95, eos, tok.pad_token_id, seed)
    assert any(out.ended) and not all(out.ended)  # some rows left the batch early

    def alone(row):
        gen = torch.Generator().manual_seed(seed)
        ids, toks = list(prompts[row // g]), []
        for _ in range(steps):
            uniform = torch.rand(len(prompts) * g, dtype=torch.float64, generator=gen)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[:, -1]
            nxt = rollout.pick(logits, uniform[row:row + 1], 0.9, 0.95).item()
            toks.append(nxt)
            ids.append(nxt)
            if nxt in eos:
                break
        return toks

    assert [alone(j) for j in range(len(prompts) * g)] == out.completions


def test_merged_rollout_weights_sample_the_same_and_leave_the_base_untouched(tiny):
    """CPU rollouts run through base + adapter merged into one weight (a copy, swapped by pointer): the same tokens
    as through the adapter, and afterwards every base weight is the very same tensor, bit for bit."""
    from peft import LoraConfig, get_peft_model

    from hwcompat.train import rollout

    tok, base = tiny
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a trained-looking adapter (B = 0 would make the merge a no-op)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters() if "lora" not in n}
    prompts = [tok.encode("What color is the sky?"), tok.encode("grass")]
    with torch.no_grad():
        plain = rollout.generate(model, prompts, 4, 10, 1.0, 1.0, {tok.eos_token_id}, tok.pad_token_id, 5)
        with rollout.merged(model):
            fused = rollout.generate(model, prompts, 4, 10, 1.0, 1.0, {tok.eos_token_id}, tok.pad_token_id, 5)
    assert fused.completions == plain.completions
    for n, p in model.named_parameters():
        if n in before:
            assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    model.unload()  # the module-scoped tiny model goes back to being a plain model


def test_sampling_follows_temperature_and_top_p():
    from hwcompat.train.rollout import pick

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).expand(20000, 5)
    gen = torch.Generator().manual_seed(0)
    drawn = pick(logits, torch.rand(20000, generator=gen), 1.0, 1.0)
    freq = torch.bincount(drawn, minlength=5).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.015)
    hot = torch.softmax(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])) / 2.0, -1)  # temperature 2 flattens
    warm = torch.bincount(pick(logits[:, :4], torch.rand(20000, generator=gen), 2.0, 1.0), minlength=4) / 20000
    assert torch.allclose(warm.float(), hot.float(), atol=0.015)
    nucleus = pick(logits, torch.rand(20000, generator=gen), 1.0, 0.7)
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: the tail is never drawn
    edges = pick(logits[:2], torch.tensor([0.0, 1.0]), 1.0, 1.0)
    assert edges.tolist() == [0, 3]  # u = 0 and u = 1 land on tokens that have mass, never the zero-mass last


# --- rewards ------------------------------------------------------------------------------------------------

def test_built_in_rewards_score_each_row():
    from hwcompat.train import rewards

    rs = rewards.resolve(["field_f1", "json_valid", "exact_match", "label_accuracy"], [1.0, 0.5, 1.0, 1.0])
    out = rewards.score(rs, ["p", "p"], ['{"a": 1, "b": 2}', "nope"], ['{"a": 1, "b": 3}', "Nope"], ["f:1", "f:2"])
    assert out == [[0.5, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("body,says", [
    ("raise ValueError('boom')", "reward rw.py:bad raised ValueError: boom (on the completions of data.jsonl:3"),
    ("return [1.0]", "returned 1 value(s) for 2 completions (of data.jsonl:3, data.jsonl:4)"),
    ("return [1.0, float('nan')]", "returned nan for completion 1 of data.jsonl:4"),
    ("return [float('inf'), 1.0]", "returned inf for completion 0 of data.jsonl:3"),
    ("return ['a', 1.0]", "returned 'a' for completion 0 of data.jsonl:3: expected a float"),
])
def test_a_bad_reward_function_is_named_with_its_row(tmp_path, body, says):
    from hwcompat.train import rewards

    (tmp_path / "rw.py").write_text(f"def bad(prompts, completions, references, **kw):\n    {body}\n")
    (r,) = rewards.resolve([rewards.local_spec("rw:bad", tmp_path)], [])
    r = rewards.Reward("rw.py:bad", 1.0, r.fn)
    with pytest.raises(rewards.RewardError) as e:
        rewards.score([r], ["p", "q"], ["a", "b"], [None, None], ["data.jsonl:3", "data.jsonl:4"])
    assert says in str(e.value)


@pytest.mark.parametrize("settings,says", [
    ({"num_generations": 1}, "num_generations=1: GRPO compares each completion with its group's others"),
    ({"micro_batch_size": 6, "num_generations": 4}, "use a multiple of 4"),
    ({"rewards": []}, "method grpo needs at least one reward"),
    ({"rewards": ["field_f2"]}, "'field_f2' is not a built-in reward"),
    ({"rewards": ["nosuchmodule:fn"]}, "importing nosuchmodule failed"),
    ({"rewards": ["json_valid", "exact_match"], "reward_weights": [1.0]}, "reward_weights has 1 value(s) for 2"),
])
def test_what_cannot_work_is_refused_before_loading(tmp_path, tiny_model, task_files, settings, says):
    base = {"method": "grpo", "rewards": ["exact_match"], "micro_batch_size": 8, "num_generations": 4,
            "max_completion_length": 8}
    cfg = make_config(tmp_path, tiny_model, *task_files, **{**base, **settings})
    res = _train(cfg)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert says in res.stderr and not (tmp_path / "run").exists()


def test_beta_zero_is_refused_for_dpo_only():
    from hwcompat.train.config import load_config

    with pytest.raises(InputError, match="beta=0 with method dpo"):
        load_config(None, ["model=m", "train_data=t.jsonl", "method=dpo", "beta=0"])
    grpo = load_config(None, ["model=m", "train_data=t.jsonl", "method=grpo", "beta=0"])
    assert grpo.config.beta == 0
    # a micro-batch counts completions: left unset it holds one prompt's group (TRL's 8 with G 8), said as such
    assert grpo.config.micro_batch_size == 8 and grpo.origins["micro_batch_size"].startswith("default (grpo")


# --- end to end ---------------------------------------------------------------------------------------------

SHORT = "def short(prompts, completions, references, **kwargs):\n{sleep}    return [-len(c) / 40.0 for c in completions]\n"


def _train(*args, env=None, timeout=600):
    return cli.run("train", *args, env=env, timeout=timeout)


def _grpo_config(tmp_path, tiny_model, task_files, sleep="", **extra):
    (tmp_path / "my_rewards.py").write_text(SHORT.format(sleep=sleep))
    settings = {"method": "grpo", "rewards": ["my_rewards:short", "exact_match"], "reward_weights": [1.0, 0.5],
                "micro_batch_size": 16, "num_generations": 8, "max_completion_length": 12, "eval_max_rows": 8,
                "max_steps": 20}
    return make_config(tmp_path, tiny_model, *task_files, **{**settings, **extra})


def _train_records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.slow
def test_grpo_learns_a_reward_end_to_end(tmp_path, tiny_model, task_files):
    """A user reward the tiny model can learn (shorter answers): the mean reward rises, every figure is logged."""
    cfg = _grpo_config(tmp_path, tiny_model, task_files, max_steps=24)
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    recs = _train_records(run)
    assert len(recs) == 24
    first, last = (statistics.mean(r["reward"] for r in part) for part in (recs[:4], recs[-4:]))
    assert last > first + 0.05, (first, last)
    for key in ("rewards/short/mean", "rewards/short/std", "rewards/exact_match/mean", "reward_std",
                "completion_length", "completion_length_max", "truncated_share", "clip_ratio", "completions"):
        assert key in recs[0], key
    assert recs[0]["completions"] == 16.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "grpo" and summary["eval_after"]["reward"] > summary["eval_before"]["reward"]
    assert "reward_short" in summary["eval_after"] and "accuracy" in summary["eval_after"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "reward" in res.stderr  # the progress line and the eval lines say it
    samples = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"samples"' in x]
    assert [s["step"] for s in samples] == [0, 24] and len(samples[0]["samples"]) == 2
    assert all(len(s["completions"]) == 8 == len(s["rewards"]) for s in samples[-1]["samples"])
    page = (run / "report.html").read_text()
    assert "Sampled completions (GRPO)" in page and "GRPO reward" in page
    evaluated = cli.run("eval", run, "--data", task_files[1], timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "reward_short" in json.loads(evaluated.stdout)["adapted"]


@pytest.mark.slow
def test_a_reward_that_fails_mid_run_keeps_the_checkpoint_and_resume_goes_on(tmp_path, tiny_model, task_files):
    cfg = _grpo_config(tmp_path, tiny_model, task_files, max_steps=6)
    (tmp_path / "my_rewards.py").write_text(
        "import os\nCALLS = [0]\ndef short(prompts, completions, references, **kwargs):\n"
        "    CALLS[0] += 1\n    if CALLS[0] == 4:\n        raise KeyError('field')\n"
        "    return [-len(c) / 40.0 for c in completions]\n")
    res = _train(cfg, "eval_at_start=false")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "reward " in res.stderr and "short raised KeyError: 'field'" in res.stderr
    assert "train.jsonl:" in res.stderr  # the rows it failed on
    assert "kept: the checkpoint of step 3/6" in res.stderr and "--resume" in res.stderr
    (tmp_path / "my_rewards.py").write_text(SHORT.format(sleep=""))
    res = _train(tmp_path / "run" / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 3/6" in res.stderr and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_sigterm_and_resume_are_bit_identical(tmp_path, tiny_model, task_files):
    """A SIGTERM while rewards are being computed: the resumed run samples the same completions and ends with the
    same adapter, bit for bit, as one that was never stopped (dropout on: its RNG is restored too)."""
    from safetensors.torch import load_file

    runs = {}
    for name, sleep in (("a", ""), ("b", "    import time; time.sleep(0.15)\n")):
        (tmp_path / name).mkdir()
        runs[name] = _grpo_config(tmp_path / name, tiny_model, task_files, sleep=sleep, max_steps=10,
                                  lora_dropout=0.1, eval_at_start=False, eval_metrics="none")
    assert _train(runs["a"]).returncode == 0
    proc = cli.popen("train", runs["b"])
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    res = _train(tmp_path / "b" / "run" / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    wa = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (_train_records(tmp_path / n / "run") for n in ("a", "b"))
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]  # the same completions were sampled


# --- the planner knows GRPO ---------------------------------------------------------------------------------

QWEN3_4B = {"model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "tie_word_embeddings": True, "max_position_embeddings": 40960}


def test_the_rollout_term_is_the_kv_cache_and_one_tokens_sampling():
    from hwcompat import plan as P

    shape = P.shape_from_config(QWEN3_4B, "test")
    inp = P.PlanInput(seq_len=1536, batch_size=16, generations=8, completion_len=1024)
    per_token = 36 * 2 * 8 * 128 * 2  # layers x (K, V) x kv heads x head dim x bf16
    want = 16 * 1536 * per_token + 2 * 512 * per_token + 16 * 151936 * (2 + 16)
    assert P.rollout_bytes(shape, inp, 2) == want
    plan = P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", 24 * 2**30)
    training = sum(v for k, v in plan.breakdown.items() if k in ("base_weights", "adapter_weights", "gradients",
                                                                  "optimizer_states", "activations",
                                                                  "attention_scores", "logits"))
    assert plan.breakdown["rollout"] == max(0, want - training)
    assert any("grpo: the rollout" in n for n in plan.notes)


def test_a_streamed_rollout_moves_every_layer_per_new_token():
    """#37 §1: with offload=layers the rollout's prompt pass and each new token visit every streamed layer; those
    copies cannot overlap a token's tiny compute, so they add to the step the plan estimates."""
    from hwcompat import plan as P

    shape = P.shape_from_config(QWEN3_4B, "test")
    host = P.Host(ram_bytes=None, pcie_generation=3, pcie_width=16, peak_tflops=100.0)
    sft = P.stream_terms(shape, P.PlanInput(seq_len=1536, batch_size=16, offload="layers"), 2, host)
    grpo = P.stream_terms(shape, P.PlanInput(seq_len=1536, batch_size=16, offload="layers", generations=8,
                                             completion_len=1024), 2, host)
    assert grpo.rollout_bytes == (1 + 1024) * 36 * sft.layer_bytes
    assert grpo.bytes_per_micro_step == sft.bytes_per_micro_step + grpo.rollout_bytes
    rollout_s = grpo.rollout_bytes / grpo.link_bytes_per_s
    assert grpo.step_seconds == pytest.approx(max(grpo.compute_seconds, sft.copy_seconds) + rollout_s)


def test_plan_grpo_suggests_whole_groups_and_shorter_completions(tmp_path, capsys):
    from hwcompat.cli import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    args = ["plan", "--model", str(tmp_path), "--emulate", "rx6600", "--method", "grpo", "--suggest", "--json",
            "micro_batch_size=16", "num_generations=8", "max_completion_length=1024", "max_seq_len=1536",
            "gradient_checkpointing=false"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["fits"]
    changes = [s["settings"] for s in out["suggestions"]]
    assert {"micro_batch_size": 8, "gradient_accumulation": 2} in changes  # one prompt's group per micro-batch
    assert any(c.get("max_completion_length") == 512 for c in changes)
    assert not any("offload" in c for c in changes)  # rollouts are not streamed
    assert all(c.get("micro_batch_size", 8) % 8 == 0 for c in changes)


def test_plan_refuses_a_micro_batch_of_partial_groups(tmp_path, capsys):
    from hwcompat.cli import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_4B))
    assert main(["plan", "--model", str(tmp_path), "--emulate", "rx6600", "--method", "grpo", "micro_batch_size=4",
                 "num_generations=8"]) == 2
    assert "must hold whole groups of num_generations=8" in capsys.readouterr().err


def test_the_report_draws_the_rewards_and_lengths(tmp_path):
    """report.html of a GRPO run: the reward per step and at each eval, each reward, completion lengths, and the
    rewards in the before/after table."""
    from hwcompat.train.report import load_run, render_run

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "kind": "train", "loss": 0.0, "lr": 1e-5, "reward": 0.1 * s, "rewards/field_f1/mean": 0.05 * s,
             "rewards/json_valid/mean": 1.0, "completion_length": 30.0 + s, "completion_length_max": 64.0,
             "tokens_per_s": 10.0, "memory_bytes": 1} for s in range(1, 5)]
    recs += [{"step": 0, "kind": "eval", "reward": 0.2, "reward_field_f1": 0.1}, {"step": 4, "kind": "eval",
                                                                                 "reward": 0.6, "reward_field_f1": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "run.json").write_text(json.dumps({"config": {"method": "grpo"}}))
    (run / "summary.json").write_text(json.dumps({"eval_before": recs[-2], "eval_after": recs[-1], "regressed": []}))
    page = render_run(load_run(run))
    for text in ("GRPO reward", "train (sampled)", "eval (greedy)", "field_f1", "json_valid",
                 "completion length (tokens)", "reward_field_f1"):
        assert text in page, text


@pytest.mark.slow
def test_grpo_under_ddp_keeps_each_group_on_one_rank(tmp_path, tiny_model, task_files):
    """Two CPU processes (torchrun + DDP): each rank samples whole groups for its own prompts (a group's G
    completions are one micro-batch), the loss's gradients are averaged, the adapter is written once."""
    cfg = _grpo_config(tmp_path, tiny_model, task_files, max_steps=3, eval_at_start=False, eval_metrics="none",
                       micro_batch_size=8, num_generations=4)
    res = _train(cfg, "--devices", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["objective"] == "grpo"
    recs = _train_records(tmp_path / "run")
    assert len(recs) == 3 and all(r["completions"] == 16.0 for r in recs)  # both ranks' groups, not rank 0's


@pytest.mark.slow
def test_grpo_with_a_4bit_base_under_cpu_emulation(tmp_path, tiny_model, task_files):
    """QLoRA: rollouts through the NF4 base keep the adapter path (a 4-bit base is never merged)."""
    pytest.importorskip("bitsandbytes")
    cfg = _grpo_config(tmp_path, tiny_model, task_files, max_steps=2, qlora=True, eval_at_start=False,
                       eval_metrics="none", micro_batch_size=8, num_generations=4, max_completion_length=6)
    res = _train(cfg, "--emulate", "rtx4090", "--cpu-emulation")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(_train_records(tmp_path / "run")) == 2


def test_data_check_reads_prompt_rows_for_grpo(tmp_path, run_cli):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What color is the sky?"}\n{"prompt": "x", "completion": "y"}\n')
    res = run_cli("data", "check", str(data), "--method", "grpo")
    assert res.returncode == 0 and "ok: no errors" in res.stdout, res.stderr
    assert run_cli("data", "check", str(data)).returncode == 1  # for SFT the answer is required
    data.write_text('{"prompt": "a\\u0000b"}\n')
    bad = run_cli("data", "check", str(data), "--method", "grpo")
    assert bad.returncode == 1 and f"{data}:1: prompt: NUL character" in bad.stderr


@pytest.mark.slow
def test_grpo_full_fine_tune_with_a_kl_reference_offloaded_equals_resident(tmp_path, tiny_model, task_files):
    """finetune: full under GRPO (#38): with beta > 0 the reference is a frozen copy of the starting weights (no
    adapter to switch off), the KL is 0 at the first step, and the host-offloaded run equals the resident one (to
    the bit in fp32: in bf16 the resident run casts its fp32 masters per op, the offloaded one keeps a bf16 copy)."""
    from safetensors.torch import load_file

    runs = []
    for name, extra in (("a", {}), ("b", {"optimizer_offload": "host"})):
        folder = tmp_path / name
        folder.mkdir()
        cfg = _grpo_config(folder, tiny_model, task_files, finetune="full", beta=0.05, learning_rate=1e-3,
                           max_steps=3, eval_at_start=False, eval_metrics="none", dtype="float32", **extra)
        res = _train(cfg)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(folder / "run")
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in runs)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    recs = _train_records(runs[0])
    assert recs[0]["kl"] == 0.0 and recs[-1]["kl"] > 0  # the reference is the start, and the policy leaves it


@pytest.mark.slow
def test_num_iterations_steps_each_rollout_mu_times_off_policy(tmp_path, tiny_model, task_files):
    """TRL's num_iterations: each generation's rollouts serve mu optimizer steps, the ratio against the policy at
    generation (w = 1 on the first step, not after); an epoch takes mu x the steps."""
    cfg = _grpo_config(tmp_path, tiny_model, task_files, num_iterations=2, max_steps=6, learning_rate=5e-3,
                       eval_at_start=False, eval_metrics="none", lora_dropout=0.0)
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = _train_records(tmp_path / "run")
    assert len(recs) == 6
    for a, b in zip(recs[0::2], recs[1::2]):  # the same rollout twice: the same rewards and lengths
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]
    assert recs[0]["reward"] != recs[2]["reward"] or recs[0]["completion_length"] != recs[2]["completion_length"]
    assert all(r["clip_ratio"] == 0.0 for r in recs[0::2])  # at generation the policy is its own old policy


@pytest.mark.slow
def test_a_resume_between_a_rollouts_steps_reuses_it_to_the_bit(tmp_path, tiny_model, task_files):
    from safetensors.torch import load_file

    from tests.train.conftest import sigterm_site

    extra = dict(num_iterations=2, max_steps=6, learning_rate=5e-3, eval_at_start=False, eval_metrics="none",
                 lora_dropout=0.0)
    whole = tmp_path / "a"
    whole.mkdir()
    assert _train(_grpo_config(whole, tiny_model, task_files, **extra)).returncode == 0
    cut = tmp_path / "b"
    cut.mkdir()
    cfg = _grpo_config(cut, tiny_model, task_files, **extra)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(sigterm_site(tmp_path / "site")),
                                                     os.environ.get("PYTHONPATH", "")) if p),
           "TEST_SIGTERM_AT_STEP": "3"}  # step 3 is the first of the second rollout's two steps
    res = _train(cfg, env=env)
    assert res.returncode == 143, res.stderr[-2000:]
    (ck,) = (cut / "run" / "checkpoints").iterdir()
    assert (ck / "objective.pt").is_file()
    res = _train(cut / "run" / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    a = load_file(str(whole / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(bool((a[k] == b[k]).all()) for k in a)
    assert [r["loss"] for r in _train_records(whole / "run")] == [r["loss"] for r in _train_records(cut / "run")]


@pytest.mark.slow
def test_an_epoch_of_num_iterations_takes_mu_times_the_steps(tmp_path, tiny_model):
    from tests.train.conftest import task_rows, write_jsonl

    train = write_jsonl(tmp_path / "t.jsonl", task_rows(4, 1))  # 4 prompts, 2 a micro-batch: 2 windows an epoch
    evals = write_jsonl(tmp_path / "e.jsonl", task_rows(2, 2))
    steps = {}
    for mu in (1, 3):
        folder = tmp_path / f"mu{mu}"
        folder.mkdir()
        cfg = _grpo_config(folder, tiny_model, (train, evals), num_iterations=mu, max_steps=0, epochs=1,
                           eval_at_start=False, eval_metrics="none")
        res = _train(cfg)
        assert res.returncode == 0, res.stderr[-2000:]
        steps[mu] = json.loads((folder / "run" / "summary.json").read_text())["steps"]
    assert steps == {1: 2, 3: 6}


@pytest.mark.slow
def test_grpo_full_fine_tune_streamed_equals_resident(tmp_path, tiny_model, task_files):
    """#37 §1 with #38: a full fine-tune's working copy streamed (offload=layers, optimizer in host RAM) under GRPO
    with a KL reference: the rollouts and the reference pass visit the streamed layers too; the weights equal the
    resident host-offloaded run's. In fp32 (dtype pinned): on a bf16 CPU the rollouts (eval mode: SDPA) and the
    training passes (hwcompat's cpu_bf16 kernel) round apart differently when one side's passes are streamed, so
    bit-equality is a fp32 fact; the plumbing is what this test checks."""
    from safetensors.torch import load_file

    runs = []
    for name, extra in (("a", {"dtype": "float32"}), ("b", {"offload": "layers", "dtype": "float32"})):
        folder = tmp_path / name
        folder.mkdir()
        cfg = _grpo_config(folder, tiny_model, task_files, finetune="full", optimizer_offload="host", beta=0.05,
                           learning_rate=1e-3, max_steps=3, eval_at_start=False, eval_metrics="none", **extra)
        res = _train(cfg)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append((folder / "run", res.stderr))
    assert "decoder layers streamed from host memory" in runs[1][1]
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r, _ in runs)
    assert a.keys() == b.keys() and max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    recs = _train_records(runs[1][0])
    assert recs[0]["kl"] == 0.0 and recs[-1]["kl"] > 0
