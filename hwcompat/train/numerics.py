"""A numerics check before the first step: does this card compute what the profile asks of it?

Why: the most damaging failures are silent. RDNA1 Triton kernels that "launch with hipSuccess and write nothing"
(unsloth#11614), wrong results under an HSA override, fp16 overflow on Pascal, an XPU/CPU device mix: the loss
still prints, the model learns garbage, and the user finds out hours later. No peer checks. So before the first
step, a canary runs in the profile's dtype and kernels and is compared with a float64 reference on the CPU:

- a matmul (the GEMM every linear layer is);
- the attention kernel the profile chose (SDPA's fused or math kernel, or eager);
- an RMS norm;
- forward and backward through one decoder layer of the real model's shape (its config with one layer and a
  small vocabulary), with the gradient of its first linear weight.

Each is a relative error ``‖got - ref‖ / ‖ref‖`` against a tolerance per dtype (``TOLERANCE``), and non-finite
values fail outright. Measured on this CPU (torch 2.13, the worst of the five checks, a Qwen2-1.5B layer
included): fp32 8e-7, fp16 1.2e-3, bf16 1.2e-2; the tolerances sit 7-100x above, while a kernel that writes
zeros measures 1.0 and a gradient off by 2x 1.0. On a mismatch the run stops with what failed, by how much, and the setting to
change. ``hwcompat doctor --numerics`` runs it alone. Tested on the CPU by injecting faults (an op that returns
zeros, a wrong gradient, a NaN): tests/train/test_numerics.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hwcompat.errors import HwcompatError

#: The largest relative error a correct kernel shows in each dtype at the canary's sizes.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}
#: What to change when a check fails: the setting that takes the failing kernel out of the run.
FIX = {"matmul": "dtype=float32 (and `hwcompat doctor` for a torch build with kernels for this card)",
       "attention": "attention=eager", "norm": "dtype=float32",
       "layer forward": "attention=eager and dtype=float32 (then the check says which one it was)",
       "layer backward": "attention=eager and dtype=float32 (then the check says which one it was)"}
SEED = 1234


@dataclass(frozen=True)
class Result:
    check: str
    error: float  # relative error against the float64 reference (inf when non-finite)
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        err = "non-finite values (NaN or inf)" if not math.isfinite(self.error) else f"{self.error:.2e}"
        return f"{self.check}: relative error {err} (tolerance {self.tolerance:.0e}) {verdict}"


class NumericsError(HwcompatError):
    """The card computed something other than the reference: training would learn garbage."""


def rel_error(got, ref) -> float:
    import torch

    got = got.detach().to("cpu", torch.float64)
    if not torch.isfinite(got).all():
        return math.inf
    denom = ref.norm().item()
    return (got - ref).norm().item() / (denom if denom > 0 else 1.0)


def _ops(device, dtype: str, attention: str, tol: float) -> list[Result]:
    """The single kernels: a GEMM, the attention kernel, a norm."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(SEED)
    dt = getattr(torch, dtype)
    out = []
    a, b = torch.randn(64, 256, generator=g, dtype=torch.float64), torch.randn(256, 96, generator=g, dtype=torch.float64)
    got = torch.matmul(a.to(device, dt), b.to(device, dt))
    out.append(Result("matmul", rel_error(got, a.to(dt).double() @ b.to(dt).double()), tol))
    q, k, v = (torch.randn(2, 4, 32, 64, generator=g, dtype=torch.float64) for _ in range(3))
    ref = _attention_ref(*(x.to(dt).double() for x in (q, k, v)))
    if attention == "eager":
        qd, kd, vd = (x.to(device, dt) for x in (q, k, v))
        scores = (qd @ kd.transpose(-1, -2)) / math.sqrt(64)
        mask = torch.ones(32, 32, dtype=torch.bool, device=device).triu(1)
        got = scores.masked_fill(mask, float("-inf")).float().softmax(-1).to(dt) @ vd
    elif attention == "cpu_bf16":  # hwcompat's CPU kernel, on its training path (inputs that need gradients)
        from hwcompat.train import cpu_attention

        got = cpu_attention.causal(*(x.to(device, dt).requires_grad_() for x in (q, k, v))).detach()
    else:
        got = F.scaled_dot_product_attention(*(x.to(device, dt) for x in (q, k, v)), is_causal=True)
    out.append(Result(f"attention ({attention})", rel_error(got, ref), tol))
    x, w = torch.randn(16, 512, generator=g, dtype=torch.float64), torch.randn(512, generator=g, dtype=torch.float64)
    xr, wr = x.to(dt).double(), w.to(dt).double()
    got = F.rms_norm(x.to(device, dt), (512,), w.to(device, dt), eps=1e-6)
    out.append(Result("norm", rel_error(got, xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6) * wr), tol))
    return out


