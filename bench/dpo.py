"""DPO speed and held-out reward accuracy: `hwcompat train method=dpo` vs TRL's DPOTrainer, one run, same pairs.

    python bench/dpo.py [--pairs 64] [--batch 4] [--out bench/results/dpo.json] [--trl-python PY] [--rounds 1]
                        [--variants hwcompat,trl_dpo_bf16,hwcompat_fp32,trl_dpo_fp32]

Same model (SmolLM2-135M-Instruct from the demo's package), same preference pairs (the demo's, conversational
form so both apply the model's chat template), one epoch over the same ``--pairs`` training pairs, same LoRA
(r=16, alpha=32, all linear layers, no dropout), learning rate, beta and max length; held-out reward accuracy on
the demo's eval pairs. TRL runs with its CPU-friendly settings (precomputed reference log-probabilities, the
adapter-disabled reference), in fp32 and, as a careful user sets it on a CPU with native bf16, in bf16 with
tcmalloc preloaded (``trl_dpo_bf16``); hwcompat runs at its defaults (the CPU profile's dtype) and in fp32. Variants
alternate over ``--rounds`` (the list, then reversed). Throughput is pairs per second of training time (the same
pairs on both sides, so it is proportional to tokens per second). Training time holds the same work on both sides:
hwcompat computes each training row's reference log-probabilities inside its loop (at the row's first use), TRL in
its constructor (``_precompute_ref_logps``), outside ``train_runtime``; TRL's time for the training split's
precompute is added to its ``train_runtime`` (both are kept in the result file: ``train_runtime``,
``ref_precompute_seconds``). Neither side counts the held-out pairs' reference or the evaluation. MFU: the FLOPs
each side computes per pair (``flops_per_pair``: hwcompat's prefix-shared row counts the prompt once) at its pairs/s,
over a GEMM peak measured in the run in its dtype. `--trl-python` names an interpreter with TRL installed (e.g. a
venv made with --system-site-packages), so hwcompat's own environment stays as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.train (the GEMM peak)
DATA = ROOT / "hwcompat" / "demo" / "data"
SETTINGS = {"lora_r": 16, "lora_alpha": 32, "lr": 5e-4, "beta": 0.1, "max_len": 256}


def _conversational(rows: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_hwcompat(model: str, train: Path, evals: Path, args, tmp: Path, name: str = "hw",
                 settings: dict | None = None) -> dict:
    import yaml

    steps = args.pairs // args.batch
    cfg = {**(settings or {}), "model": model, "method": "dpo", "train_data": [str(train)], "eval_data": [str(evals)],
           "lora_r": SETTINGS["lora_r"], "lora_alpha": SETTINGS["lora_alpha"], "lora_dropout": 0.0,
           "learning_rate": SETTINGS["lr"], "beta": SETTINGS["beta"], "max_seq_len": SETTINGS["max_len"],
           "micro_batch_size": args.batch, "max_steps": steps, "warmup_ratio": 0.0, "lr_schedule": "constant",
           "eval_at_start": False, "eval_metrics": "none", "output_dir": str(tmp / name), "seed": args.seed}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_") and k != "LD_PRELOAD"}
    res = subprocess.run([sys.executable, "-m", "hwcompat", "train", str(tmp / f"{name}.yaml")], capture_output=True,
                         text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise SystemExit(f"hwcompat failed:\n{res.stderr[-3000:]}")
    s = json.loads((tmp / name / "summary.json").read_text())
    return {"train_seconds": s["train_seconds"], "pairs_per_s": steps * args.batch / s["train_seconds"],
            "reward_accuracy": s["eval_after"]["reward_accuracy"], "eval_loss": s["eval_after"]["eval_loss"],
            "peak_memory_bytes": s["peak_memory_bytes"], "dtype": s["dtype"]}


TRL_SCRIPT = textwrap.dedent('''
    import json, resource, sys, time, torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    a = json.loads(sys.argv[1])
    spent = {}
    precompute = DPOTrainer._precompute_ref_logps
    def timed(self, dataset, name, *rest, **kw):  # TRL's reference pass runs in the constructor: time it
        t = time.perf_counter()
        out = precompute(self, dataset, name, *rest, **kw)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return out
    DPOTrainer._precompute_ref_logps = timed
    torch.manual_seed(a["seed"])
    tok = AutoTokenizer.from_pretrained(a["model"])
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
    torch.set_num_threads(a["threads"])
    rows = lambda p: [json.loads(l) for l in open(p)]
    cfg = DPOConfig(output_dir=a["out"], per_device_train_batch_size=a["batch"], per_device_eval_batch_size=a["batch"],
                    num_train_epochs=1, learning_rate=a["lr"], beta=a["beta"], max_length=a["max_len"],
                    lr_scheduler_type="constant", warmup_steps=0, precompute_ref_log_probs=True, report_to=[],
                    logging_steps=1, save_strategy="no", use_cpu=True, bf16=a["dtype"] == "bfloat16", fp16=False,
                    seed=a["seed"],
                    dataloader_num_workers=0)
    peft = LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows(a["train"])),
                         eval_dataset=Dataset.from_list(rows(a["eval"])), processing_class=tok, peft_config=peft)
    m = trainer.train().metrics
    ev = trainer.evaluate()
    assert "train" in spent, "TRL did not precompute the reference: the timing would not hold the same work"
    print(json.dumps({"train_seconds": m["train_runtime"] + spent["train"], "train_runtime": m["train_runtime"],
                      "ref_precompute_seconds": spent["train"], "reward_accuracy": ev["eval_rewards/accuracies"],
                      "eval_loss": ev["eval_loss"],
                      "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
''')


def run_trl(python: str, model: str, train: Path, evals: Path, args, tmp: Path, name: str = "trl",
            dtype: str = "float32", malloc: str = "system") -> dict:
    from hwcompat.probe.malloc import QUIET, find_tcmalloc

    a = {"model": model, "train": str(train), "eval": str(evals), "batch": args.batch, "lr": SETTINGS["lr"],
         "beta": SETTINGS["beta"], "max_len": SETTINGS["max_len"], "r": SETTINGS["lora_r"],
         "alpha": SETTINGS["lora_alpha"], "out": str(tmp / name), "seed": args.seed, "dtype": dtype,
         "threads": os.cpu_count() or 1}
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"TOKENIZERS_PARALLELISM": "false"}
    if malloc == "tcmalloc":
        env.update({"LD_PRELOAD": str(find_tcmalloc()), **QUIET})
    res = subprocess.run([python, "-c", TRL_SCRIPT, json.dumps(a)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"TRL failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["pairs_per_s"] = args.pairs / out["train_seconds"]
    out["dtype"], out["malloc"] = dtype, malloc
    return out


#: name -> (trainer, settings, malloc); hwcompat's settings are config keys, TRL's its dtype (issue #41 §3).
VARIANTS = {"hwcompat": ("hwcompat", {}, "auto"), "hwcompat_fp32": ("hwcompat", {"dtype": "float32"}, "auto"),
            "hwcompat_sdpa": ("hwcompat", {"attention": "sdpa"}, "auto"),  # bf16 without the cpu_bf16 kernel
            "trl_dpo_bf16": ("trl", {"dtype": "bfloat16"}, "tcmalloc"),
            "trl_dpo_fp32": ("trl", {"dtype": "float32"}, "tcmalloc"),
            "trl_dpo": ("trl", {"dtype": "float32"}, "system")}
DEFAULT_VARIANTS = "hwcompat,trl_dpo_bf16,hwcompat_fp32,trl_dpo_fp32"


def run_all(names: list[str], rounds: int, model: str, train: Path, evals: Path, args, tmp: Path) -> dict:
    """Every variant, alternating (the list, then reversed); per variant the median pairs/s, the highest memory."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(rounds):
        for n in (names if k % 2 == 0 else names[::-1]):
            trainer, settings, malloc = VARIANTS[n]
            r = (run_hwcompat(model, train, evals, args, tmp, f"{n}-{k}", settings) if trainer == "hwcompat" else
                 run_trl(args.trl_python, model, train, evals, args, tmp, f"{n}-{k}", settings["dtype"], malloc))
            runs[n].append(r)
            print(f"{n} round {k}: {r['pairs_per_s']:.3f} pairs/s", file=sys.stderr, flush=True)
    out = {}
    for n, rs in runs.items():
        out[n] = {**rs[0], "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                  "train_seconds": statistics.median(r["train_seconds"] for r in rs),
                  "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rs), "rounds": rs}
    return out


LABELS = {"hwcompat": "hwcompat (its defaults)", "hwcompat_fp32": "hwcompat, dtype=float32",
          "hwcompat_sdpa": "hwcompat, attention=sdpa",
          "trl_dpo_bf16": "TRL `DPOTrainer`, bf16, tcmalloc", "trl_dpo_fp32": "TRL `DPOTrainer`, fp32, tcmalloc",
          "trl_dpo": "TRL `DPOTrainer`, fp32 (its default)"}


def flops_per_pair(model: str, pairs: list[dict], max_len: int) -> dict:
    """The FLOPs each side computes per training pair: each row through the LoRA policy forward and backward
    (selftest.lora_flops_per_token: frozen weights 4 FLOPs/parameter, adapters 6, attention 6 x layers x seq x
    hidden) and the reference forward (frozen weights 2 FLOPs/parameter, attention 2 x layers x seq x hidden). TRL's
    rows are prompt + chosen and prompt + rejected; hwcompat's one row holds their common token prefix once
    (prefix sharing), so it computes fewer tokens per pair, counted as such."""
    from transformers import AutoTokenizer

    from hwcompat import selftest

    config = json.loads((Path(model) / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=False)

    def ids(messages) -> list[int]:
        out = tok.apply_chat_template(messages, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)[:max_len]  # transformers 5: an encoding

    two_rows, shared = 0, 0
    for p in pairs:
        c, r = ids(p["prompt"] + p["chosen"]), ids(p["prompt"] + p["rejected"])
        common = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        two_rows, shared = two_rows + len(c) + len(r), shared + len(c) + len(r) - common
    seq = two_rows / (2 * len(pairs))
    frozen = selftest.lora_flops_per_token(config, 0, 0) / 4  # parameters in the frozen products
    per_token = selftest.lora_flops_per_token(config, SETTINGS["lora_r"], int(seq)) + 2 * frozen + \
        2 * config["num_hidden_layers"] * seq * config["hidden_size"]
    return {"mean_row_tokens": seq, "flops_per_token": per_token, "two_rows_per_pair": per_token * two_rows /
            len(pairs), "prefix_shared_per_pair": per_token * shared / len(pairs)}


def add_mfu(report: dict, model: str, pairs: list[dict]) -> None:
    """MFU of each variant: the FLOPs it computes (flops_per_pair) at its pairs/s, over a GEMM peak measured now in
    its dtype (bench/train.py's gemm_peak, the model's projection shapes)."""
    from bench.train import gemm_peak

    count = flops_per_pair(model, pairs, SETTINGS["max_len"])
    config = json.loads((Path(model) / "config.json").read_text())
    rows = report["settings"]["batch"] * 2 * int(count["mean_row_tokens"])
    peaks = {d: gemm_peak(config, rows, os.cpu_count() or 1, d) for d in ("float32", "bfloat16")}
    report["model_flops"], report["gemm_peak"] = count, peaks
    for name, r in report["results"].items():
        per_pair = count["prefix_shared_per_pair" if name.startswith("hwcompat") else "two_rows_per_pair"]
        r["achieved_flops_per_s"] = r["pairs_per_s"] * per_pair
        r["mfu"] = r["achieved_flops_per_s"] / peaks[r["dtype"]]["peak_flops_per_s"]


def markdown_table(report: dict) -> str:
    """The result file as docs/cpu.md prints it (tests/test_docs.py compares them)."""
    mfu = "mfu" in next(iter(report["results"].values()))
    lines = ["| DPO | dtype | pairs/s (rounds) | held-out reward accuracy | eval loss | peak RSS |"
             + (" MFU (of the GEMM peak in its dtype) |" if mfu else ""), "|---|---|---|---|---|---|" + ("---|" * mfu)]
    for name, r in report["results"].items():
        rounds = ", ".join(f"{x['pairs_per_s']:.2f}" for x in r["rounds"])
        lines.append(f"| {LABELS[name]} | {r['dtype']} | {r['pairs_per_s']:.2f} ({rounds}) | "
                     f"{r['reward_accuracy']:.3f} | {r['eval_loss']:.4f} | {r['peak_memory_bytes'] / 2**30:.2f} GiB |"
                     + (f" {r['mfu']:.1%} |" if mfu else ""))
    best = report.get("trl_best")
    if best:
        lines.append(f"\nhwcompat at its defaults against TRL at its best ({LABELS[best]}): "
                     f"**{report['speed_ratio_hwcompat_vs_trl_best']:.2f}×** the pairs/s at "
                     f"{report['memory_ratio_hwcompat_vs_trl_best']:.2f}× the peak RSS (goal: ≥ 2.5×).")
        trl = report["results"][best]
        if "train_runtime" in trl:
            alone = report["settings"]["pairs"] / statistics.median(x["train_runtime"] for x in trl["rounds"])
            lines.append(f"\nTRL's training time includes its reference pass over the training pairs "
                         f"({statistics.median(x['ref_precompute_seconds'] for x in trl['rounds']):.1f} s, median), "
                         "which it runs in its constructor, before `train()`: hwcompat's loop holds the same pass. On "
                         f"`train_runtime` alone TRL ran {alone:.2f} pairs/s "
                         f"({report['results']['hwcompat']['pairs_per_s'] / alone:.2f}× for hwcompat).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64, help="training pairs (one epoch)")
    ap.add_argument("--eval-pairs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="both sides: LoRA init and data order")
    ap.add_argument("--trl-python", default=sys.executable)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo.json"))
    ap.add_argument("--table", metavar="RESULT.json", help="print a result file's markdown table (docs/cpu.md)")
    ap.add_argument("--add-mfu", metavar="RESULT.json", help="add MFU to a result file (a GEMM peak measured now)")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())), end="")
        return 0
    if args.add_mfu:  # a result file measured before MFU was counted: its pairs/s against a peak measured now
        from hwcompat.demo.model import ensure_model

        report = json.loads(Path(args.add_mfu).read_text())
        pairs = _conversational([json.loads(x) for x in (DATA / "pairs_train.jsonl").read_text().splitlines()]
                                [:report["settings"]["pairs"]])
        add_mfu(report, str(ensure_model()), pairs)
        Path(args.add_mfu).write_text(json.dumps(report, indent=2) + "\n")
        print(markdown_table(report), end="")
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if "hwcompat" not in names or any(n not in VARIANTS for n in names):
        ap.error(f"--variants: hwcompat and any of {', '.join(VARIANTS)}")
    from hwcompat.demo.model import ensure_model

    model = str(ensure_model())
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as t:
        tmp = Path(t)
        read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
        train = _write(tmp / "train.jsonl", _conversational(read(DATA / "pairs_train.jsonl")[:args.pairs]))
        evals = _write(tmp / "eval.jsonl", _conversational(read(DATA / "pairs_eval.jsonl")[:args.eval_pairs]))
        results = run_all(names, args.rounds, model, train, evals, args, tmp)
    hw = results["hwcompat"]
    ratios = {n: {"speed": hw["pairs_per_s"] / r["pairs_per_s"],
                  "memory": hw["peak_memory_bytes"] / r["peak_memory_bytes"]}
              for n, r in results.items() if n != "hwcompat"}
    trl = [n for n in results if n.startswith("trl")]
    best = max(trl, key=lambda n: results[n]["pairs_per_s"]) if trl else None
    report = {"benchmark": "dpo", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "settings": {**SETTINGS, **vars(args)}, "results": results, "ratios": ratios, "trl_best": best,
              "speed_ratio_hwcompat_vs_trl_best": ratios[best]["speed"] if best else None,
              "memory_ratio_hwcompat_vs_trl_best": ratios[best]["memory"] if best else None}
    add_mfu(report, model, _conversational(read(DATA / "pairs_train.jsonl")[:args.pairs]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':16} {'dtype':>9} {'pairs/s':>8} {'train s':>8} {'reward acc':>10} {'eval loss':>9} {'peak RSS':>9}")
    for name, r in results.items():
        print(f"{name:16} {r['dtype']:>9} {r['pairs_per_s']:8.3f} {r['train_seconds']:8.1f} "
              f"{r['reward_accuracy']:10.3f} {r['eval_loss']:9.4f} {r['peak_memory_bytes'] / 2**30:8.2f}G")
    for n, q in ratios.items():
        print(f"hwcompat vs {n}: {q['speed']:.2f}x pairs/s, {q['memory']:.2f}x memory")
    if best:
        print(f"vs TRL at its best ({best}): {ratios[best]['speed']:.2f}x (goal >= 2.5x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
