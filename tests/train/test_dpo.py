"""DPO: the loss against the textbook formula, preference-data checks with their messages, a CPU run end to end."""

import json
from types import SimpleNamespace

import pytest

from hwcompat.data.problems import Report
from hwcompat.data.pairs import read_pairs
from tests import cli
from tests.train.conftest import dpo_objective as _objective, make_config, pair_rows, write_jsonl


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.7])
def test_dpo_loss_and_gradients_match_the_textbook_formula(tiny_model, tmp_path, pair_files, rpo_alpha):
    import torch
    import torch.nn.functional as F

    obj, model = _objective(tiny_model, tmp_path, pair_files, rpo_alpha=rpo_alpha)
    idx = [0, 3, 5, 7]
    batch = obj.collate(idx, "padded", obj.tokenizer.pad_token_id)
    ours = obj.loss(batch, float(len(idx)))
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    # Written independently: full forward, log-softmax everywhere, mask by labels; reference = adapter disabled.
    def seq_logp(m, ids, mask, labels):
        logp = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        tgt = labels[:, 1:]
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (tgt != -100)).sum(-1)

    def side(k):
        rows = [obj.train[i][k] for i in idx]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.tensor([r.input_ids + [0] * (width - len(r.input_ids)) for r in rows])
        mask = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in rows])
        labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in rows])
        return ids, mask, labels

    c, r = side(0), side(1)
    with torch.no_grad(), model.disable_adapter():
        ref_c, ref_r = seq_logp(model, *c), seq_logp(model, *r)
    beta = obj.cfg.beta
    pol_c = seq_logp(model, *c)
    ref_loss = -F.logsigmoid(beta * ((pol_c - ref_c) - (seq_logp(model, *r) - ref_r)))
    ref_loss = (ref_loss + rpo_alpha * -pol_c / (c[2][:, 1:] != -100).sum(-1)).mean()  # RPO: + chosen NLL/token
    ref_loss.backward()
    assert abs(ours.item() - ref_loss.item()) < 1e-5 and ours.item() > 0.01
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(g_ours[n], p.grad, atol=1e-5), n


def test_reference_is_cached_per_row_from_the_starting_model(tiny_model, tmp_path, pair_files):
    import torch

    obj, model = _objective(tiny_model, tmp_path, pair_files)
    ref = obj.ref["train"]
    assert ref.shape == (len(obj.train), 2) and torch.isnan(ref).all()  # nothing computed before it is needed
    obj.loss(obj.collate([2, 5], "padded", obj.tokenizer.pad_token_id), 2.0)
    assert torch.isnan(ref).sum() == 2 * (len(obj.train) - 2) and torch.all(ref[[2, 5]] < 0)
    with torch.no_grad(), model.disable_adapter():  # B was zero at bind time: the base is the reference
        logps = obj.sequence_logps(obj.collate([2], "padded", obj.tokenizer.pad_token_id))
    assert torch.allclose(logps.double(), ref[2], atol=1e-5)
    kept = ref[2].clone()
    obj.loss(obj.collate([2], "padded", obj.tokenizer.pad_token_id), 1.0)
    assert torch.equal(ref[2], kept)  # computed once per row


def test_reference_after_sft_is_the_starting_adapter_swapped_in(tiny_model, tmp_path, pair_files):
    """init_adapter: the reference is base + the adapter as loaded, computed lazily by swapping its starting
    weights in; the live (trained) weights are back afterwards."""
    import torch

    obj, model = _objective(tiny_model, tmp_path, pair_files, beta=None, init_adapter="sft")
    batch = obj.collate([3], "padded", obj.tokenizer.pad_token_id)
    assert torch.isnan(obj.ref["train"]).all()  # nothing computed up front
    with torch.no_grad():
        at_start = obj.sequence_logps(batch)
    trained = {}
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.add_(0.3)  # the policy moves during training
            trained[n] = p.detach().clone()
    obj.loss(batch, 1.0)
    assert torch.allclose(obj.ref["train"][3], at_start.double(), atol=1e-6)
    with torch.no_grad(), model.disable_adapter():
        base = obj.sequence_logps(batch)
    assert not torch.allclose(base.double(), at_start.double(), atol=1e-3)  # it is not the base
    for n, p in model.named_parameters():
        if n in trained:
            assert torch.equal(p, trained[n]), n  # the live weights are back


def _errors(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    report = Report()
    read_pairs(path, report)
    return [e.replace(str(path), "F") for e in report.errors], report


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "chosen": "a"}, "F:1: rejected: missing"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "F:1: chosen: empty"),
    ({"chosen": "a", "rejected": "b"}, "F:1: prompt: missing (expected prompt, chosen and rejected; got ['chosen', "
                                       "'rejected'])"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "F:1: chosen and rejected are identical: the pair "
                                                            "teaches nothing; fix or drop the row"),
    ({"prompt": "q\u0000", "chosen": "a", "rejected": "b"}, "F:1: prompt: NUL character (\\u0000) at character 2"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "F:1: chosen and rejected have different prompts (the messages before the last assistant turn differ)"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "F:1: chosen: expected one assistant message (the answer), got roles ['user']"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "F:1: prompt: the last turn must be 'user'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "F:1: chosen: expected a string or an assistant message, got int"),
])
def test_bad_preference_rows_are_named_with_file_and_line(tmp_path, row, message):
    errors, _ = _errors(tmp_path, [row])
    assert any(e.startswith(message) for e in errors), errors


