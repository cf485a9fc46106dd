"""Layer streaming: a LoRA run whose frozen base is larger than the card (``offload: layers``), or a full
fine-tune's working copy (``offload: layers`` with ``optimizer_offload: host``: every weight of a layer streams;
its gradient leaves the card through train/host_optim.py's hooks during the recompute's backward, and an optimizer
step ``invalidate``s the slots prefetched with the old weights).

In a LoRA step the base weights never change, need no gradient and no optimizer state. So every decoder
layer's frozen weights live **once, in pinned host memory**, and visit the card one layer at a time: a pool
of ``prefetch + 1`` layer-sized device slots is filled on a side stream ahead of compute (forward order in
the forward pass, reverse order in backward), with events so compute never reads a slot before its copy
lands and a copy never overwrites a slot compute still reads. Nothing is ever copied back: the host copy
is the only copy. LoRA adapters, their gradients and optimizer states, the embeddings, final norm and LM
head stay resident. Each layer is checkpointed (its input kept, its inside recomputed in backward), since
recomputation needs the layer's weights again anyway and keeping activations is what would not fit.

Why our own and not an existing engine (tried first, see ``bench/stream_gpu.py`` which runs both):

- FSDP2 ``fully_shard(..., offload_policy=CPUOffloadPolicy())`` offloads *parameters, gradients and optimizer
  states*: the adapters' gradients are copied to the host in backward and the optimizer step runs on the CPU
  (torch/distributed/fsdp/_fully_shard/_fsdp_api.py), and it needs a process group and DTensor parameters,
  which peft's adapter saving and our DPO's ``disable_adapter`` reference then have to go through.
- DeepSpeed ZeRO-3 offload is the same design (sharded full training, optimizer on the host) plus a
  dependency that does not build on every card we serve.
- accelerate's ``cpu_offload`` hooks copy each module's weights synchronously at its call (no prefetch, so
  the copy never overlaps compute) and give no way to bound what is resident.

What is ours is small: a slot pool, a copy stream with events, and one autograd Function per layer that
fetches the weights again for the recompute (torch's own checkpoint cannot say *when* a layer's backward
ends, which is when its slot may be reused). The bookkeeping (``StreamStats``) is counted, so a CPU test
proves the bound (no more than ``prefetch + 1`` layers materialised) and the schedule (each layer fetched
once in forward and once in backward per micro-step) without a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class StreamStats:
    """What the streamer did, counted (read by tests and the run log)."""

    fetches: dict[tuple[str, int], int] = field(default_factory=dict)  # (phase, layer) -> copies made
    uses: dict[tuple[str, int], int] = field(default_factory=dict)  # (phase, layer) -> times computed with
    evicted: int = 0  # prefetched copies dropped unused (compute asked for something else)
    max_resident: int = 0  # most slots holding a layer at once
    bytes_moved: int = 0  # host -> device bytes


@dataclass
class _Slot:
    buffers: dict[Any, Any]  # dtype -> flat device tensor sized for the largest layer
    layer: int | None = None  # which layer's weights it holds (None: free)
    ready: Any = None  # event: the copy into it has landed
    free: Any = None  # event: compute finished reading it
    busy: bool = False  # compute holds it (between acquire and release)
    phase: str | None = None  # the use its copy was made for ("forward" / "backward")


class LayerStreamer:
    """Owns the host copies of the decoder layers' frozen weights and the device slots they visit."""

    def __init__(self, layers, device, prefetch: int = 1, trainable: bool = False):
        """``trainable``: a full fine-tune's working copy (optimizer_offload: host) streams too, every weight of
        every layer; its gradients leave the card through host_optim's hooks, its updates arrive by ``invalidate``."""
        import torch

        self.device, self.prefetch, self.n = device, max(1, int(prefetch)), len(layers)
        self.trainable = trainable
        self.cuda = device.type == "cuda"
        self.stats = StreamStats()
        self.params: list[list[tuple[Any, Any, int, int]]] = []  # per layer: (param, dtype, offset, numel)
        self.host: list[dict[Any, Any]] = []  # per layer: dtype -> flat (pinned) host tensor
        sizes: dict[Any, int] = {}
        for layer in layers:
            streamed = [p for p in layer.parameters() if trainable or not p.requires_grad]
            self.params.append(self._to_host(streamed))
            for dtype, flat in self.host[-1].items():
                sizes[dtype] = max(sizes.get(dtype, 0), flat.numel())
            for p in layer.parameters():  # the adapters live on the card
                if p.requires_grad and not trainable:
                    p.data = p.data.to(device)
        self.layer_bytes = max((sum(f.numel() * f.element_size() for f in h.values()) for h in self.host), default=0)
        self.slots = [_Slot({dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()})
                      for _ in range(self.prefetch + 1)]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None

    def _to_host(self, frozen) -> list[tuple[Any, Any, int, int]]:
        """One flat host tensor per dtype per layer (one copy per visit); each parameter becomes a view of it."""
        import torch

        by_dtype: dict[Any, list] = {}
        for p in frozen:
            by_dtype.setdefault(p.dtype, []).append(p)
        host, out = {}, []
        for dtype, ps in by_dtype.items():
            flat = torch.empty(sum(p.numel() for p in ps), dtype=dtype, pin_memory=self.cuda)
            off = 0
            for p in ps:
                flat[off:off + p.numel()].copy_(p.data.reshape(-1))
                p.data = flat[off:off + p.numel()].view(p.shape)  # the original storage is freed here
                out.append((p, dtype, off, p.numel()))
                off += p.numel()
            host[dtype] = flat
        self.host.append(host)
        return out

    def invalidate(self) -> None:
        """The host copies are about to change (an optimizer step wrote them): wait for copies in flight, which
        read them, and drop every prefetched layer, so the next use fetches the new weights."""
        if self.cuda:
            self.copy_stream.synchronize()
        for slot in self.slots:
            if not slot.busy:
                slot.layer, slot.phase = None, None

    @contextlib.contextmanager
    def substituted(self, weights: dict[int, Any], key: int):
        """Passes in this context see the layers' parameters named in ``weights`` (parameter id -> tensor) holding
        those values: a KL reference's starting weights, which swapping ``p.data`` cannot give a streamed layer (its
        visit binds the slot). Host copies built once per ``key`` and swapped in; prefetched slots are dropped on the
        way in and out."""
        if getattr(self, "_alt_key", None) != key:
            self._alt, self._alt_key = self._host_copies(weights), key
        self.invalidate()
        live, self.host = self.host, self._alt
        try:
            yield
        finally:
            self.host = live
            self.invalidate()

    def _host_copies(self, weights: dict[int, Any]) -> list[dict[Any, Any]]:
        import torch

        out = []
        for index, entries in enumerate(self.params):
            flats = {dt: torch.empty_like(f, pin_memory=self.cuda) for dt, f in self.host[index].items()}
            for p, dtype, off, n in entries:
                src = weights.get(id(p))
                flats[dtype][off:off + n].copy_(self.host[index][dtype][off:off + n] if src is None
                                                else src.reshape(-1).to(dtype))
            out.append(flats)
        return out

    # --- the schedule ------------------------------------------------------------------------------------

    def _upcoming(self, index: int, phase: str, grad: bool) -> list[tuple[str, int]]:
        """The layers compute will ask for next, in order: the prefetch queue."""
        if phase == "backward":  # then the next micro-step's (or the eval's) forward
            return [("backward", i) for i in range(index - 1, -1, -1)] + [("forward", i) for i in range(self.n)]
        after = [("forward", i) for i in range(index + 1, self.n)]
        # a forward with gradients turns into the backward pass; one without starts over (generation, eval)
        turn = [("backward", i) for i in range(self.n - 1, -1, -1)] if grad else [("forward", i) for i in range(self.n)]
        return after + turn

    def acquire(self, index: int, phase: str, grad: bool = False) -> None:
        """Layer ``index``'s weights are on the card, bound to its parameters, before this returns."""
        slot = self._slot_holding(index) or self._fetch(index, phase)
        slot.busy = True
        if self.cuda:
            import torch

            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        for p, dtype, off, n in self.params[index]:
            p.data = slot.buffers[dtype][off:off + n].view(p.shape)
        key = (phase, index)
        self.stats.uses[key] = self.stats.uses.get(key, 0) + 1
        self._prefetch(self._upcoming(index, phase, grad), self.prefetch)

    def release(self, index: int, phase: str, grad: bool = False) -> None:
        """Compute is done with layer ``index``: rebind its parameters to the host copy, free the slot."""
        slot = self._slot_holding(index)
        for p, dtype, off, n in self.params[index]:
            p.data = self.host[index][dtype][off:off + n].view(p.shape)
        if slot is None:
            return
        if self.cuda:
            import torch

            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(self.device))
        slot.layer, slot.busy, slot.phase = None, False, None
        self._prefetch(self._upcoming(index, phase, grad), self.prefetch + 1)

    def _slot_holding(self, index: int) -> _Slot | None:
        return next((s for s in self.slots if s.layer == index), None)

    def _fetch(self, index: int, phase: str) -> _Slot:
        slot = next((s for s in self.slots if s.layer is None), None)
        if slot is None:  # every slot holds a prefetched layer compute did not ask for: drop one
            slot = next(s for s in reversed(self.slots) if not s.busy)
            self.stats.evicted += 1
        slot.layer, slot.phase = index, phase
        stream = torch_stream(self.copy_stream)
        with stream:
            if self.cuda:
                if slot.free is not None:
                    self.copy_stream.wait_event(slot.free)
            for dtype, flat in self.host[index].items():
                slot.buffers[dtype][:flat.numel()].copy_(flat, non_blocking=self.cuda)
                self.stats.bytes_moved += flat.numel() * flat.element_size()
            if self.cuda:
                import torch

                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
        key = (phase, index)
        self.stats.fetches[key] = self.stats.fetches.get(key, 0) + 1
        self.stats.max_resident = max(self.stats.max_resident, sum(s.layer is not None for s in self.slots))
        return slot

    def _prefetch(self, upcoming: list[tuple[str, int]], window: int) -> None:
        """Fill free slots with the next ``window`` layers compute will ask for, in that order."""
        for phase, index in upcoming[:window]:
            held = self._slot_holding(index)
            if held is not None:
                if held.phase == phase:
                    continue
                break  # held for its current use (the forward -> backward turn): fetched again once released
            if not any(s.layer is None for s in self.slots):
                break
            self._fetch(index, phase)


