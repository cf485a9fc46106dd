"""Attention for training on a CPU with native bf16 dot products (``attention: cpu_bf16``).

Why our own: PyTorch's CPU flash attention runs bf16 at its fp32 rate (on an AVX512-BF16 EPYC it was 40% of a bf16
LoRA step while the matrix products, on oneDNN's native bf16 GEMM, ran 2.8x faster than in fp32). Here the two
products of the forward and the four of the backward are plain bf16 batched GEMMs, and the backward keeps only the
bf16 probabilities P (2 bytes per score: the S^2 term the planner counts, ``plan.score_bytes``) instead of
recomputing them, with ``dS = P * (dP - rowsum(dO * O)) * scale`` as flash attention's backward has it. The scores
and the softmax are fp32, as eager attention's under autocast. GQA needs no ``repeat_kv`` copy: a group's queries are
stacked along the sequence, so one product serves every query head of a key head and the backward's sums over the
group fall out of the GEMM.

In eval mode (evaluation, generation with a KV cache) and where this kernel has no case (dropout, a soft-capped score)
it hands the call to transformers' SDPA unchanged; a training-mode forward without gradients (a streamed layer's
first pass, whose recompute has gradients) runs the kernel, so both passes compute the same values. Registered by
name on first use, never at import.
"""
from __future__ import annotations

from typing import Any

NAME = "cpu_bf16"


def implementation(name: str) -> str:
    """The ``attn_implementation`` to hand transformers for the profile's attention (registered when it is ours)."""
    if name == NAME:
        register()
    return name


def register() -> None:
    """Make ``attn_implementation="cpu_bf16"`` loadable: the kernel, and eager's additive float mask for it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _grouped(t, groups: int):
    """(b, heads, s, d) -> (b, kv_heads, groups * s, d): a key head's query heads stacked along the sequence."""
    b, h, s, d = t.shape
    return t.reshape(b, h // groups, groups * s, d)


def _function():
    import torch

    class ScoresKept(torch.autograd.Function):
        """softmax(q k^T * scale + mask) v in bf16 products; P kept for the backward (see the module docstring)."""

        @staticmethod
        def forward(ctx, q, k, v, mask, scale, groups):
            b, hkv, gs, _ = q.shape
            wide = torch.promote_types(q.dtype, torch.float32)
            with torch.autocast("cpu", enabled=False):
                s = torch.matmul(q, k.transpose(-1, -2)).to(wide).mul_(scale)
                if mask is not None:
                    s.view(b, hkv, groups, gs // groups, -1).add_(mask.unsqueeze(2))
                p = torch.softmax(s, -1).to(q.dtype)
                del s
                out = torch.matmul(p, v)
            ctx.save_for_backward(q, k, v, p, out)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, p, out = ctx.saved_tensors
            with torch.autocast("cpu", enabled=False):
                grad = grad.to(q.dtype)
                dv = torch.matmul(p.transpose(-1, -2), grad)
                wide = torch.promote_types(q.dtype, torch.float32)
                rows = (grad.to(wide) * out.to(wide)).sum(-1, keepdim=True)
                ds = torch.matmul(grad, v.transpose(-1, -2)).to(wide).sub_(rows).mul_(p).mul_(ctx.scale).to(q.dtype)
                dq = torch.matmul(ds, k)
                dk = torch.matmul(ds.transpose(-1, -2), q)
            return dq, dk, dv, None, None, None

    return ScoresKept


_KERNEL: list[Any] = []


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: returns (output (b, s, heads, d), no weights)."""
    import torch

    # Eval and generation (the module in eval mode) go to SDPA; a training-mode forward without gradients (a
    # streamed layer's first pass, GRPO's old log-probabilities) stays here, so it computes what its recompute does.
    if not module.training or dropout or kwargs.get("softcap"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    out = _apply(*(t.to(dtype, memory_format=torch.contiguous_format) for t in (query, key, value)), mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def causal(q, k, v):
    """Causal attention of (b, heads, s, d) tensors through the kernel (the numerics check's and tests' entry)."""
    import torch

    s = q.shape[-2]
    above = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    mask = torch.zeros(s, s, device=q.device).masked_fill(above, torch.finfo(torch.float32).min)
    return _apply(q, k, v, mask[None, None], None)


def _apply(q, k, v, mask, scale):
    """(b, heads, s, d) queries, (b, kv_heads, s, d) keys and values -> (b, heads, s, d) through the kernel."""
    if not _KERNEL:
        _KERNEL.append(_function())
    b, heads, s, d = q.shape
    groups = heads // k.shape[1]
    q = _grouped(q.contiguous(), groups)
    k, v = k.contiguous(), v.contiguous()
    out = _KERNEL[0].apply(q, k, v, mask, scale if scale is not None else d ** -0.5, groups)
    return out.view(b, heads, s, d)
