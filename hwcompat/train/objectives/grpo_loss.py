"""GRPO's loss, the formulas of grpo.py's docstring as functions of tensors (TRL's names and defaults): each
completion's advantage against its group, the clipped surrogate per token with the k3 KL, and the reduction each
``loss_type`` asks for. Pure: no model, no config file, testable against TRL's own lines."""

from __future__ import annotations

from hwcompat.choices import ISLevel, LossType
from hwcompat.train.config import TrainConfig, effective_beta


def advantages(rewards, group: int, scale: str):
    """Each completion's reward against its group's (TRL's formula, its 1e-4 and its unbiased std)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1).repeat_interleave(group)
    if scale == "none":
        return rewards - mean
    std = (grouped.std(dim=1).repeat_interleave(group) if scale == "group"
           else rewards.std().expand_as(rewards) if rewards.numel() > 1 else rewards.new_zeros(rewards.shape))
    return (rewards - mean) / (std + 1e-4)


def token_losses(logp, old, ref, adv, mask, cfg: TrainConfig):
    """Per-token losses ``[rows x tokens]`` and the importance weights (see the module docstring)."""
    import torch

    log_ratio = logp - old
    if cfg.importance_sampling_level == ISLevel.sequence:
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    w = torch.exp(log_ratio)
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    a = adv.unsqueeze(-1)
    losses = -torch.min(w * a, torch.clamp(w, 1 - cfg.epsilon, 1 + high) * a)
    beta = effective_beta(cfg)
    if beta:
        losses = losses + beta * torch_kl(ref, logp)
    return losses.expand_as(logp), w


def reduce(losses, mask, cfg: TrainConfig):
    """The batch's summed loss, before dividing by the window's count (``n_target``: completions or tokens)."""
    masked = losses * mask
    if cfg.loss_type == LossType.grpo:
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if cfg.loss_type == LossType.dr_grpo:
        return masked.sum() / cfg.max_completion_length
    return masked.sum()  # dapo: / the window's completion tokens


def torch_kl(ref, logp):
    """The k3 estimator of KL(pi || ref) per token (Schulman 2020), as TRL computes it."""
    import torch

    return torch.exp(ref - logp) - (ref - logp) - 1
