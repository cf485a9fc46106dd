"""GRPO speed, memory and reward: `hwcompat train method=grpo` vs TRL's GRPOTrainer, alternating, one run.

    python bench/grpo.py [--steps 8] [--prompts 2] [--generations 4] [--completion 96] [--rounds 2]
                         [--init-adapter runs/demo/adapter] [--lr 2e-5] [--out bench/results/grpo.json]
    python bench/grpo.py --gpu [--smoke] [--steps 4] [--out bench/results/grpo-gpu-<card>.json]

``--gpu``: the same comparison on the card at hand, in bf16, on a random-weight model of Qwen2.5-0.5B's shape and
its 151,936-token vocabulary (a tokenizer of the demo's text, ids past it decode to nothing): where full logits
dominate TRL's memory and hwcompat's chunked log-probs do not hold them. Peak memory is each side's
``torch.cuda.max_memory_allocated``. ``--smoke`` checks the script on the CPU with tiny shapes.

Same model (SmolLM2-135M-Instruct from the demo's package), same prompts (the demo's extraction task, its
answers as references), same G, completion length, rewards (field F1 + JSON validity, hwcompat's row metrics on
both sides), LoRA (r=16, alpha=32, all linear, no dropout), learning rate, loss (dapo, beta 0, one step per
generation) and steps. TRL runs without vLLM (``use_vllm=False``: ``model.generate``), under tcmalloc; both run in
float32 and, where the CPU has bf16 (AVX512-BF16 / AMX), in bf16 too (hwcompat: ``dtype=bfloat16``); the headline
ratio is each engine at its faster setting, and the same-dtype ratios are beside it. Completions per second are completions
sampled over training seconds (rollouts included on both sides); the held-out figure is greedy answers to the
eval prompts after training, scored by the same metrics. Runs alternate (hwcompat, TRL, hwcompat, …) so a noisy
machine hits both alike; the table shows each engine's median round.
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
DATA = ROOT / "hwcompat" / "demo" / "data"
SETTINGS = {"lora_r": 16, "lora_alpha": 32, "lr": 2e-5, "max_len": 512, "temperature": 1.0}  # lr: --lr
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
ENGINES = ("hwcompat", "trl GRPOTrainer")
#: --gpu: Qwen2.5-0.5B's shape and vocabulary, random weights; --smoke: the script on the CPU
GPU_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936)
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096)


def _prompts(path: Path, n: int) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()][:n]
    return [{"prompt": [m for m in r["messages"] if m["role"] != "assistant"],
             "reference": next(m["content"] for m in reversed(r["messages"]) if m["role"] == "assistant")}
            for r in rows]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_hwcompat(model: str, train: Path, evals: Path, args, tmp: Path, bf16: bool) -> dict:
    import yaml

    data = _write(tmp / "hw-train.jsonl", [{"messages": r["prompt"] + [{"role": "assistant", "content": r["reference"]}]}
                                           for r in map(json.loads, train.read_text().splitlines())])
    held = _write(tmp / "hw-eval.jsonl", [{"messages": r["prompt"] + [{"role": "assistant", "content": r["reference"]}]}
                                          for r in map(json.loads, evals.read_text().splitlines())])
    out = tmp / "hw"
    cfg = {"model": model, "method": "grpo", "train_data": [str(data)], "eval_data": [str(held)],
           "rewards": ["field_f1", "json_valid"], "num_generations": args.generations,
           "micro_batch_size": args.generations * args.prompts, "max_completion_length": args.completion,
           "temperature": SETTINGS["temperature"], "lora_r": SETTINGS["lora_r"], "lora_alpha": SETTINGS["lora_alpha"],
           "lora_dropout": 0.0, "max_seq_len": SETTINGS["max_len"],
           "max_steps": args.steps, "warmup_ratio": 0.0, "lr_schedule": "constant", "eval_at_start": False,
           "eval_max_rows": args.eval_prompts, "output_dir": str(out), "seed": args.seed,
           "dtype": "bfloat16" if bf16 else "float32", "learning_rate": args.lr,
           **({"init_adapter": args.init_adapter} if args.init_adapter else {})}
    (tmp / "hw.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "hwcompat", "train", str(tmp / "hw.yaml"), "--overwrite"],
                         capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"hwcompat failed:\n{res.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    seconds = s["train_seconds"]
    return {"train_seconds": seconds, "completions_per_s": sum(r["completions"] for r in train) / seconds,
            "seconds_per_step": seconds / len(train), "train_reward": statistics.mean(r["reward"] for r in train),
            "completion_length": statistics.mean(r["completion_length"] for r in train),
            "held_out": {k: s["eval_after"].get(k) for k in ("field_f1", "json_valid", "reward")},
            "peak_rss_bytes": s["peak_memory_bytes"], "dtype": s["dtype"],
            "peak_memory_bytes": s["peak_memory_bytes"] if s.get("peak_memory_kind", "").endswith("allocated") else None}


TRL_SCRIPT = textwrap.dedent('''
    import json, resource, statistics, sys, time, torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from hwcompat.data import metrics
    a = json.loads(sys.argv[1])
    torch.manual_seed(a["seed"])
    tok = AutoTokenizer.from_pretrained(a["model"], trust_remote_code=False)
    tok.pad_token = tok.pad_token or tok.eos_token
    dtype = torch.bfloat16 if a["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=dtype, trust_remote_code=False)
    rows = lambda p: [json.loads(l) for l in open(p)]
    text = lambda c: c[0]["content"] if isinstance(c, list) else c
    def field_f1(prompts, completions, reference, **kw):
        return [metrics.row_score("field_f1", text(c).strip(), r) for c, r in zip(completions, reference)]
    def json_valid(prompts, completions, reference, **kw):
        return [metrics.row_score("json_valid", text(c).strip(), r) for c, r in zip(completions, reference)]
    cfg = GRPOConfig(output_dir=a["out"], per_device_train_batch_size=a["batch"], num_generations=a["g"],
                     max_completion_length=a["completion"], learning_rate=a["lr"], max_steps=a["steps"],
                     lr_scheduler_type="constant", warmup_steps=0, temperature=a["temperature"], beta=0.0,
                     loss_type="dapo", scale_rewards="group", num_iterations=1, use_vllm=False, report_to=[],
                     logging_steps=1, save_strategy="no", use_cpu=not a["gpu"], bf16=a["bf16"], fp16=False,
                     seed=a["seed"],
                     dataloader_num_workers=0, gradient_accumulation_steps=1)
    peft = LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    if a["adapter"]:  # from an SFT adapter, trained further (as hwcompat's init_adapter)
        from peft import PeftModel
        model, peft = PeftModel.from_pretrained(model, a["adapter"], is_trainable=True), None
    trainer = GRPOTrainer(model=model, args=cfg, reward_funcs=[field_f1, json_valid],
                          train_dataset=Dataset.from_list(rows(a["train"])), processing_class=tok, peft_config=peft)
    if a["gpu"]:
        torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    gpu_peak = torch.cuda.max_memory_allocated() if a["gpu"] else None
    m = trainer.model.eval()
    preds = []
    with torch.no_grad():
        for r in rows(a["eval"]):
            ids = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            gen = m.generate(**ids.to(m.device), max_new_tokens=a["completion"], do_sample=False)
            preds.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    refs = [r["reference"] for r in rows(a["eval"])]
    score = metrics.score(preds, refs, "json")
    reward = statistics.mean(metrics.row_score("field_f1", p, r) + metrics.row_score("json_valid", p, r)
                             for p, r in zip(preds, refs))
    print(json.dumps({"train_seconds": out.metrics["train_runtime"],
                      "train_reward": statistics.mean(h["reward"] for h in logs),
                      "completion_length": statistics.mean(h.get("completions/mean_length", 0) for h in logs),
                      "held_out": {"field_f1": score["field_f1"], "json_valid": score["json_valid"], "reward": reward},
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_memory_bytes": gpu_peak,
                      "dtype": str(dtype).replace("torch.", "")}))
''')


def run_trl(python: str, model: str, train: Path, evals: Path, args, tmp: Path, bf16: bool) -> dict:
    a = {"model": model, "train": str(train), "eval": str(evals), "batch": args.generations * args.prompts,
         "g": args.generations, "completion": args.completion, "lr": args.lr, "steps": args.steps,
         "adapter": args.init_adapter,
         "temperature": SETTINGS["temperature"], "r": SETTINGS["lora_r"], "alpha": SETTINGS["lora_alpha"],
         "out": str(tmp / "trl"), "seed": args.seed, "bf16": bf16, "gpu": bool(getattr(args, "on_gpu", False))}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    if Path(TCMALLOC).exists():
        env["LD_PRELOAD"] = TCMALLOC
    res = subprocess.run([python, "-c", TRL_SCRIPT, json.dumps(a)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"TRL failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    completions = args.steps * args.generations * args.prompts
    out.update(completions_per_s=completions / out["train_seconds"], seconds_per_step=out["train_seconds"] / args.steps)
    return out


def _cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _median(runs: list[dict]) -> dict:
    ranked = sorted(runs, key=lambda r: r["completions_per_s"])
    return ranked[len(ranked) // 2]


def random_model(path: Path, shape: dict[str, int], texts: list[str], dtype: str) -> Path:
    """A random-weight Llama of ``shape`` (tied head, as Qwen2.5-0.5B) with a ChatML tokenizer of ``texts``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hwcompat.train.tiny import build_tokenizer

    tok = build_tokenizer(texts, vocab_size=512, chat_template=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def gpu_main(args) -> int:
    """hwcompat vs TRL on the card, bf16, alternating, at a 151,936-token vocabulary; memory is the device's."""
    import torch

    args.on_gpu = torch.cuda.is_available() and not args.smoke
    if not args.on_gpu and not args.smoke:
        print("grpo --gpu: no GPU (add --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    shape = GPU_SHAPE if args.on_gpu else SMOKE_SHAPE
    device = torch.cuda.get_device_name(0) if args.on_gpu else "cpu (smoke)"
    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-gpu-") as t:
        tmp = Path(t)
        train = _write(tmp / "train.jsonl", _prompts(DATA / "train.jsonl", args.steps * args.prompts))
        evals = _write(tmp / "eval.jsonl", _prompts(DATA / "eval.jsonl", args.eval_prompts))
        texts = [json.dumps(r) for r in map(json.loads, (DATA / "train.jsonl").read_text().splitlines())]
        model = str(random_model(tmp / "model", shape, texts, "bfloat16" if args.on_gpu else "float32"))
        bf16 = args.on_gpu
        for _ in range(args.rounds):
            runs["hwcompat"].append(run_hwcompat(model, train, evals, args, tmp, bf16))
            runs["trl GRPOTrainer"].append(run_trl(args.trl_python, model, train, evals, args, tmp, bf16))
    results = {k: _median(v) for k, v in runs.items()}
    hw, trl = results["hwcompat"], results["trl GRPOTrainer"]
    key = "peak_memory_bytes" if args.on_gpu else "peak_rss_bytes"
    report = {"benchmark": "grpo_gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device, "smoke": args.smoke, "torch": torch.__version__, "shape": shape,
              "settings": {**SETTINGS, **{k: v for k, v in vars(args).items() if k != "on_gpu"}},
              "results": results, "runs": runs,
              "speed_ratio_hwcompat_vs_trl": hw["completions_per_s"] / trl["completions_per_s"],
              "memory_ratio_hwcompat_vs_trl": hw[key] / trl[key] if hw[key] and trl[key] else None}
    slug = "smoke" if args.smoke else "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    out = Path(args.out if args.out_given else ROOT / "bench" / "results" / f"grpo-gpu-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:18} {r['completions_per_s']:8.2f} completions/s, {r['seconds_per_step']:6.2f} s/step, "
              f"peak {(r[key] or 0) / 2**30:6.2f} GiB ({'device' if args.on_gpu else 'RSS'})")
    mem = report["memory_ratio_hwcompat_vs_trl"]
    print(f"hwcompat / TRL: {report['speed_ratio_hwcompat_vs_trl']:.2f}x completions/s (goal >= 2x)"
          + (f", {mem:.2f}x the peak memory" if mem else "") + f"\nwrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="G, completions per prompt")
    ap.add_argument("--completion", type=int, default=96, help="max_completion_length (the demo answers need ~60)")
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=SETTINGS["lr"])
    ap.add_argument("--init-adapter", help="start both from this LoRA adapter (e.g. runs/demo/adapter, the SFT "
                                           "demo's: the demo's GRPO stage, where answers end and are scored)")
    ap.add_argument("--trl-python", default=sys.executable)
    ap.add_argument("--out", default=None, help="default bench/results/grpo.json (--gpu: grpo-gpu-<card>.json)")
    ap.add_argument("--gpu", action="store_true", help="the card at hand, bf16, a 151,936-token vocabulary")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: tiny shapes on the CPU (the script works)")
    args = ap.parse_args()
    args.out_given = args.out is not None
    if args.gpu:
        return gpu_main(args)
    args.out = args.out or str(ROOT / "bench" / "results" / "grpo.json")
    from hwcompat.demo.model import ensure_model

    model = str(ensure_model())
    dtypes = ("float32", "bfloat16") if _cpu_bf16() else ("float32",)
    runs: dict[str, list[dict]] = {f"{e} {d}": [] for d in dtypes for e in ENGINES}
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as t:
        tmp = Path(t)
        train = _write(tmp / "train.jsonl", _prompts(DATA / "train.jsonl", args.steps * args.prompts))
        evals = _write(tmp / "eval.jsonl", _prompts(DATA / "eval.jsonl", args.eval_prompts))
        for _ in range(args.rounds):  # alternating: each engine and dtype once per round
            for d in dtypes:
                runs[f"hwcompat {d}"].append(run_hwcompat(model, train, evals, args, tmp, d == "bfloat16"))
                runs[f"trl GRPOTrainer {d}"].append(run_trl(args.trl_python, model, train, evals, args, tmp,
                                                            d == "bfloat16"))
    results = {k: _median(v) for k, v in runs.items()}
    best = {e: max((results[f"{e} {d}"] for d in dtypes), key=lambda r: r["completions_per_s"]) for e in ENGINES}
    ratio = best["hwcompat"]["completions_per_s"] / best["trl GRPOTrainer"]["completions_per_s"]
    memory = best["hwcompat"]["peak_rss_bytes"] / best["trl GRPOTrainer"]["peak_rss_bytes"]
    same = {d: results[f"hwcompat {d}"]["completions_per_s"] / results[f"trl GRPOTrainer {d}"]["completions_per_s"]
            for d in dtypes}
    report = {"benchmark": "grpo", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "settings": {**SETTINGS, **vars(args)}, "results": results, "runs": runs,
              "speed_ratio_hwcompat_vs_trl": ratio, "speed_ratio_same_dtype": same,
              "peak_rss_ratio_hwcompat_vs_trl": memory}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':26} {'compl/s':>8} {'s/step':>7} {'reward':>7} {'held-out F1':>11} {'json':>5} {'peak RSS':>9}")
    for name, r in results.items():
        h = r["held_out"]
        print(f"{name:26} {r['completions_per_s']:8.3f} {r['seconds_per_step']:7.2f} {r['train_reward']:7.3f} "
              f"{h['field_f1']:11.3f} {h['json_valid']:5.2f} {r['peak_rss_bytes'] / 2**30:8.2f}G")
    print(f"hwcompat / TRL completions/s, each at its best: {ratio:.2f}x (goal >= 2x); same dtype: "
          + ", ".join(f"{d} {v:.2f}x" for d, v in same.items()) + f"; peak RSS {memory:.2f}x\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