def test_preference_formats_and_dataset_warnings(tmp_path):
    conv = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    plain = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "ok.jsonl", [conv, implicit, plain, plain])
    report = Report()
    pairs = read_pairs(path, report)
    assert not report.errors
    assert [p.prompt for p in pairs[:2]] == [(("system", "s"), ("user", "q")), (("user", "q"),)]
    assert (pairs[1].chosen, pairs[1].rejected) == ("a", "b")
    from hwcompat.data.rows import check_rows

    check_rows(pairs, [], report, "duplicate pairs in train")
    # the implicit-prompt row and the plain rows are the same pair, whatever the format
    assert report.warnings["duplicate pairs in train"] == [f"{path}:3 repeats line 2", f"{path}:4 repeats line 2"]


def test_pair_truncated_away_is_an_error(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from hwcompat.train.config import TrainConfig
    from hwcompat.train.objectives.dpo import DPO

    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "What color is the sky? " * 30, "chosen": "blue",
                                                  "rejected": "red"}, *pair_rows(4, 3)])
    cfg = TrainConfig(model=str(tiny_model), train_data=[str(path)], method="dpo", max_seq_len=16, eval_fraction=0.2,
                      chat_template="false")
    obj = DPO(cfg, SimpleNamespace(dtype="float32"), None)
    with pytest.raises(Exception) as e:
        obj.load(AutoTokenizer.from_pretrained(tiny_model), print)
    assert f"{path}:1: chosen and rejected: no answer tokens left after truncation to max_seq_len=16" in str(e.value)


@pytest.mark.slow
def test_dpo_run_end_to_end_on_cpu(tmp_path, tiny_model, pair_files):
    cfg = make_config(tmp_path, tiny_model, *pair_files, method="dpo", beta=0.5, max_steps=40, learning_rate=0.003,
                      micro_batch_size=8)
    res = cli.run("train", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["objective"] == "dpo"
    before, after = s["eval_before"], s["eval_after"]
    assert abs(before["reward_margin"]) < 1e-6 and before["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2
    assert after["reward_accuracy"] >= 0.75 and after["eval_loss"] < 0.6 * before["eval_loss"]
    assert "reward_accuracy" in res.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "run" / "adapter"))


def test_regressions_are_measured_in_points():
    from hwcompat.data.metrics import regressions

    got = regressions({"exact_match": 0.9, "field_f1": 0.8, "eval_loss": 0.1},
                      {"exact_match": 0.5, "field_f1": 0.79, "eval_loss": 0.9}, 2.0)
    assert got == [{"metric": "exact_match", "before": 0.9, "after": 0.5, "drop_points": 40.0}]
    # precision and recall trade inside F1: reported, not guarded; F1 and JSON validity are
    traded = regressions({"field_recall": 0.92, "field_precision": 0.72, "field_f1": 0.81, "json_valid": 1.0},
                         {"field_recall": 0.82, "field_precision": 0.89, "field_f1": 0.86, "json_valid": 0.9}, 2.0)
    assert [g["metric"] for g in traded] == ["json_valid"]


@pytest.mark.slow
def test_harmful_dpo_after_sft_is_flagged_and_not_exported(tmp_path, tiny_model, task_files):
    """SFT learns the colours; a DPO stage whose training pairs prefer the wrong colour is caught by the guard."""
    def train(cfg, *args):
        return cli.run("train", cfg, *args, timeout=400)

    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    res = train(make_config(sft_dir, tiny_model, *task_files, max_steps=100, learning_rate=0.005))
    assert res.returncode == 0, res.stderr[-2000:]
    sft = json.loads((sft_dir / "run" / "summary.json").read_text())["eval_after"]
    assert sft["accuracy"] > 0.5
    harmful = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in pair_rows(96, 1)]
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    train_pairs = write_jsonl(dpo_dir / "harmful.jsonl", harmful)
    eval_pairs = write_jsonl(dpo_dir / "eval.jsonl", pair_rows(24, 2))  # held out: the true task
    cfg = make_config(dpo_dir, tiny_model, train_pairs, eval_pairs, method="dpo", beta=0.5, max_steps=40,
                      learning_rate=0.003, init_adapter=str(sft_dir / "run" / "adapter"),
                      export="gguf")
    res = train(cfg)
    s = json.loads((dpo_dir / "run" / "summary.json").read_text())
    assert s["eval_before"]["accuracy"] == pytest.approx(sft["accuracy"], abs=0.3)  # before = the SFT model
    assert s["regressed"] and "accuracy" in [x["metric"] for x in s["regressed"]], s["eval_after"]
    assert res.returncode == 1 and "!!! REGRESSION" in res.stderr and "export refused" in res.stderr
    assert not (dpo_dir / "run" / "model.gguf").exists() and (dpo_dir / "run" / "adapter").exists()


