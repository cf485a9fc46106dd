"""Peak memory of the SFT/DPO loss at a 151,936-token vocabulary (Qwen3's): one-pass logits vs the chunked loss.

    python bench/loss_memory.py [--tokens 4096] [--hidden 2048] [--rounds 2] [--out bench/results/loss-memory.json]

Each measurement is its own process (so its max RSS is the loss's alone): the LM head's weight [vocab x hidden],
``--tokens`` response positions' hidden states, forward + backward of the summed log-probability of the targets.
``one_pass`` is what the loss did before (all logits at once, log-softmax, gather: ``tokens x vocab`` fp32 three
times over); ``chunked`` is ``hwcompat.train.objectives.linear_logps.target_logps``. Alternating, ``--rounds`` each;
the table gives the median peak RSS above the process's baseline (weights and inputs loaded) and the step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[5])
from hwcompat.train.objectives.linear_logps import target_logps
kind, tokens, hidden, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
h = torch.randn(tokens, hidden, requires_grad=True)
y = torch.randint(0, vocab, (tokens,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.time()
if kind == "one_pass":
    logp = head(h).float().log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
else:
    logp = target_logps(head, h, y)
(-logp.sum()).backward()
elapsed = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": elapsed, "peak_above_baseline_bytes": peak - base, "peak_rss_bytes": peak,
                  "loss": float(-logp.sum()), "grad_norm": float(h.grad.norm())}))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "loss-memory.json"))
    args = ap.parse_args()
    runs: dict[str, list] = {"one_pass": [], "chunked": []}
    for r in range(args.rounds):
        for kind in (("one_pass", "chunked") if r % 2 == 0 else ("chunked", "one_pass")):
            res = subprocess.run([sys.executable, "-c", CHILD, kind, str(args.tokens), str(args.hidden),
                                  str(args.vocab), str(ROOT)], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(kind, runs[kind][-1], flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("seconds", "peak_above_baseline_bytes")}
           for k, v in runs.items()}
    a, b = runs["one_pass"][0], runs["chunked"][0]
    report = {"benchmark": "loss_memory", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "median": med, "runs": runs,
              "memory_ratio": med["chunked"]["peak_above_baseline_bytes"] / med["one_pass"]["peak_above_baseline_bytes"],
              "time_ratio": med["chunked"]["seconds"] / med["one_pass"]["seconds"],
              "same_loss": abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]),
              "same_grad_norm": abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"])}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'':10} {'peak above baseline':>20} {'seconds':>9}")
    for k, v in med.items():
        print(f"{k:10} {v['peak_above_baseline_bytes'] / 2**30:17.2f} GiB {v['seconds']:9.2f}")
    print(f"chunked / one_pass: memory {report['memory_ratio']:.3f}x, time {report['time_ratio']:.2f}x; "
          f"same loss {report['same_loss']}, same gradient norm {report['same_grad_norm']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
