"""The chunked loss (linear_logps) against the one-pass logits it replaces: values, every gradient, the plan's term.

Tiny models with a large vocabulary head (8,192 tokens, hidden 32) and chunks forced small (5 rows), so every
batch spans several chunks and a ragged last one. fp32 to 1e-5; bf16 autocast to bf16 precision.
"""

import random
import weakref

import pytest

from hwcompat.choices import DTYPE_BYTES
from hwcompat import plan
from hwcompat.train import batching
from hwcompat.train.objectives import linear_logps

VOCAB, HIDDEN = 8192, 32


def _one_pass(head, hidden, targets, scale=None, cap=None):
    """What the loss computed before: every row's logits at once, log-softmax, gather."""
    import torch

    z = head(hidden).float()
    if scale:
        z = z * scale
    if cap:
        z = torch.tanh(z / cap) * cap
    return z.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(linear_logps, "logit_chunk_rows", lambda vocab: 5)


@pytest.mark.parametrize("scale,cap", [(None, None), (0.25, None), (None, 3.0)])
@pytest.mark.parametrize("trained_head", [False, True])
def test_log_probs_and_gradients_equal_one_pass(small_chunks, scale, cap, trained_head):
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=trained_head)
    head.requires_grad_(trained_head)
    hidden = torch.randn(23, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    upstream = torch.randn(23)  # per-token weights, as DPO's per-row sums and sigmoid give them

    ours = linear_logps.target_logps(head, hidden, targets, scale, cap)
    (ours * upstream).sum().backward()
    g_ours = [hidden.grad.clone()] + ([p.grad.clone() for p in head.parameters()] if trained_head else [])
    hidden.grad = None
    head.zero_grad()
    ref = _one_pass(head, hidden, targets, scale, cap)
    (ref * upstream).sum().backward()
    g_ref = [hidden.grad] + ([p.grad for p in head.parameters()] if trained_head else [])

    assert linear_logps.frozen_linear(head) is not trained_head
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_grad_and_empty_inputs():
    import torch

    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    with torch.no_grad():
        h, y = torch.randn(4, HIDDEN), torch.randint(0, VOCAB, (4,))
        torch.testing.assert_close(linear_logps.target_logps(head, h, y), _one_pass(head, h, y))
    empty = linear_logps.target_logps(head, torch.zeros(0, HIDDEN, requires_grad=True), torch.zeros(0).long())
    assert empty.shape == (0,) and empty.sum().item() == 0


def _tiny(model_type="llama", **extra):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                               tie_word_embeddings=False, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # non-zero B: every LoRA weight gets a gradient
    return model


def _rows(n=4, seed=0):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        prompt, answer = rng.randint(3, 9), rng.randint(4, 11)
        ids = [rng.randrange(VOCAB) for _ in range(prompt + answer)]
        items.append(batching.Tokenized(ids, [batching.IGNORE] * prompt + ids[prompt:], f"t:{i}"))
    return items


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["padded", "packed"])
@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("gemma2", {"final_logit_softcapping": 5.0}),
                                              ("cohere", {"logit_scale": 0.5})])
def test_sft_loss_and_every_lora_gradient_equal_the_models_own_logits(small_chunks, mode, model_type, extra):
    """ResponseLoss (decoder + chunked head, the model's soft-cap or scale applied) vs the model's full forward."""
    import torch
    import torch.nn.functional as F

    from hwcompat.train.objectives.sft import ResponseLoss

    model = _tiny(model_type, **extra)
    batch = batching.collate(_rows(), mode, 0)
    n_items = float(batch["n_target"])
    loss_fn = ResponseLoss(model)
    assert loss_fn.fast and (loss_fn.split.cap, loss_fn.split.scale) == (extra.get("final_logit_softcapping"),
                                                                         extra.get("logit_scale"))
    ours = loss_fn(batch, n_items)
    ours.backward()
    g_ours = _grads(model)
    model.zero_grad()

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # HF applies the soft-cap / scale itself
    targets = batch["labels"][:, 1:]
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100,
                          reduction="sum") / n_items
    ref.backward()
    g_ref = _grads(model)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) == 2 * 7 * 2
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_autocast_matches_one_pass_to_bf16_precision(small_chunks, monkeypatch):
    import torch

    model = _tiny()
    batch = batching.collate(_rows(), "padded", 0)
    from hwcompat.train.objectives.sft import ResponseLoss

    results = []
    for chunked in (True, False):
        if not chunked:
            monkeypatch.setattr(linear_logps, "logit_chunk_rows", lambda vocab: 10**9)  # one chunk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ResponseLoss(model)(batch, float(batch["n_target"]))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
        model.zero_grad()
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    for name in ga:
        assert torch.isfinite(ga[name]).all()
        torch.testing.assert_close(ga[name], gb[name], rtol=5e-2, atol=5e-3, msg=name)


