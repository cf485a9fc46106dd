"""Selftest: does this card really train with its profile? Minutes, no download.

    hwcompat selftest [--device N] [--json]

Builds a small Llama from a config, then runs forward + backward + AdamW
steps in the profile's dtype (with loss scaling for fp16), attention kernel
and compile backend, on a repeated token pattern a working stack must
learn. Checks: the kernels load (no "no kernel image is available"), loss
and gradients are finite, the loss goes down, and (on a GPU) the measured
peak memory is within the planner's margin. Reports tokens/s, achieved
TFLOP/s and MFU against the profile's datasheet peak for that dtype.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hwcompat.resolve import ResolvedDevice

MEMORY_MARGIN = 0.25  # selftest tolerance between planned and measured peak allocation

GPU_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=8192)
CPU_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here
    detail: str
    fix: str = ""


@dataclass
class SelftestResult:
    device: str
    profile: str
    dtype: str
    attention: str
    compile_backend: str
    passed: bool
    checks: list[Check]
    tokens_per_s: float = 0.0
    achieved_tflops: float = 0.0
    peak_tflops: float | None = None
    peak_card: str = ""
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    planned_memory_bytes: int | None = None
    losses: list[float] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_selftest(device: ResolvedDevice, steps: int = 30, seq_len: int | None = None, batch: int | None = None,
                 fix_hint: str = "") -> SelftestResult:
    import torch

    prof = device.profile
    assert prof is not None
    on_gpu = device.reading.vendor != "cpu"
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    seq_len = seq_len or (1024 if on_gpu else 128)
    batch = batch or (8 if on_gpu else 4)
    checks: list[Check] = []
    res = SelftestResult(device=device.reading.name, profile=prof.name, dtype=prof.dtype, attention=prof.attention,
                         compile_backend=prof.compile_backend, passed=False, checks=checks,
                         peak_card=prof.peak_card, versions={"torch": torch.__version__},
                         peak_tflops=prof.peak_tflops.get(prof.dtype))
    if on_gpu and not torch.cuda.is_available():
        checks.append(Check("kernels", False, f"torch {torch.__version__} sees no GPU", fix_hint))
        return res
    # The CLI pins the process to the chosen card (CUDA/HIP_VISIBLE_DEVICES), so it is always device 0.
    dev = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    try:
        run = _train(prof, shape, dev, steps, seq_len, batch)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0]
        kernel = "no kernel image" in msg or "invalid device function" in msg
        checks.append(Check("kernels", False, msg, fix_hint if kernel else "run `hwcompat doctor`"))
        return res
    checks.append(Check("kernels", True, f"forward/backward ran in {prof.dtype} with {prof.attention} attention, "
                                         f"compile {prof.compile_backend}"))
    res.losses = run.losses
    checks += _learning_checks(run)
    _speed(res, run, shape, seq_len)
    if on_gpu:
        checks.append(_memory_check(res, device, shape, seq_len, batch, int(torch.cuda.max_memory_allocated(dev))))
    else:
        checks.append(Check("memory", None, "not measured on the CPU (no allocator statistics)"))
    res.passed = all(c.ok is not False for c in checks)
    return res


@dataclass
class _Run:
    losses: list[float]
    grads_finite: bool
    timed_tokens: int
    elapsed: float
    n_params: int


def _train(prof, shape: dict[str, Any], dev, steps: int, seq_len: int, batch: int) -> _Run:
    """A small Llama, full fine-tuning on a repeated pattern in the profile's dtype, attention and compile."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    on_gpu = dev.type != "cpu"
    dtype = getattr(torch, prof.dtype)
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=max(2048, seq_len), tie_word_embeddings=False)
    cfg._attn_implementation = prof.attention
    model = LlamaForCausalLM(cfg).to(dev)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    fwd = torch.compile(model) if prof.compile_backend == "inductor" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(dev.type, enabled=prof.dtype == "float16")
    # A repeated pattern: a working stack learns it within a few steps.
    pattern = torch.randint(0, shape["vocab_size"], (64,), generator=torch.Generator().manual_seed(1))
    ids = pattern.repeat(batch, seq_len // 64 + 1)[:, :seq_len].to(dev)
    run = _Run([], True, 0, 0.0, sum(p.numel() for p in model.parameters()))
    t0 = None
    for step in range(steps):
        if step == 3:  # after warm-up (and compilation)
            if on_gpu:
                torch.cuda.synchronize(dev)
            t0, run.timed_tokens = time.perf_counter(), 0
        with torch.autocast(dev.type, dtype=dtype) if prof.dtype != "float32" else _null():
            loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.grads_finite &= bool(torch.isfinite(gn))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        run.losses.append(float(loss.detach().float()))
        run.timed_tokens += batch * seq_len
    if on_gpu:
        torch.cuda.synchronize(dev)
    run.elapsed = time.perf_counter() - (t0 or time.perf_counter())
    return run


def _learning_checks(run: _Run) -> list[Check]:
    losses = run.losses
    finite = all(math.isfinite(x) for x in losses) and run.grads_finite
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    down = last < first * 0.7
    return [Check("finite", finite, "loss and gradients finite" if finite else
                  f"non-finite loss or gradients ({losses[-3:]})",
                  "" if finite else "try dtype=float32 for this card (fp16 overflow) and run `hwcompat doctor`"),
            Check("learns", down, f"loss {first:.3f} -> {last:.3f}",
                  "" if down else "the stack computes but does not learn: check the dtype and driver")]


def _speed(res: SelftestResult, run: _Run, shape: dict[str, Any], seq_len: int) -> None:
    res.tokens_per_s = run.timed_tokens / run.elapsed if run.elapsed > 0 else 0.0
    # 6 FLOPs per parameter per token (forward 2, backward 4) plus causal attention (Kaplan et al. 2020).
    attn = 6 * shape["num_hidden_layers"] * seq_len * shape["hidden_size"]
    res.achieved_tflops = res.tokens_per_s * (6 * run.n_params + attn) / 1e12
    res.mfu = res.achieved_tflops / res.peak_tflops if res.peak_tflops else None


def _memory_check(res: SelftestResult, device: ResolvedDevice, shape: dict[str, Any], seq_len: int, batch: int,
                  measured: int) -> Check:
    """The allocator's peak against the planner's, without context and slack (max_memory_allocated excludes both)."""
    from hwcompat import plan

    prof = device.profile
    res.peak_memory_bytes = measured
    planned = plan.estimate(plan.shape_from_config({**shape, "model_type": "llama", "tie_word_embeddings": False},
                                                   "selftest"),
                            plan.PlanInput(method="full", seq_len=seq_len, batch_size=batch, optimizer="adamw",
                                           lora_dropout=False),
                            prof.dtype, prof.attention, device.reading.vendor, device.reading.memory_bytes)
    res.planned_memory_bytes = planned.peak_bytes - planned.breakdown["runtime_overhead"]
    ratio = res.peak_memory_bytes / max(1, res.planned_memory_bytes)
    ok = abs(ratio - 1) <= MEMORY_MARGIN
    return Check("memory", ok, f"measured {res.peak_memory_bytes / 2**20:.0f} MiB vs planned "
                               f"{res.planned_memory_bytes / 2**20:.0f} MiB ({ratio:.2f}x)",
                 "" if ok else "the planner is off for this card: please report this result")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def render(res: SelftestResult) -> str:
    lines = [f"selftest on {res.device}: profile {res.profile} ({res.dtype}, {res.attention}, "
             f"compile {res.compile_backend})"]
    for c in res.checks:
        mark = "PASS" if c.ok else ("n/a " if c.ok is None else "FAIL")
        lines.append(f"  {mark}  {c.name:8} {c.detail}")
        if c.ok is False and c.fix:
            lines.append(f"        fix: {c.fix}")
    if res.tokens_per_s:
        mfu = f", MFU {res.mfu:.1%} of {res.peak_card}'s {res.peak_tflops:g} TFLOP/s" if res.mfu is not None else \
            " (no datasheet peak for this dtype)"
        lines.append(f"  {res.tokens_per_s:,.0f} tokens/s, {res.achieved_tflops:.2f} TFLOP/s{mfu}")
    lines.append("PASS" if res.passed else "FAIL")
    return "\n".join(lines)