def _attention_ref(q, k, v):
    import torch

    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


#: The canary layer's vocabulary: the real hidden size and layer shape, without the real embedding's memory.
CANARY_VOCAB = 512


def _layer(config: dict[str, Any], device, dtype: str, attention: str, tol: float) -> list[Result]:
    """One decoder layer of the model's shape, forward and backward, against the same weights in float64."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hwcompat.train import cpu_attention

    cfg = AutoConfig.for_model(**{**config, "num_hidden_layers": 1, "vocab_size": CANARY_VOCAB,
                                  "tie_word_embeddings": False})
    torch.manual_seed(SEED)
    # each model its own config: from_config records the attention kernel on the config object it is given
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float64,
                                           trust_remote_code=False)
    dt = getattr(torch, dtype)
    dut = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=cpu_attention.implementation(
                                           attention), dtype=dt,
                                           trust_remote_code=False)
    assert ref.config._attn_implementation == "eager"
    dut.load_state_dict({k: v.to(dt) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.to(dt).double() for k, v in ref.state_dict().items()})  # the same rounded weights
    dut.to(device)
    ids = torch.randint(0, CANARY_VOCAB, (2, 32), generator=torch.Generator().manual_seed(SEED))
    weight = _first_linear(ref)
    out_ref = ref(input_ids=ids).logits
    out_ref.logsumexp(-1).sum().backward()
    out = dut(input_ids=ids.to(device)).logits
    out.float().logsumexp(-1).sum().backward()
    grad = dict(dut.named_parameters())[weight].grad
    grad_ref = dict(ref.named_parameters())[weight].grad
    return [Result("layer forward", rel_error(out.float(), out_ref), tol),
            Result("layer backward", rel_error(torch.zeros_like(grad_ref) if grad is None else grad, grad_ref), tol)]


def _first_linear(model) -> str:
    import torch

    return next(f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers.0." in f".{n}.")


def run(device, dtype: str, attention: str, config: dict[str, Any] | None = None) -> list[Result]:
    """Every check on ``device`` in ``dtype`` with the ``attention`` kernel; ``config``: the model's config.json
    (a small Llama when None)."""
    tol = TOLERANCE[dtype]
    results = _ops(device, dtype, attention, tol)
    results += _layer(config or SMALL_LLAMA, device, dtype, attention, tol)
    return results


#: The layer checked when no model is given (``hwcompat doctor --numerics`` without --model).
SMALL_LLAMA = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8,
               "num_key_value_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}


def check(device, dtype: str, attention: str, model_dir: str | Path | None, where: str,
          log: Callable[[str], None] = print) -> list[Result]:
    """The check before the first step: raises NumericsError naming each failure and its fix."""
    import json

    config = None
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    results = run(device, dtype, attention, config)
    bad = [r for r in results if not r.ok]
    if not bad:
        log(f"numerics: {len(results)} checks in {dtype} with {attention} on {where} match the float64 reference "
            f"(largest relative error {max(r.error for r in results):.1e})")
        return results
    fixes = sorted({FIX.get(r.check.split(" (")[0], "dtype=float32") for r in bad})
    raise NumericsError(f"numerics check failed on {where} ({dtype}, attention {attention}): the card computes "
                        "something other than the float64 reference, so training would learn garbage:\n"
                        + "\n".join(f"  {r.line()}" for r in results)
                        + f"\nChange: {'; or '.join(fixes)}. Run `hwcompat doctor --numerics` to check again; "
                          "numerics_check=false skips it (not advised)")


def main(argv: list[str] | None = None) -> int:
    """``python -m hwcompat.train.numerics KIND DTYPE ATTENTION [MODEL_DIR]``: the check alone, in a process started
    with the profile's environment (``hwcompat doctor --numerics``)."""
    import sys

    import torch

    args = list(sys.argv[1:] if argv is None else argv)
    kind, dtype, attention = args[:3]
    model = args[3] if len(args) > 3 else None
    device = torch.device(kind if kind == "cpu" else f"{kind}:0")
    try:
        results = check(device, dtype, attention, model, f"{kind}:0" if kind != "cpu" else "the CPU",
                        log=lambda m: print(m))
    except NumericsError as exc:
        print(f"hwcompat: error: {exc}", file=sys.stderr)
        return 1
    for r in results:
        print(f"  {r.line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