def test_fp16_under_the_grad_scaler_matches_one_pass(small_chunks, monkeypatch):
    """Volta, Pascal P100, RDNA2: fp16 autocast with loss scaling; the unscaled gradients agree with one pass."""
    import torch

    from hwcompat.train.objectives.sft import ResponseLoss

    model = _tiny()
    batch = batching.collate(_rows(), "padded", 0)
    results = []
    for chunked in (True, False):
        if not chunked:
            monkeypatch.setattr(linear_logps, "logit_chunk_rows", lambda vocab: 10**9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ResponseLoss(model)(batch, float(batch["n_target"]))
        scaler.scale(loss).backward()
        grads = {n: p.grad / scaler.get_scale() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach().float(), grads))
        model.zero_grad()
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    for name in ga:
        assert torch.isfinite(ga[name]).all()
        torch.testing.assert_close(ga[name], gb[name], rtol=5e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("shared", [False, True])
def test_dpo_losses_and_gradients_equal_one_pass(small_chunks, monkeypatch, tiny_model, tmp_path, shared):
    """DPO's per-row sums of per-token log-probabilities, padded rows and prefix-shared rows."""
    import torch

    from hwcompat.train.objectives import dpo
    from tests.train.conftest import dpo_objective as _objective, pair_rows
    from tests.train.conftest import write_jsonl

    files = write_jsonl(tmp_path / "p.jsonl", pair_rows(32, 1)), write_jsonl(tmp_path / "e.jsonl", pair_rows(8, 2))
    obj, model = _objective(tiny_model, tmp_path, files)
    obj.shared = shared
    idx = [0, 3, 5, 7]
    results = []
    for impl in (dpo.target_logps, _one_pass):
        monkeypatch.setattr(dpo, "target_logps", impl)
        batch = obj.collate(idx, "padded", obj.tokenizer.pad_token_id)
        loss = obj.loss(batch, float(len(idx)))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
        model.zero_grad()
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)


class _VocabPeak:
    """Peak bytes of live vocabulary-wide tensors (contiguous, last dim = vocab) the ops inside produce."""

    def __init__(self, vocab: int, known):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.vocab, self.live, self.peak = vocab, 0, 0
        self.seen = {t.untyped_storage().data_ptr() for t in known}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.record(out)
                return out

        self.mode = Mode()

    def record(self, out):
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab and t.is_contiguous()):
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.seen:
                continue
            size = t.untyped_storage().nbytes()
            self.seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, size)

    def _free(self, key, size):
        self.live -= size
        self.seen.discard(key)


@pytest.mark.parametrize("dtype,model_type,extra", [
    ("float32", "llama", {}), ("bfloat16", "llama", {}),
    ("float32", "gemma2", {"final_logit_softcapping": 5.0}), ("bfloat16", "gemma2", {"final_logit_softcapping": 5.0}),
])
def test_the_plans_logits_term_is_what_the_loss_holds_at_its_peak(monkeypatch, tmp_path, dtype, model_type, extra):
    """Forward + backward of the SFT loss, every vocabulary-wide tensor counted while live; chunks of 16 rows."""
    import contextlib

    import torch

    from hwcompat.train.objectives.sft import ResponseLoss

    monkeypatch.setattr(plan.shape, "LOGIT_CHUNK_BYTES", 16 * 4 * VOCAB)  # where logit_chunk_rows reads it
    model = _tiny(model_type, **extra)
    model.base_model.model.config.save_pretrained(tmp_path)
    shape = plan.load_shape(str(tmp_path))
    batch = batching.collate(_rows(6, seed=3), "padded", 0)
    rows = batch["n_target"]  # response rows the loss projects
    assert rows > 16
    tracker = _VocabPeak(VOCAB, list(model.parameters()))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    with cast:
        hidden_loss = ResponseLoss(model)
        with tracker.mode:
            loss = hidden_loss(batch, float(rows))
            loss.backward()
    expected = plan.logit_chunk_bytes(shape, rows, DTYPE_BYTES[dtype])
    assert tracker.peak == expected == 16 * VOCAB * (4 + (2 if dtype == "bfloat16" else 0) + 4 * bool(extra))
    few = plan.logit_chunk_bytes(shape, 3, 4)
    assert few == 3 * VOCAB * (4 + 4 * bool(extra))  # fewer response rows than a chunk: only those


def test_the_chunk_rule_keeps_a_floor_and_the_byte_budget():
    assert plan.logit_chunk_rows(151936) == plan.LOGIT_CHUNK_BYTES // (4 * 151936) == 220
    assert plan.logit_chunk_rows(10**9) == 16
