"""A GRPO rollout as the loss's inputs: G padded rows per prompt, or one row per prompt holding its G completions
behind a 4-D mask (``prefix.py``) so the prompt is computed once; and the completion tokens' loss mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hwcompat.choices import LossType
from hwcompat.train import prefix

#: The longest prompt-sharing row (prompt + its G completions): its L x L mask and attention stay bounded.
SHARED_MAX = 4096


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # the conversation as the reward functions see it (the last user turn)
    reference: str | None  # the row's answer, None for a prompt-only row
    where: str  # file:line
    messages: tuple = ()


def padded_rows(prompts: list[Prompt], completions: list[list[int]], g: int, pad_id: int,
                longest: int) -> dict[str, Any]:
    """Rows ``[left-padded prompt | completion, right-padded]``: each prompt computed G times."""
    import torch

    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(completions), width + longest), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, comp in enumerate(completions):
        p = prompts[j // g].ids
        ids[j, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        ids[j, width:width + len(comp)] = torch.tensor(comp, dtype=torch.long)
        attn[j, width - len(p):width + len(comp)] = 1
    return {"input_ids": ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "prompt_width": width, "n_tokens": int(attn.sum())}


def shared_rows(prompts: list[Prompt], completions: list[list[int]], g: int, pad_id: int, loss_mask) -> dict[str, Any]:
    """Rows ``[prompt][completion 1]…[completion G]``: positions restart after the prompt for each completion
    and a 4-D mask lets each see the prompt and itself only (``prefix.py``, as DPO's pairs), so every completion
    token gets exactly the logits of its own padded row while the prompt is computed once, not G times."""
    import torch

    lengths = [len(p.ids) + sum(len(c) for c in completions[i * g:(i + 1) * g]) for i, p in enumerate(prompts)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, prefix.PAD_SEGMENT)
    src, target, dest = [], [], []
    longest = loss_mask.shape[1]
    for i, p in enumerate(prompts):
        n = len(p.ids)
        ids[i, :n], positions[i, :n], segments[i, :n] = torch.tensor(p.ids), torch.arange(n), prefix.PREFIX
        at = n
        for k in range(g):
            j = i * g + k
            comp = completions[j]
            ids[i, at:at + len(comp)] = torch.tensor(comp, dtype=torch.long)
            positions[i, at:at + len(comp)] = torch.arange(n, n + len(comp))
            segments[i, at:at + len(comp)] = k + 1
            for t in range(len(comp)):
                if loss_mask[j, t] > 0:  # token t is predicted by the prompt's last position, or its own previous
                    src.append(i * width + (n - 1 if t == 0 else at + t - 1))
                    target.append(comp[t])
                    dest.append(j * longest + t)
            at += len(comp)
    return {"input_ids": ids, "position_ids": positions, "segments": segments, "src": torch.tensor(src),
            "target": torch.tensor(target, dtype=torch.long), "dest": torch.tensor(dest),
            "n_tokens": sum(lengths)}


def loss_inputs(prompts: list[Prompt], completions: list[list[int]], ended: list[bool], g: int, pad_id: int, cfg: Any,
                share: bool) -> dict[str, Any]:
    """The rows (shared or padded) and the completion tokens' loss mask ``[completions x longest]`` (a truncated
    completion masked out with ``mask_truncated_completions``); ``n_target``: the completions, or dapo's tokens."""
    import torch

    longest = max(1, max(len(c) for c in completions))
    loss_mask = torch.zeros((len(completions), longest), dtype=torch.float32)
    for j, comp in enumerate(completions):
        if ended[j] or not cfg.mask_truncated_completions:
            loss_mask[j, :len(comp)] = 1.0
    batch = (shared_rows(prompts, completions, g, pad_id, loss_mask) if share else
             padded_rows(prompts, completions, g, pad_id, longest))
    tokens = int(loss_mask.sum())
    batch.update(loss_mask=loss_mask, n_target=tokens if cfg.loss_type == LossType.dapo else len(completions))
    return batch


def shared_width(prompts: list[Prompt], completions: list[list[int]], g: int) -> int | None:
    """The longest one-row-per-prompt row when those rows compute fewer tokens than G padded rows and each fits in
    SHARED_MAX tokens (its L x L mask stays bounded); else None."""
    rows = [len(p.ids) + sum(len(c) for c in completions[i * g:(i + 1) * g]) for i, p in enumerate(prompts)]
    padded = len(completions) * (max(len(p.ids) for p in prompts) + max(len(c) for c in completions))
    return max(rows) if max(rows) <= SHARED_MAX and len(prompts) * max(rows) < padded else None