def torch_stream(stream):
    """``torch.cuda.stream(s)`` on a GPU, nothing on the CPU (where copies are synchronous)."""
    if stream is None:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.stream(stream)


def _autocast_state(device_type: str) -> dict[str, Any]:
    import torch

    return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type)}


class _StreamedLayer:
    """An autograd Function (made lazily: this module imports without torch): forward without saving the
    layer's activations, backward that fetches the weights again, recomputes and backpropagates (the reentrant
    checkpoint, with a fetch around it)."""

    fn = None

    @classmethod
    def apply(cls, *args):
        if cls.fn is None:
            cls.fn = _make_function()
        return cls.fn.apply(*args)


def _make_function():
    import torch

    class StreamedLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, streamer, index, run, hidden, *trainable):
            device_type = hidden.device.type
            ctx.streamer, ctx.index, ctx.run = streamer, index, run
            ctx.autocast = _autocast_state(device_type)
            ctx.rng = _rng_state(hidden.device)
            ctx.save_for_backward(hidden)
            streamer.acquire(index, "forward", grad=True)
            try:
                with torch.no_grad():
                    return run(hidden)
            finally:
                streamer.release(index, "forward", grad=True)

        @staticmethod
        def backward(ctx, grad_out):
            (hidden,) = ctx.saved_tensors
            streamer, index = ctx.streamer, ctx.index
            streamer.acquire(index, "backward", grad=True)
            try:
                x = hidden.detach().requires_grad_(hidden.requires_grad)
                with torch.enable_grad(), _restored_rng(hidden.device, ctx.rng), \
                        torch.autocast(hidden.device.type, **ctx.autocast):
                    out = ctx.run(x)
                torch.autograd.backward(out, grad_out)
            finally:
                streamer.release(index, "backward", grad=True)
            n_trainable = len(ctx.needs_input_grad) - 4
            return (None, None, None, x.grad if hidden.requires_grad else None) + (None,) * n_trainable

    return StreamedLayer


