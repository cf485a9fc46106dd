"""Preference pairs packed around their shared prefix: one row per pair, the prompt computed once.

Chosen and rejected answers of a pair share their prompt token for token. The usual concatenated forward (TRL's)
pads both sides into two rows, so most of a DPO step runs the same prompt twice. Here a pair is one row,

    [shared prefix][rest of chosen][rest of rejected]

with position ids restarting the rejected rest where the prefix ends, and a 4-D attention mask that lets each rest
see the prefix and itself only. Every answer token then gets exactly the logits it gets in its own row (prefix
sharing, Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"). The prefix is the
longest common token prefix with equal labels: the prompt and often the answers' common start (``{"people": [``);
answer tokens inside it are counted for both sides, as they would be in two rows.

torch's SDPA, eager attention and hwcompat's CPU kernel (cpu_bf16) take such a mask; flash-attention-2 does not
(the objective falls back to two padded rows there), and a sliding window would be lost, so models with one shorter
than the row fall back too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hwcompat.train.batching import IGNORE, Tokenized

PAD_SEGMENT, PREFIX, CHOSEN, REJECTED = -1, 0, 1, 2
#: The attentions that take a 4-D mask unchanged, and those of them that add it to the scores (a float mask).
TAKES_4D_MASK = ("sdpa", "eager", "cpu_bf16")
ADDITIVE = ("eager", "cpu_bf16")


@dataclass(frozen=True)
class PackedPair:
    """One pair as one row; ``chosen``/``rejected``: (predicting position, target token) per answer token."""

    ids: list[int]
    positions: list[int]
    segments: list[int]
    chosen: list[tuple[int, int]]
    rejected: list[tuple[int, int]]


def shared_length(c: Tokenized, r: Tokenized) -> int:
    """Tokens (and their labels) both sides have in common from the start."""
    k, n = 0, min(len(c.input_ids), len(r.input_ids))
    while k < n and c.input_ids[k] == r.input_ids[k] and c.labels[k] == r.labels[k]:
        k += 1
    return k


def pack_pair(c: Tokenized, r: Tokenized) -> PackedPair:
    k, nc, nr = shared_length(c, r), len(c.input_ids), len(r.input_ids)
    ids = c.input_ids + r.input_ids[k:]
    positions = list(range(nc)) + list(range(k, nr))
    segments = [PREFIX] * k + [CHOSEN] * (nc - k) + [REJECTED] * (nr - k)
    chosen = [(t - 1, c.labels[t]) for t in range(1, nc) if c.labels[t] != IGNORE]
    # the rejected rest starts at nc in the row; its first token is predicted from the prefix's last position
    rejected = [(t - 1 if t - 1 < k else nc + t - 1 - k, r.labels[t]) for t in range(1, nr) if r.labels[t] != IGNORE]
    return PackedPair(ids, positions, segments, chosen, rejected)


def collate(pairs: list[tuple[Tokenized, Tokenized]], pad_id: int) -> dict[str, Any]:
    """One padded row per pair; ``src``/``target``/``row`` list every answer token (chosen rows 0..n-1, then
    rejected n..2n-1)."""
    import torch

    packed = [pack_pair(c, r) for c, r in pairs]
    n, width = len(packed), max(len(p.ids) for p in packed)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), PAD_SEGMENT, dtype=torch.long)
    src, target, row = [], [], []
    for i, p in enumerate(packed):
        ids[i, :len(p.ids)] = torch.tensor(p.ids)
        positions[i, :len(p.ids)] = torch.tensor(p.positions)
        segments[i, :len(p.ids)] = torch.tensor(p.segments)
        for side, tokens in ((i, p.chosen), (n + i, p.rejected)):
            src += [i * width + s for s, _ in tokens]
            target += [t for _, t in tokens]
            row += [side] * len(tokens)
    return {"input_ids": ids, "position_ids": positions, "segments": segments, "src": torch.tensor(src),
            "target": torch.tensor(target), "row": torch.tensor(row),
            "chosen_tokens": torch.tensor([len(p.chosen) for p in packed]),
            "n_tokens": sum(len(c.input_ids) + len(r.input_ids) for c, r in pairs)}


def attention_mask(segments, dtype, additive: bool):
    """(rows, 1, L, L): causal, within the prefix or the query's own answer; padding sees only itself.

    Padding rows must see something: a row with every key masked is NaN under SDPA, and a NaN there reaches the
    weights' gradients (0 x NaN) although no loss reads it. ``additive``: the attention adds the mask (``ADDITIVE``).
    """
    import torch

    length = segments.shape[1]
    q, k = segments.unsqueeze(2), segments.unsqueeze(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (k != PAD_SEGMENT) & ((k == PREFIX) | (k == q))
    eye = torch.eye(length, dtype=torch.bool, device=segments.device)
    allowed = (allowed | (eye & (q == PAD_SEGMENT))).unsqueeze(1)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def supported(model_config, attention: str, longest_row: int) -> bool:
    """Whether a 4-D mask reaches attention unchanged for this model (see the module docstring)."""
    if attention not in TAKES_4D_MASK or getattr(model_config, "final_logit_softcapping", None):
        return False
    window = getattr(model_config, "sliding_window", None)
    if window and getattr(model_config, "use_sliding_window", True) and window < longest_row:
        return False
    return True
