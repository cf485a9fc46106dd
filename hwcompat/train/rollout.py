"""GRPO's rollouts with the model being trained: no vLLM, each prompt prefilled once, its KV cache expanded G ways.

TRL without vLLM calls ``model.generate()`` on G copies of each prompt, so every prompt is prefilled G times; vLLM
avoids it but needs compute capability 7.5 (no V100, Pascal or Maxwell) and lists no RX 6600. Here a micro-batch's
P prompts (left-padded) are prefilled once, the cache is repeated G ways (``DynamicCache.batch_repeat_interleave``)
and the P x G rows decode together; a row that ends (an end-of-sequence token) leaves the batch
(``batch_select_indices``), so late steps cost only the rows still running. Only the last position's logits are
ever computed (``logits_to_keep=1``): ``[rows x vocab]`` at a time, never ``[rows x completion x vocab]``.

Sampling inverts each row's cumulative distribution at one uniform number (temperature and top-p applied first).
The uniforms of token t are drawn for all P x G rows from one generator seeded by the run's seed and the
micro-batch's position, whichever rows are still running, so a row's tokens do not depend on the others (a
KV-expanded rollout equals G separate ones with the same uniforms, tested) and a resumed run samples exactly what
the uninterrupted one did: no sampling state needs saving beyond the step. (One number per row per token: an
exponential race over the vocabulary drew 49,152 per row, 12 % of a CPU rollout.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class Rollout:
    """P prompts x G completions; completion ``j`` belongs to prompt ``j // G``."""

    completions: list[list[int]]  # the sampled tokens, the end-of-sequence token included where one came
    ended: list[bool]  # False: cut at max_completion_length (truncated)


def seed_for(seed: int, position: int, rank: int = 0) -> int:
    """The sampling seed of one micro-batch: the run's seed, the micro-batch's place in the run, the process."""
    return (seed * 1_000_003 + position * 7919 + rank * 104_729) % (2**63 - 1)


def pick(logits, uniform, temperature: float, top_p: float):
    """One token per row from ``[rows x vocab]`` logits and one U(0, 1) number per row: the inverse of the
    row's cumulative distribution (temperature and top-p applied first), in the uniforms' dtype (float64 on the
    CPU; float32 on a card, where float64 is slow or, on Arc A-series, emulated)."""
    import torch

    probs = torch.softmax(logits.to(uniform.dtype) / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        outside = ordered.cumsum(-1) - ordered > top_p  # keep the smallest head whose mass reaches top_p
        probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    # strictly below the total, and the right side: the first cdf above u is a token with mass (one of
    # probability 0 has its left neighbour's cdf), so a zero-probability token is never drawn
    u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)


def _left_padded(prompts: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def generate(model, prompts: list[list[int]], num_generations: int, max_new_tokens: int, temperature: float,
             top_p: float, eos_ids: set[int], pad_id: int, seed: int) -> Rollout:
    """Sample ``num_generations`` completions of each prompt (call under ``torch.no_grad`` and the profile's
    autocast, the model in eval mode)."""
    import torch

    device = next(model.parameters()).device
    kw = _cache_keyword(model)
    ids, mask = _left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = _cache(out), out.logits[:, -1]
    rows = len(prompts) * num_generations
    if num_generations > 1:
        cache.batch_repeat_interleave(num_generations)
        logits = logits.repeat_interleave(num_generations, dim=0)
        mask = mask.repeat_interleave(num_generations, dim=0)
        positions = positions.repeat_interleave(num_generations, dim=0)
    position = positions[:, -1]
    generator = torch.Generator(device=device).manual_seed(seed)
    precision = torch.float64 if device.type == "cpu" else torch.float32
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows
    for t in range(max_new_tokens):
        uniform = torch.rand(rows, device=device, dtype=precision, generator=generator)
        nxt = pick(logits, uniform[active], temperature, top_p)
        done = torch.isin(nxt, eos)
        for row, tok, d in zip(active.tolist(), nxt.tolist(), done.tolist()):
            tokens[row].append(tok)
            ended[row] = d
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # finished rows leave the batch: the rest decode without them
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, nxt, mask, position = active[keep], nxt[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        position = position + 1
        out = model(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=position.unsqueeze(-1),
                    use_cache=True, logits_to_keep=1, **{kw: cache})
        cache, logits = _cache(out), out.logits[:, -1]
    return Rollout(tokens, ended)


@contextlib.contextmanager
def merged(model):
    """The model as base + LoRA merged into one weight per adapted layer, for sampling: each merged weight is a
    new tensor swapped in by pointer and the original put back the same way, so the frozen base never drifts (an
    in-place merge / unmerge rounds a bf16 base a little every step). Layers whose base is not a plain Linear
    (a 4-bit QLoRA base) keep their adapter path."""
    import torch

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: nothing to merge
        yield model
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or any(type(m.get_base_layer()) is not torch.nn.Linear or getattr(m, "merged", False)
                         for m in layers):
        yield model  # all or nothing: disabling the adapter disables it in every layer
        return
    swapped = []
    for m in layers:
        active = [a for a in m.active_adapters if a in m.lora_A]
        base = m.get_base_layer()
        if active:
            delta = sum(m.get_delta_weight(a).float() for a in active)
            swapped.append((base, base.weight.data))
            base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
    try:
        if swapped and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield model
    finally:
        for base, data in swapped:
            base.weight.data = data


def _cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x; the old name warns, then goes in 5.40)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def eos_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the generation config's (chat models list their end-of-turn token) and the
    tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids
