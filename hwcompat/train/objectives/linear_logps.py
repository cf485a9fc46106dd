"""log p(target) through the LM head, chunk by chunk: the loss never holds all positions' logits.

Projecting every response position onto the vocabulary at once costs ``tokens x vocab`` fp32 logits plus their
gradient: 5.8 GiB of a 16.9 GiB plan for Qwen3-4B (151,936 tokens) at seq 4096. Liger's fused linear
cross-entropy and Apple's Cut Cross-Entropy cut it with Triton kernels, which Maxwell, Pascal and most of our AMD
cards cannot run, so this is the same idea in plain torch, on every profile.

For a frozen plain ``nn.Linear`` head (LoRA, QLoRA: the head is never adapted by ``all-linear``) the gradient of
each token's log-probability with respect to its hidden state does not depend on what the loss does with it:
``d logp_t / d h_t = (onehot(y_t) - softmax(z_t)) @ W``. So, as Liger's FLCE does, the forward computes it per
chunk while the chunk's logits are at hand, keeps only that ``[tokens x hidden]`` result, and the backward scales
it by the incoming per-token gradient: no logits are kept and none recomputed, the same FLOPs as the unchunked
path. It serves SFT (the loss is ``-sum``) and DPO (per-row sums of per-token log-probabilities) alike. Any
other head (a trained or adapted head, a quantised one) runs each chunk under activation checkpointing instead:
the chunk's logits are recomputed in backward, still one chunk at a time.

The model's own logit transform is applied inside the chunk: Cohere's ``logit_scale`` (z * s) and Gemma 2's
``final_logit_softcapping`` (c * tanh(z / c)). The chunk length is ``plan.logit_chunk_rows`` so the planner's
``logits`` term counts exactly what this allocates.
"""

from __future__ import annotations

from hwcompat.plan import logit_chunk_rows


def _compute_dtype(hidden):
    import torch

    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _chunk(h, weight, bias, y, scale, cap, want_grad: bool):
    """(log p(y) per row, d logp / d h per row or None) for one chunk; at most chunk x vocab x (4 + dtype) live."""
    import torch
    import torch.nn.functional as F

    z = F.linear(h, weight, bias)
    zf = z.float()
    del z
    softcap_t = None
    if scale or cap:
        softcap_t = _softcap(zf, scale, cap)
    top = zf.amax(-1, keepdim=True)
    zf.sub_(top)
    picked = zf.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    total = zf.exp_().sum(-1)
    logp = picked - total.log()
    if not want_grad:
        return logp, None
    p = zf.div_(total.unsqueeze(-1))  # softmax, in place
    p[torch.arange(y.shape[0], device=y.device), y] -= 1.0  # softmax - onehot = -d logp / d z
    if softcap_t is not None:
        p.mul_(softcap_t)
    if scale:
        p.mul_(scale)
    g = p.to(weight.dtype) @ weight
    return logp, g.neg_()


def _softcap(zf, scale, cap):
    """Apply the model's transform to zf in place; returns d z_out / d z_raw / scale (tanh'), or None."""
    if scale:
        zf.mul_(scale)
    if not cap:
        return None
    zf.div_(cap).tanh_()
    deriv = zf.square().neg_().add_(1.0)  # 1 - tanh^2, one more chunk-sized buffer (the planner counts it)
    zf.mul_(cap)
    return deriv


class _FrozenHeadLogps:
    """The autograd function for a frozen plain Linear head (built lazily: this module imports without torch)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, bias, targets, rows, scale, cap, want_grad):
                    dtype = _compute_dtype(hidden)
                    w = weight.to(dtype)
                    b = bias.to(dtype) if bias is not None else None
                    logps, grads = [], []
                    for s in range(0, hidden.shape[0], rows):
                        lp, g = _chunk(hidden[s:s + rows].to(dtype), w, b, targets[s:s + rows], scale, cap,
                                       want_grad)
                        logps.append(lp)
                        if g is not None:
                            grads.append(g)
                    if want_grad:
                        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(hidden.shape))
                    ctx.hidden_dtype = hidden.dtype
                    return torch.cat(logps) if logps else hidden.new_zeros((0,), dtype=torch.float32)

                @staticmethod
                def backward(ctx, grad_out):
                    (g,) = ctx.saved_tensors
                    grad_h = (g.float() * grad_out.float().unsqueeze(-1)).to(ctx.hidden_dtype)
                    return grad_h, None, None, None, None, None, None, None

            cls.fn = Fn
        return cls.fn


def _generic_logps(head, hidden, targets, rows: int, scale, cap):
    """Any head module: each chunk checkpointed, so backward recomputes that chunk's logits only."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def one(h, y):
        z = head(h).float()
        if scale:
            z = z * scale
        if cap:
            z = torch.tanh(z / cap) * cap
        return z.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    out = []
    for s in range(0, hidden.shape[0], rows):
        h, y = hidden[s:s + rows], targets[s:s + rows]
        out.append(checkpoint(one, h, y, use_reentrant=False) if torch.is_grad_enabled() else one(h, y))
    return torch.cat(out) if out else hidden.new_zeros((0,), dtype=torch.float32)


def frozen_linear(head) -> bool:
    """True for a plain nn.Linear whose weights are not trained (peft and bitsandbytes heads are not plain)."""
    import torch

    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in params)


def target_logps(head, hidden, targets, scale: float | None = None, cap: float | None = None):
    """log p(targets[i] | hidden[i]) in fp32 for each row of ``hidden`` ([N, H]) through ``head``; never more than
    one chunk of ``plan.logit_chunk_rows(vocab)`` rows of logits at a time."""
    import torch

    vocab = head.weight.shape[0]
    rows = logit_chunk_rows(vocab)
    if frozen_linear(head):
        want = torch.is_grad_enabled() and hidden.requires_grad
        return _FrozenHeadLogps.get().apply(hidden, head.weight, head.bias, targets, rows, scale, cap, want)
    return _generic_logps(head, hidden, targets, rows, scale, cap)
