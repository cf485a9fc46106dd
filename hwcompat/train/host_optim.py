"""``optimizer_offload: host``: a full fine-tune's fp32 master weights, gradients and AdamW state in host RAM.

AdamW in mixed precision holds about 16 bytes per trained parameter (fp32 weights, fp32 gradients, two fp32
moments), which is what keeps a 1.5B full fine-tune off a 16 GB card. Here the card holds only the working copy
in the profile's dtype (2 bytes per parameter in fp16/bf16) and, for a moment, each gradient as backward makes
it; everything the optimizer owns stays on the host (the idea of ZeRO-Offload, torchao's CPUOffloadOptimizer and
MegaTrain, arXiv 2604.05091):

- each working parameter's gradient leaves the card as soon as autograd has accumulated it (a
  post-accumulate-grad hook): copied without blocking into a pinned staging buffer, then added in fp32 into the
  master's ``.grad`` on the host, so the card never holds the whole gradient;
- clipping, the fp16 GradScaler and AdamW then run on the masters exactly as the resident recipe runs them on
  its parameters (the loop's own code: ``clip_grad_norm_``, ``scaler.step``), so the two are the same math;
- the updated masters are cast back into the working copy (one host -> device copy per step).

The optimizer is torch's own ``AdamW(fused=True)`` on CPU tensors: its vectorised CPU kernel (ATen's fused Adam,
AVX2/AVX-512), about as fast per parameter as a hand-written vectorised step and the same implementation the
resident CPU recipe uses (``optim.make_optimizer``), so the equivalence tests compare like with like.

What the card-side gradient hook cannot do is step a layer while backward computes the next: clipping needs the
norm of the whole gradient first (as ZeRO-Offload, the step waits for the last layer's gradient).
"""

from __future__ import annotations

from typing import Any

#: Device gradients a micro-batch may keep in flight to the host before the oldest copies are waited for.
IN_FLIGHT_BYTES = 256 << 20


class HostOffload:
    """The masters (fp32, pinned on CUDA) of a model's trainable parameters and the hooks that feed them."""

    def __init__(self, model, device, working_dtype, on_host: set[int] | None = None) -> None:
        """``on_host``: ids of parameters whose working copy stays in host memory (the layers train/stream.py
        brings to the card one at a time)."""
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        self.names: list[str] = []
        self.working: list[Any] = []
        self.masters: list[Any] = []
        self.staging: list[Any] = []
        self.pending: list[tuple[int, Any, Any]] = []  # (index, device gradient kept alive, copy-done event)
        self.in_flight = 0
        self.streamer = None  # set by install when the layers stream: a step's new weights invalidate its slots
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            host = p.detach().to("cpu", torch.float32)
            master = torch.nn.Parameter(host.pin_memory() if self.cuda else host.clone(), requires_grad=True)
            home = torch.device("cpu") if on_host and id(p) in on_host else device
            p.data = master.detach().to(home, working_dtype, copy=True)
            self.names.append(name)
            self.working.append(p)
            self.masters.append(master)
            self.staging.append(torch.empty(p.shape, dtype=working_dtype, pin_memory=True) if self.cuda else None)
            p.register_post_accumulate_grad_hook(self._take(len(self.masters) - 1))

    def _take(self, i: int):
        def hook(p) -> None:
            g, p.grad = p.grad, None
            if g is None:  # a streamed layer's outer node (train/stream.py): its gradient came through the recompute
                return
            if not self.cuda:
                self._add(i, g, owned=True)
                return
            import torch

            self.staging[i].copy_(g, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.pending.append((i, g, done))
            self.in_flight += g.numel() * g.element_size()
            if self.in_flight > IN_FLIGHT_BYTES:
                self._drain(self.in_flight // 2)

        return hook

    def _add(self, i: int, g, owned: bool = False) -> None:
        """Accumulate a gradient into the master's, in fp32; ``owned``: ``g`` is ours to keep (no copy)."""
        import torch

        m = self.masters[i]
        if m.grad is not None:
            m.grad.add_(g.to("cpu", torch.float32))
        elif owned and g.device.type == "cpu" and g.dtype == torch.float32:
            m.grad = g
        else:
            m.grad = g.to("cpu", torch.float32, copy=True)

    def _drain(self, keep_bytes: int = 0) -> None:
        """Wait for the oldest copies until at most ``keep_bytes`` are in flight, adding each into its master."""
        while self.pending and self.in_flight > keep_bytes:
            i, g, done = self.pending.pop(0)
            done.synchronize()
            self.in_flight -= g.numel() * g.element_size()
            self._add(i, self.staging[i])

    def flush(self) -> None:
        """Every gradient of the micro-batch just run is on the host (call after each backward)."""
        self._drain(0)

    def push(self) -> None:
        """The stepped masters become the card's working copy (cast to its dtype)."""
        import torch

        if self.streamer is not None:  # slots prefetched with the old weights: dropped, copies in flight waited for
            self.streamer.invalidate()
        with torch.no_grad():
            for w, m in zip(self.working, self.masters):
                w.data.copy_(m.detach(), non_blocking=self.cuda)

    def named_masters(self) -> dict[str, Any]:
        return dict(zip(self.names, self.masters))

    def host_bytes(self) -> int:
        """Host RAM the masters, their gradients, AdamW's two moments and the staging take (the planner's terms)."""
        n = sum(m.numel() for m in self.masters)
        staging = sum(s.numel() * s.element_size() for s in self.staging if s is not None)
        return 16 * n + staging


def install(model, device, working_dtype, stream_layers: bool = False, prefetch: int = 1) -> HostOffload:
    """The host side of a full fine-tune; ``stream_layers`` (offload: layers): the decoder layers' working copy
    lives in pinned host memory too and visits the card a layer at a time (train/stream.py), so the card holds
    the embeddings, the head and ``prefetch + 1`` layers."""
    on_host = None
    if stream_layers:
        from hwcompat.train import stream

        on_host = {id(p) for layer in stream.decoder_layers(model) for p in layer.parameters()}
    host = HostOffload(model, device, working_dtype, on_host)
    model.hwcompat_host = host
    if stream_layers:
        from hwcompat.train import stream

        host.streamer = stream.install(model, device, prefetch, trainable=True)
    return host
