"""One layer's attention, forward and backward, on the CPU: hwcompat's cpu_bf16 kernel against PyTorch's SDPA.

    python bench/cpu_attention.py [--rounds 3] [--out bench/results/cpu-attention.json]

The demo model's attention shape (SmolLM2-135M: 9 query heads, 3 key/value heads, head_dim 64), batch x sequence
from 8 x 128 to 1 x 2048, a right-padded mask as length-grouped batches have, under bf16 autocast (as a bf16 CPU
run trains) and in fp32. Each call as transformers makes it (``attention(module, q, k, v, mask, scaling)``), SDPA
through transformers' own ``sdpa_attention_forward`` with its boolean mask; each timing the best of ``--rounds``
after a warm-up, the two kernels alternating. Run it with tcmalloc preloaded (hwcompat's CPU runs are):
``LD_PRELOAD=libtcmalloc_minimal.so.4``. Memory: the kernel keeps b x heads x s^2 probabilities per layer (the
planner's term), SDPA none; that trade is what `hwcompat plan` weighs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = [(8, 128), (8, 256), (4, 512), (2, 1024), (1, 2048)]
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _inputs(b: int, s: int, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, HEADS, s, HEAD_DIM, generator=g, dtype=dtype).requires_grad_()
    k, v = (torch.randn(b, KV_HEADS, s, HEAD_DIM, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[0, s - s // 8:] = False  # one row padded
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return q, k, v, allowed, additive


def _time(fn, q, k, v, mask, autocast: bool, rounds: int) -> float:
    import torch

    module = types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, training=True, is_causal=True)
    best = float("inf")
    for i in range(rounds + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = fn(module, q, k, v, mask, scaling=HEAD_DIM ** -0.5)
        out.float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - t)
        q.grad = k.grad = v.grad = None
    return best


def measure(rounds: int) -> list[dict]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hwcompat.train import cpu_attention

    rows = []
    for dtype_name, autocast in (("bfloat16", True), ("float32", False)):
        for b, s in SHAPES:
            q, k, v, allowed, additive = _inputs(b, s, torch.float32)
            sdpa = kernel = float("inf")
            for _ in range(2):  # alternate, keep each one's best
                sdpa = min(sdpa, _time(sdpa_attention_forward, q, k, v, allowed, autocast, rounds))
                kernel = min(kernel, _time(cpu_attention.attention, q, k, v, additive, autocast, rounds))
            rows.append({"dtype": dtype_name, "batch": b, "seq": s, "sdpa_ms": sdpa * 1e3, "cpu_bf16_ms": kernel * 1e3,
                         "speedup": sdpa / kernel,
                         "kept_probabilities_bytes": b * HEADS * s * s * (2 if dtype_name == "bfloat16" else 4)})
            print(f"{dtype_name:8} {b} x {s:5}: sdpa {sdpa * 1e3:7.1f} ms, cpu_bf16 {kernel * 1e3:7.1f} ms "
                  f"({sdpa / kernel:.2f}x)", flush=True)
    return rows


def markdown_table(report: dict) -> str:
    lines = ["| dtype | batch x seq | SDPA fwd+bwd | cpu_bf16 fwd+bwd | speed-up | probabilities kept (one layer) |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['dtype']} | {r['batch']} x {r['seq']} | {r['sdpa_ms']:.1f} ms | {r['cpu_bf16_ms']:.1f} ms "
                     f"| {r['speedup']:.2f}× | {r['kept_probabilities_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-attention.json"))
    ap.add_argument("--table", metavar="RESULT.json", help="print a result file's markdown table")
    args = ap.parse_args()
    report = json.loads(Path(args.table).read_text()) if args.table else measured(args)
    print(markdown_table(report), end="")
    return 0


def measured(args) -> dict:
    """A new measurement, written to ``--out``."""
    import torch

    from hwcompat.probe.malloc import in_use

    report = {"benchmark": "cpu_attention", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "malloc": in_use(),
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM}, "rows": measure(args.rounds)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(main())