def test_init_adapter_of_another_shape_is_refused(tmp_path, tiny_model, pair_files):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    cfg = make_config(tmp_path, tiny_model, *pair_files, method="dpo", init_adapter=str(adapter))
    res = cli.run("train", cfg, timeout=120)
    assert res.returncode == 2 and f"init_adapter {adapter} was trained with lora_r=8, lora_alpha=16" in res.stderr


def test_data_check_reads_preference_pairs(tmp_path, tiny_model, capsys):
    from hwcompat.cli import main

    good = write_jsonl(tmp_path / "good.jsonl", pair_rows(8, 4))
    assert main(["data", "check", str(good), "--method", "dpo", "--tokenizer", str(tiny_model)]) == 0
    assert "ok: no errors" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"},
                                               {"prompt": "What color is the sky? " * 30, "chosen": "blue",
                                                "rejected": "red"}])
    assert main(["data", "check", str(bad), "--method", "dpo"]) == 1
    assert f"{bad}:1: chosen and rejected are identical" in capsys.readouterr().err
    long_only = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "What color is the sky? " * 30, "chosen": "blue",
                                                       "rejected": "red"}])
    assert main(["data", "check", str(long_only), "--method", "dpo", "--tokenizer", str(tiny_model),
                 "--max-seq-len", "16", "--chat-template", "false"]) == 1
    assert f"{long_only}:1: chosen and rejected: no answer tokens left" in capsys.readouterr().err


@pytest.mark.parametrize("attention", ["sdpa", "eager", "cpu_bf16"])
def test_shared_prefix_rows_equal_two_padded_rows(tiny_model, tmp_path, attention):
    """One row per pair (prompt once, 4-D mask, restarted positions) gives every answer token the log-probability and
    gradient it gets in its own padded row; answers sharing their start, one answer a token prefix of the other,
    and pairs of different lengths (padding) included."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hwcompat.train.config import TrainConfig
    from hwcompat.train.objectives.dpo import DPO

    rows = [{"prompt": "What color is the sky?", "chosen": "blue", "rejected": "green"},
            {"prompt": "What color is the sun? Say it in a few words", "chosen": "yellow yellow red",
             "rejected": "yellow yellow blue"},
            {"prompt": "What color?", "chosen": "red", "rejected": "red red red"}]
    files = write_jsonl(tmp_path / "p.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", rows[:1])
    cfg = TrainConfig(model=str(tiny_model), train_data=[str(files[0])], eval_data=[str(files[1])], method="dpo",
                      max_seq_len=64, micro_batch_size=4, chat_template="false", rpo_alpha=0.5)
    obj = DPO(cfg, SimpleNamespace(dtype="float32", name="cpu"), torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.pad_token or tok.eos_token
    obj.load(tok, print)
    torch.manual_seed(0)
    from hwcompat.train.cpu_attention import implementation

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=implementation(
        attention), trust_remote_code=False),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    obj.bind(model, "eager")
    assert obj.shared and obj.additive == (attention != "sdpa")
    idx = [0, 1, 2]
    shared = obj.collate(idx, "padded", tok.pad_token_id)
    assert shared["input_ids"].shape[0] == 3 and shared["n_tokens"] == sum(
        len(c.input_ids) + len(r.input_ids) for c, r in obj.train)
    assert shared["input_ids"].numel() < sum(2 * max(len(c.input_ids), len(r.input_ids)) for c, r in obj.train)
    obj.shared = False
    two_rows = obj.collate(idx, "padded", tok.pad_token_id)
    assert two_rows["input_ids"].shape[0] == 6 and torch.equal(two_rows["chosen_tokens"], shared["chosen_tokens"])
    results = []
    for batch in (shared, two_rows):
        model.zero_grad()
        logps = obj.sequence_logps(batch)
        loss = obj.loss(batch, 3.0)
        loss.backward()
        results.append((logps.detach(), loss.item(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (a, la, ga), (b, lb, gb) = results
    assert torch.allclose(a, b, atol=1e-5) and abs(la - lb) < 1e-6
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5), n


def test_shared_prefix_is_refused_where_the_mask_would_not_reach_attention():
    from types import SimpleNamespace as C

    from hwcompat.train.prefix import supported

    assert supported(C(), "sdpa", 512) and supported(C(), "eager", 512)
    assert not supported(C(), "flash_attention_2", 512)  # varlen kernels take no arbitrary mask
    assert not supported(C(final_logit_softcapping=30.0), "eager", 512)
    assert not supported(C(sliding_window=256), "sdpa", 512)  # the window would be lost
    assert supported(C(sliding_window=256, use_sliding_window=False), "sdpa", 512)
    assert supported(C(sliding_window=4096), "sdpa", 512)
