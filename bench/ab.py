"""Before/after: the same `hwcompat train` runs from two git revisions, alternating, on this machine.

    python bench/ab.py BEFORE AFTER [--rounds 2] [--jobs sft,dpo,demo] [--out bench/results/ab.json]

A refactor must not cost speed (README, "Standards"). Shared machines are noisy, so each round runs every job
once from each revision, in alternating order (A B, then B A), and the table reports the median of each side and
the ratio after/before. Jobs: ``sft`` (bench/train.py's data: prompts 30-400 tokens, SmolLM2-135M, 20 steps x 8),
``dpo`` (the demo's pairs, 16 steps x 4), ``grpo`` (the demo's rows, 6 steps of 4 completions, field F1 + JSON
validity; its eval reward must stay identical too), ``demo`` (`hwcompat demo`: its eval loss and task metrics, which a
behaviour-preserving change must leave identical). Each revision runs from its own `git worktree` with
PYTHONPATH pointing at it, so the installed hwcompat is not the one measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    return where


def job_configs(tmp: Path) -> dict[str, dict]:
    import train as sft_bench  # bench/train.py
    from hwcompat.demo.model import ensure_model

    model = str(ensure_model())
    train, evals = sft_bench.make_data(tmp, n_train=160, n_eval=48)
    data = ROOT / "hwcompat" / "demo" / "data"
    threads = os.cpu_count() or 1
    common = {"model": model, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "warmup_ratio": 0.0,
              "eval_at_start": False, "eval_metrics": "none", "num_threads": threads}
    return {
        "sft": {**common, "train_data": [str(train)], "eval_data": [str(evals)], "max_seq_len": 512,
                "max_steps": 20, "learning_rate": 1e-3, "micro_batch_size": 8, "chat_template": "false"},
        "dpo": {**common, "method": "dpo", "train_data": [str(data / "pairs_train.jsonl")],
                "eval_data": [str(data / "pairs_eval.jsonl")], "max_seq_len": 256, "max_steps": 16,
                "learning_rate": 5e-4, "beta": 0.1, "micro_batch_size": 4, "lr_schedule": "constant"},
        "grpo": {**common, "method": "grpo", "train_data": [str(data / "train.jsonl")],
                 "eval_data": [str(data / "eval.jsonl")], "max_seq_len": 384, "max_steps": 6, "learning_rate": 5e-5,
                 "num_generations": 4, "max_completion_length": 32, "rewards": ["field_f1", "json_valid"],
                 "eval_max_rows": 8, "seed": 1},
    }


def run_one(tree: Path, job: str, cfg: dict | None, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    env["PYTHONPATH"] = str(tree)
    if job == "demo":
        cmd = [sys.executable, "-m", "hwcompat", "demo", f"output_dir={out}"]
    else:
        (out.parent / f"{out.name}.yaml").write_text(json.dumps({**cfg, "output_dir": str(out)}))
        cmd = [sys.executable, "-m", "hwcompat", "train", str(out.parent / f"{out.name}.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if res.returncode:
        raise SystemExit(f"{job} from {tree} failed:\n{res.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    after = s.get("eval_after") or {}
    return {"tokens_per_s": s.get("tokens_per_s"), "train_seconds": s["train_seconds"],
            "peak_memory_bytes": s.get("peak_memory_bytes"),
            **{k: v for k, v in after.items() if isinstance(v, (int, float))}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", default="sft,dpo,grpo,demo")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ab.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hwcompat-ab-"))
    revs = {"before": args.before, "after": args.after}
    trees = {side: worktree(rev, tmp / side) for side, rev in revs.items()}
    configs = job_configs(tmp)
    jobs = args.jobs.split(",")
    runs: dict[str, dict[str, list]] = {j: {"before": [], "after": []} for j in jobs}
    try:
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for job in jobs:
                for side in order:
                    res = run_one(trees[side], job, configs.get(job), tmp / f"{job}-{side}-{r}")
                    runs[job][side].append(res)
                    print(f"round {r} {job:5} {side:6} {json.dumps(res)}", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    table = {}
    for job, sides in runs.items():
        table[job] = {}
        for key in sides["before"][0]:
            vals = {s: [x[key] for x in sides[s] if x.get(key) is not None] for s in sides}
            if not vals["before"] or not vals["after"]:
                continue
            b, a = statistics.median(vals["before"]), statistics.median(vals["after"])
            table[job][key] = {"before": b, "after": a, "ratio": a / b if b else None}
    report = {"benchmark": "ab", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "before": args.before, "after": args.after, "rounds": args.rounds, "median": table, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'job':5} {'figure':24} {'before':>12} {'after':>12} {'after/before':>13}")
    for job, figs in table.items():
        for key, v in figs.items():
            ratio = f"{v['ratio']:.3f}" if v["ratio"] is not None else "-"
            print(f"{job:5} {key:24} {v['before']:12.4g} {v['after']:12.4g} {ratio:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
