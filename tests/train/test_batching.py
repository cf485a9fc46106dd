"""Loss masking token by token, packing, length grouping, truncation policy."""

import pytest

from hwcompat.train import batching
from hwcompat.train.batching import IGNORE
from hwcompat.data.problems import Report
from hwcompat.data.turns import Example


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module")
def plain_tok(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


EX = Example((("system", "Be brief."), ("user", "What color is the sky?"), ("assistant", "blue"),
              ("user", "And the lemon?"), ("assistant", "yellow")), "f.jsonl", 7)


def test_chat_masking_token_by_token(chat_tok):
    t = batching.tokenize_example(chat_tok, EX, chat=True)
    full = chat_tok.apply_chat_template([{"role": r, "content": c} for r, c in EX.messages], tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert t.input_ids == list(full)
    trained = chat_tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE])
    # exactly the two assistant contents with their end-of-turn tokens, and nothing of the prompts
    assert trained.replace(" ", "") == "blue<|im_end|>\nyellow<|im_end|>\n".replace(" ", "")
    for i, lab in zip(t.input_ids, t.labels):
        assert lab in (IGNORE, i)  # a label is the token itself or masked
    prompt_part = chat_tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab == IGNORE])
    assert "What color is the sky?" in prompt_part and "<|im_start|>assistant" in prompt_part
    assert "blue" not in prompt_part and "yellow" not in prompt_part


def test_plain_masking_token_by_token(plain_tok):
    ex = Example((("user", "What color is the apple?"), ("assistant", "red")), "f", 1)
    t = batching.tokenize_example(plain_tok, ex, chat=False)
    pairs = [(plain_tok.decode([i]), lab != IGNORE) for i, lab in zip(t.input_ids, t.labels)]
    trained = [tok for tok, on in pairs if on]
    assert "".join(trained) == "red" + plain_tok.eos_token
    assert all(not on for tok, on in pairs[:pairs.index(next(p for p in pairs if p[1]))])


def test_generation_prompt_is_the_masked_prefix(chat_tok):
    t = batching.tokenize_example(chat_tok, EX, chat=True)
    prompt = batching.render_prompt_ids(chat_tok, EX.messages, chat=True)
    assert t.input_ids[:len(prompt)] == prompt
    assert t.labels[len(prompt) - 1] == IGNORE and t.labels[len(prompt)] != IGNORE


def test_truncation_leaving_no_response_is_an_error(plain_tok):
    long = Example((("user", "What color is the apple? " * 20), ("assistant", "red")), "f.jsonl", 3)
    report = Report()
    out = batching.tokenize_all(plain_tok, [long], False, 16, "truncate", report, "train")
    assert out == []
    assert report.errors == ["f.jsonl:3: response: no trainable tokens after truncation to max_seq_len=16 "
                             "(the prompt fills the whole window); raise max_seq_len or shorten the prompt"]
    assert "train rows over max_seq_len=16, truncated" in report.warnings


def test_overlong_drop_is_reported(plain_tok):
    long = Example((("user", "What color is the apple? " * 20), ("assistant", "red")), "f.jsonl", 3)
    report = Report()
    assert batching.tokenize_all(plain_tok, [long], False, 16, "drop", report, "train") == []
    assert not report.errors and report.warnings["train rows over max_seq_len=16, dropped"][0].startswith("f.jsonl:3")


def _tok(n, start=10):
    return batching.Tokenized(list(range(start, start + n)), [IGNORE] * (n // 2) + list(range(start + n // 2, start + n)),
                              "x")


def test_packed_collate_keeps_examples_apart():
    items = [_tok(4), _tok(6, 50)]
    b = batching.collate(items, "packed", pad_id=0)
    assert b["input_ids"].shape == (1, 10)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert b["labels"][0, 4].item() == IGNORE  # never predict example 2's first token from example 1
    assert "attention_mask" not in b and b["n_tokens"] == 10


def test_packed_forward_equals_separate_forwards(tiny_model):
    """The packed row's logits equal each example run alone: no cross-attention."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    a, b = _tok(7, 20), _tok(5, 60)
    with torch.no_grad():
        packed = m(**{k: v for k, v in batching.collate([a, b], "packed", 0).items()
                      if k in ("input_ids", "position_ids")}, use_cache=False).logits
        la = m(torch.tensor([a.input_ids]), use_cache=False).logits
        lb = m(torch.tensor([b.input_ids]), use_cache=False).logits
    assert torch.allclose(packed[:, :7], la, atol=1e-5) and torch.allclose(packed[:, 7:], lb, atol=1e-5)


def test_padded_collate():
    b = batching.collate([_tok(4), _tok(2)], "padded", pad_id=0)
    assert b["input_ids"].shape == (2, 4)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"][1, 2:].tolist() == [IGNORE, IGNORE]


def test_length_grouping_cuts_padding_and_is_deterministic():
    import random
    rng = random.Random(0)
    lengths = [rng.randint(30, 400) for _ in range(512)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = batching.plan_batches(lengths, 8, "length_grouped", seed=1)
    plain = batching.plan_batches(lengths, 8, "padded", seed=1)
    assert sorted(i for b in grouped for i in b) == list(range(512))
    assert padding(grouped) < padding(plain) / 5
    assert grouped == batching.plan_batches(lengths, 8, "length_grouped", seed=1)
    assert grouped != batching.plan_batches(lengths, 8, "length_grouped", seed=2)


def test_auto_batching():
    assert batching.resolve_batching("auto", "flash_attention_2") == "packed"
    assert batching.resolve_batching("auto", "sdpa") == "length_grouped"
    assert batching.resolve_batching("padded", "sdpa") == "padded"


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_response_loss_equals_the_standard_loss(tiny_model, mode):
    """Logits only at response positions: same loss and gradients as the full-vocabulary forward."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hwcompat.train.objectives.sft import ResponseLoss

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    b = batching.collate([_tok(9, 20), _tok(5, 60), _tok(7, 30)], mode, pad_id=0)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in b}
    fast = ResponseLoss(model)
    assert fast.fast
    ours = fast(inputs, float(b["n_target"]))
    ours.backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = model(**inputs, use_cache=False).loss  # mean over the same response tokens
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(g1[n], p.grad, atol=1e-6), n


@pytest.mark.parametrize("mode", ["padded", "length_grouped", "packed"])
def test_the_plan_is_the_seeds_shuffle_and_a_resume_recomputes_it(mode):
    """Every item once, the same plan for the same seed (a resume), another for another seed. The order is not
    moved by cost (the costliest micro-batch is probed before the first step instead: test_memory_probe.py)."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(101)]
    plan = batching.plan_batches(lengths, 4, mode, seed=3)
    assert sorted(i for b in plan for i in b) == list(range(101))
    assert plan == batching.plan_batches(lengths, 4, mode, seed=3)
    assert plan != batching.plan_batches(lengths, 4, mode, seed=4)