def _rng_state(device) -> tuple[Any, Any]:
    """CPU and device RNG state before the forward, so the recompute draws the same dropout masks."""
    import torch

    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _restored_rng(device, state):
    import torch

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.set_rng_state(state[0])
        if devices:
            torch.cuda.set_rng_state(state[1], device)
        yield


def decoder_layers(model):
    """The decoder's layer list (``model.layers`` of a Llama-style causal LM), through peft's wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        from hwcompat.errors import InputError

        raise InputError(f"offload=layers: {type(base).__name__} has no model.layers (a Llama-style decoder) to "
                         "stream; use offload=none")
    return layers


def install(model, device, prefetch: int = 1, trainable: bool = False) -> LayerStreamer:
    """Stream ``model``'s decoder layers (loaded on the CPU) to ``device``; everything else moves there now.
    ``trainable``: every weight of the layers streams (a full fine-tune's working copy), not only the frozen ones."""
    layers = decoder_layers(model)
    streamer = LayerStreamer(list(layers), device, prefetch, trainable)
    streamed = {id(p) for layer in layers for p in layer.parameters() if trainable or not p.requires_grad}
    for p in model.parameters():
        if id(p) not in streamed and p.device != device:
            p.data = p.data.to(device)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    for i, layer in enumerate(layers):
        layer.forward = _streamed_forward(layer, i, streamer)
    model.hwcompat_streamer = streamer
    return streamer


def _streamed_forward(layer, index: int, streamer: LayerStreamer) -> Callable:
    import torch

    original = layer.forward  # the class's (bound) forward; HF's own checkpointing stays off when streaming
    trainable = [p for p in layer.parameters() if p.requires_grad]

    def forward(hidden_states, *args, **kwargs):
        def run(h):
            return original(h, *args, **kwargs)

        if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in trainable)):
            return _StreamedLayer.apply(streamer, index, run, hidden_states, *trainable)
        streamer.acquire(index, "forward", grad=False)
        try:
            return run(hidden_states)
        finally:
            streamer.release(index, "forward")

    return forward
