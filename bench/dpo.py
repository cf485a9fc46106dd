"""DPO speed and held-out reward accuracy: `hwcompat train method=dpo` vs TRL's DPOTrainer, one run, same pairs.

    python bench/dpo.py [--pairs 64] [--batch 4] [--out bench/results/dpo.json] [--trl-python PY]

Same model (SmolLM2-135M-Instruct from the demo's package), same preference pairs (the demo's, conversational
form so both apply the model's chat template), one epoch over the same ``--pairs`` training pairs, same LoRA
(r=16, alpha=32, all linear layers, no dropout), learning rate, beta and max length; held-out reward accuracy on
the demo's eval pairs. TRL runs with its CPU-friendly settings (precomputed reference log-probabilities, the
adapter-disabled reference, no mixed precision). Throughput is pairs per second of training time (the same
pairs on both sides, so it is proportional to tokens per second). `--trl-python` names an interpreter with
TRL installed (e.g. a venv made with --system-site-packages), so hwcompat's own environment stays as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "hwcompat" / "demo" / "data"
SETTINGS = {"lora_r": 16, "lora_alpha": 32, "lr": 5e-4, "beta": 0.1, "max_len": 256}


def _conversational(rows: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_hwcompat(model: str, train: Path, evals: Path, args, tmp: Path) -> dict:
    import yaml

    steps = args.pairs // args.batch
    cfg = {"model": model, "method": "dpo", "train_data": [str(train)], "eval_data": [str(evals)],
           "lora_r": SETTINGS["lora_r"], "lora_alpha": SETTINGS["lora_alpha"], "lora_dropout": 0.0,
           "learning_rate": SETTINGS["lr"], "beta": SETTINGS["beta"], "max_seq_len": SETTINGS["max_len"],
           "micro_batch_size": args.batch, "max_steps": steps, "warmup_ratio": 0.0, "lr_schedule": "constant",
           "eval_at_start": False, "eval_metrics": "none", "output_dir": str(tmp / "hw"), "seed": args.seed}
    (tmp / "hw.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "hwcompat", "train", str(tmp / "hw.yaml")], capture_output=True,
                         text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"hwcompat failed:\n{res.stderr[-3000:]}")
    s = json.loads((tmp / "hw" / "summary.json").read_text())
    return {"train_seconds": s["train_seconds"], "pairs_per_s": steps * args.batch / s["train_seconds"],
            "reward_accuracy": s["eval_after"]["reward_accuracy"], "eval_loss": s["eval_after"]["eval_loss"],
            "peak_memory_bytes": s["peak_memory_bytes"]}


TRL_SCRIPT = textwrap.dedent('''
    import json, resource, sys, time, torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    a = json.loads(sys.argv[1])
    torch.manual_seed(a["seed"])
    tok = AutoTokenizer.from_pretrained(a["model"])
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    rows = lambda p: [json.loads(l) for l in open(p)]
    cfg = DPOConfig(output_dir=a["out"], per_device_train_batch_size=a["batch"], per_device_eval_batch_size=a["batch"],
                    num_train_epochs=1, learning_rate=a["lr"], beta=a["beta"], max_length=a["max_len"],
                    lr_scheduler_type="constant", warmup_steps=0, precompute_ref_log_probs=True, report_to=[],
                    logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=a["seed"],
                    dataloader_num_workers=0)
    peft = LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows(a["train"])),
                         eval_dataset=Dataset.from_list(rows(a["eval"])), processing_class=tok, peft_config=peft)
    m = trainer.train().metrics
    ev = trainer.evaluate()
    print(json.dumps({"train_seconds": m["train_runtime"], "reward_accuracy": ev["eval_rewards/accuracies"],
                      "eval_loss": ev["eval_loss"],
                      "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
''')


def run_trl(python: str, model: str, train: Path, evals: Path, args, tmp: Path) -> dict:
    a = {"model": model, "train": str(train), "eval": str(evals), "batch": args.batch, "lr": SETTINGS["lr"],
         "beta": SETTINGS["beta"], "max_len": SETTINGS["max_len"], "r": SETTINGS["lora_r"],
         "alpha": SETTINGS["lora_alpha"], "out": str(tmp / "trl"), "seed": args.seed}
    res = subprocess.run([python, "-c", TRL_SCRIPT, json.dumps(a)], capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if res.returncode != 0:
        raise SystemExit(f"TRL failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["pairs_per_s"] = args.pairs / out["train_seconds"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64, help="training pairs (one epoch)")
    ap.add_argument("--eval-pairs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="both sides: LoRA init and data order")
    ap.add_argument("--trl-python", default=sys.executable)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo.json"))
    args = ap.parse_args()
    from hwcompat.demo.model import ensure_model

    model = str(ensure_model())
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as t:
        tmp = Path(t)
        read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
        train = _write(tmp / "train.jsonl", _conversational(read(DATA / "pairs_train.jsonl")[:args.pairs]))
        evals = _write(tmp / "eval.jsonl", _conversational(read(DATA / "pairs_eval.jsonl")[:args.eval_pairs]))
        results = {"hwcompat": run_hwcompat(model, train, evals, args, tmp),
                   "trl DPOTrainer": run_trl(args.trl_python, model, train, evals, args, tmp)}
    ratio = results["hwcompat"]["pairs_per_s"] / results["trl DPOTrainer"]["pairs_per_s"]
    report = {"benchmark": "dpo", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "settings": {**SETTINGS, **vars(args)}, "results": results, "speed_ratio_hwcompat_vs_trl": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':16} {'pairs/s':>8} {'train s':>8} {'reward acc':>10} {'eval loss':>9} {'peak RSS':>9}")
    for name, r in results.items():
        print(f"{name:16} {r['pairs_per_s']:8.3f} {r['train_seconds']:8.1f} {r['reward_accuracy']:10.3f} "
              f"{r['eval_loss']:9.4f} {r['peak_memory_bytes'] / 2**30:8.2f}G")
    print(f"hwcompat / TRL speed: {ratio:.2f}x (goal >= 1.5x)\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
