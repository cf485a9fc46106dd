"""Tokens/s of `hwcompat train` at its defaults vs TRL's SFTTrainer at its best CPU settings (and the plain
transformers Trainer + PEFT script from the docs).

    python bench/train.py [--model smollm2|small] [--steps 20] [--batch 8] [--trl-python PY] [--rounds 2]
                          [--variants hwcompat,trl_sft_bf16,hwcompat_fp32,trl_sft_fp32] [--out FILE.json]
    python bench/train.py --gpu [--smoke] [--trl-python PY] [--out bench/results/train-gpu-<card>.json]

Same model, data, max sequence length, batch size, steps, learning rate and LoRA config, each variant in its own
process, alternating (the list, then reversed) over ``--rounds``; tokens/s is each variant's median. TRL runs as a
careful user sets it on a CPU: completion-only loss, length-grouped sampling, tcmalloc preloaded, and bf16 where
the CPU has native bf16 (``trl_sft_bf16``). Data has a realistic length spread (prompts 30-400 tokens). Tokens/s
counts real tokens only (no padding), over the training phase only. Every adapter is then scored by the same
token-weighted fp32 eval loss on the same eval rows. Goal: >= 2.5x the fastest TRL variant's tokens/s at no more
peak memory and no worse eval loss.

MFU on the CPU: each run's achieved FLOP/s (tokens/s x the LoRA count per token the GPU bench uses:
``selftest.lora_flops_per_token``, frozen weights 4 FLOPs, trained 6, attention at the data's mean row length) over
a peak measured in the same run: ``torch.mm`` at the model's own linear shapes (rows = a micro-batch of mean-length
rows), in float32 and bfloat16, on the run's threads; the best shape's rate is the peak a run could reach.

``--gpu``: the same comparison on the card at hand (see ``gpu_main``): a random-weight Llama of TinyLlama's
shape built from a config, `hwcompat train` and TRL's SFTTrainer each in bf16 and in fp16 (fp16 under a
GradScaler, the Volta/Turing path), tokens/s after warm-up, peak device memory, and MFU counted both as NeMo
AutoModel counts it (model FLOPs) and as a LoRA run does its work. ``--smoke`` runs it on the CPU, tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("ticket printer network invoice refund login password server outage billing shipment delay "
         "customer account update error warning cable router screen battery license upgrade").split()


def make_data(tmp: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)

    def row():
        n = rng.randint(30, 400)  # prompt length in words ~ tokens for this vocabulary
        words = [rng.choice(WORDS) for _ in range(n)]
        label = max(("billing", "network", "account"), key=lambda k: sum(w in k or k in w for w in words))
        return {"prompt": "Classify the ticket: " + " ".join(words), "completion": label}

    train, evals = tmp / "train.jsonl", tmp / "eval.jsonl"
    train.write_text("".join(json.dumps(row()) + "\n" for _ in range(n_train)))
    evals.write_text("".join(json.dumps(row()) + "\n" for _ in range(n_eval)))
    return train, evals


def make_model(kind: str, tmp: Path, train: Path) -> Path:
    if kind == "smollm2":
        from hwcompat.demo.model import ensure_model
        return ensure_model()
    from hwcompat.train.tiny import write_tiny
    texts = [json.loads(x)["prompt"] for x in train.read_text().splitlines()[:200]]
    return write_tiny(tmp / "model", texts, chat_template=False, hidden=256, layers=4, heads=8)


PLAIN = r'''
# The plain script a user writes from the transformers + PEFT docs (prompt tokens masked, fair to it).
import json, sys, time, torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments,
                          DataCollatorForSeq2Seq)
from peft import LoraConfig, get_peft_model
model_dir, train_file, out, steps, batch, max_len, lr, threads = sys.argv[1:9]
torch.set_num_threads(int(threads))
tok = AutoTokenizer.from_pretrained(model_dir)
tok.pad_token = tok.pad_token or tok.eos_token
def encode(r):
    p = tok("### User:\n" + r["prompt"] + "\n\n### Assistant:\n")["input_ids"]
    c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + c)[:int(max_len)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(p) + c)[:int(max_len)]}
rows = [json.loads(x) for x in open(train_file)]
ds = [encode(r) for r in rows]  # a list is a valid torch Dataset
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps),
                         learning_rate=float(lr), lr_scheduler_type="cosine", logging_steps=10, save_strategy="no",
                         report_to=[], seed=42, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
tokens = {"n": 0}
collator = DataCollatorForSeq2Seq(tok, padding=True)
def counting(features):
    tokens["n"] += sum(len(f["input_ids"]) for f in features)
    return collator(features)
trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting)
t = time.time()
trainer.train()
elapsed = time.time() - t
model.save_pretrained(out + "/adapter")
import resource
print(json.dumps({"train_seconds": elapsed, "real_tokens": tokens["n"],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


TRL = r'''
# TRL's SFTTrainer at its best CPU settings: completion-only loss (prompt-completion rows), length-grouped sampling,
# bf16 mixed precision where asked (argv 9: float32 | bfloat16; the careful user's flag on a CPU with native bf16).
import json, resource, sys, time, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
model_dir, train_file, out, steps, batch, max_len, lr, threads, dtype = sys.argv[1:10]
torch.set_num_threads(int(threads))
tok = AutoTokenizer.from_pretrained(model_dir)
tok.pad_token = tok.pad_token or tok.eos_token
rows = [json.loads(x) for x in open(train_file)]
ds = Dataset.from_list([{"prompt": "### User:\n" + r["prompt"] + "\n\n### Assistant:\n",
                         "completion": r["completion"] + tok.eos_token} for r in rows])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
args = SFTConfig(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps), learning_rate=float(lr),
                 lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to=[], seed=42,
                 dataloader_num_workers=0, use_cpu=True, bf16=dtype == "bfloat16", fp16=False,
                 max_length=int(max_len), completion_only_loss=True, train_sampling_strategy="group_by_length")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
t = time.time()
trainer.train()
elapsed = time.time() - t
trainer.model.save_pretrained(out + "/adapter")
used = min(len(trainer.train_dataset), int(steps) * int(batch))
tokens = sum(len(x) for x in trainer.train_dataset["input_ids"][:used])
print(json.dumps({"train_seconds": elapsed, "real_tokens": tokens,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


TRL_TIMED = r"""
# TRL's SFTTrainer on the card: completion-only loss, length-grouped sampling, bf16 or fp16 mixed precision.
# Tokens are counted from the batches the collator hands over; time and tokens after WARMUP steps are kept apart.
import json, sys, time, torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
model_dir, train_file, out, steps, batch, max_len, lr, dtype, warmup = sys.argv[1:10]
cuda = torch.cuda.is_available()
tok = AutoTokenizer.from_pretrained(model_dir)
tok.pad_token = tok.pad_token or tok.eos_token
rows = [json.loads(x) for x in open(train_file)]
ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"] + tok.eos_token} for r in rows])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
args = SFTConfig(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps), learning_rate=float(lr),
                 lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to=[], seed=42,
                 dataloader_num_workers=0, use_cpu=not cuda, bf16=dtype == "bfloat16", fp16=dtype == "float16",
                 max_length=int(max_len), completion_only_loss=True, train_sampling_strategy="group_by_length")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
seen = {"tokens": 0, "marks": []}
collate = trainer.data_collator
def counting(features):
    b = collate(features)
    seen["tokens"] += int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
    return b
trainer.data_collator = counting
class Marks(TrainerCallback):
    def on_step_end(self, a, state, control, **kw):
        if cuda:
            torch.cuda.synchronize()
        seen["marks"].append((state.global_step, time.perf_counter(), seen["tokens"]))
trainer.add_callback(Marks())
if cuda:
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
trainer.train()
total = time.perf_counter() - t
w = seen["marks"][int(warmup) - 1]
end = seen["marks"][-1]
print(json.dumps({"train_seconds": total, "real_tokens": seen["tokens"],
                  "tokens_per_s_after_warmup": (end[2] - w[2]) / (end[1] - w[1]),
                  "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                  "grad_checkpointing": bool(args.gradient_checkpointing)}))
"""

GPU_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape, random weights
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
GPU_WARMUP = 3  # steps not timed: allocation, autotuning, compilation


def _hwcompat_gpu(model: Path, data: tuple[Path, Path], tmp: Path, dtype: str, args, device_args: list[str]) -> dict:
    """`hwcompat train` with the card's profile and ``dtype``; tokens/s after warm-up from its metrics."""
    run = tmp / f"hw-{dtype}"
    cfg = {"model": str(model), "train_data": [str(data[0])], "eval_data": [str(data[1])], "max_seq_len": args.max_len,
           "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "max_steps": args.steps, "learning_rate": args.lr,
           "warmup_ratio": 0.0, "micro_batch_size": args.batch, "eval_at_start": False, "eval_metrics": "none",
           "eval_max_rows": 8, "chat_template": "false", "output_dir": str(run), "dtype": dtype,
           # smoke: the script is checked, not inductor's CPU compile (the path runs compile each dtype)
           **({"compile_backend": "eager"} if args.smoke else {})}
    (tmp / f"hw-{dtype}.yaml").write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "hwcompat", "train", str(tmp / f"hw-{dtype}.yaml"), *device_args],
                         capture_output=True, text=True, env=_bench_env())
    if res.returncode:
        return {"error": f"exit {res.returncode}", "stderr_tail": res.stderr[-1500:]}
    summary = json.loads((run / "summary.json").read_text())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train"]
    a, b = recs[GPU_WARMUP - 1], recs[-1]
    return {"tokens_per_s_after_warmup": (b["tokens"] - a["tokens"]) / (b["train_seconds"] - a["train_seconds"]),
            "train_seconds": summary["train_seconds"], "peak_memory_bytes": summary["peak_memory_bytes"],
            "peak_memory_kind": summary["peak_memory_kind"], "dtype": summary["dtype"],
            "compile_backend": summary["compile_backend"], "attention": summary["attention"],
            "profile": summary["profile"], "final_loss": recs[-1]["loss"]}


def _trl_gpu(python: str, model: Path, train: Path, tmp: Path, dtype: str, args) -> dict:
    (tmp / "trl_timed.py").write_text(TRL_TIMED)  # not trl.py: that name would shadow the package
    res = subprocess.run([python, str(tmp / "trl_timed.py"), str(model), str(train), str(tmp / f"trl-{dtype}"),
                          str(args.steps), str(args.batch), str(args.max_len), str(args.lr), dtype, str(GPU_WARMUP)],
                         capture_output=True, text=True, env={**_bench_env(), "TOKENIZERS_PARALLELISM": "false"})
    if res.returncode:
        return {"error": f"exit {res.returncode}", "stderr_tail": res.stderr[-1500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _has_trl(python: str) -> bool:
    return subprocess.run([python, "-c", "import trl, datasets"], capture_output=True).returncode == 0


def _mfu(entry: dict, config: dict, seq: int, peak: float | None) -> None:
    """Achieved TFLOP/s and MFU under both counts (NeMo's model FLOPs; the work a LoRA step really does)."""
    from hwcompat.selftest import lora_flops_per_token, model_flops_per_token

    tps = entry.get("tokens_per_s_after_warmup")
    if not tps:
        return
    for name, per_token in (("nemo", model_flops_per_token(config, seq)), ("lora", lora_flops_per_token(config, 16, seq))):
        tflops = tps * per_token / 1e12
        entry[f"tflops_{name}"] = tflops
        entry[f"mfu_{name}"] = tflops / peak if peak else None


def gpu_main(args) -> int:
    """hwcompat and TRL on the card at hand, bf16 and fp16, side by side in one run (alternating by dtype)."""
    import torch

    from hwcompat.profiles import load_profiles
    from hwcompat.selftest import write_model

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        print("train --gpu: no GPU (add --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    device_args = [] if on_gpu else ["--emulate", "h100", "--cpu-emulation"]
    shape = GPU_SHAPE if on_gpu else SMOKE_SHAPE
    name = torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke, emulated h100 profile)"
    profile = load_profiles()["hopper"] if not on_gpu else None
    tmp = Path(tempfile.mkdtemp(prefix="hwcompat-bench-gpu-"))
    train, evals = make_data(tmp, n_train=args.steps * args.batch, n_eval=8)
    texts = [json.loads(x)["prompt"] + " " + json.loads(x)["completion"] for x in train.read_text().splitlines()]
    write_model(tmp / "model", shape, texts[:200], dtype="bfloat16" if on_gpu else "float32")
    config = json.loads((tmp / "model" / "config.json").read_text())
    python = args.trl_python or sys.executable
    trl_ok = _has_trl(python)
    if on_gpu:  # the profile `hwcompat detect` resolves for this card: its datasheet peak for MFU
        detect = json.loads(subprocess.run([sys.executable, "-m", "hwcompat", "detect", "--json"], capture_output=True,
                                           text=True, env=_bench_env()).stdout)
        gpu = next(d for d in detect["devices"] if d["vendor"] != "cpu")
        profile = load_profiles().get((gpu.get("profile") or {}).get("name", ""))
    report = {"benchmark": "train_gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": name, "smoke": args.smoke, "torch": torch.__version__, "shape": shape,
              "steps": args.steps, "batch": args.batch, "max_seq_len": args.max_len, "warmup_steps": GPU_WARMUP,
              "profile": profile.name if profile else None, "peak_card": profile.peak_card if profile else None,
              "trl": "installed" if trl_ok else f"not installed for {python}: pip install trl datasets", "runs": {}}
    for dtype in ("bfloat16", "float16"):
        peak = profile.peak_tflops.get(dtype) if profile and on_gpu else None
        runs = {"hwcompat": _hwcompat_gpu(tmp / "model", (train, evals), tmp, dtype, args, device_args)}
        if trl_ok:
            runs["trl_sft"] = _trl_gpu(python, tmp / "model", train, tmp, dtype, args)
        for entry in runs.values():
            _mfu(entry, config, args.max_len, peak)
        hw, trl = runs["hwcompat"], runs.get("trl_sft", {})
        if hw.get("tokens_per_s_after_warmup") and trl.get("tokens_per_s_after_warmup"):
            runs["speedup_vs_trl"] = hw["tokens_per_s_after_warmup"] / trl["tokens_per_s_after_warmup"]
            if hw.get("peak_memory_bytes") and trl.get("peak_memory_bytes"):
                runs["memory_vs_trl"] = hw["peak_memory_bytes"] / trl["peak_memory_bytes"]
        report["runs"][dtype] = runs
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = Path(args.out or ROOT / "bench" / "results" / f"train-gpu-{'smoke' if args.smoke else slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'dtype':9} {'trainer':9} {'tok/s':>9} {'peak GiB':>9} {'MFU nemo':>9} {'MFU lora':>9}")
    for dtype, runs in report["runs"].items():
        for who in ("hwcompat", "trl_sft"):
            e = runs.get(who)
            if e is None or "error" in e:
                print(f"{dtype:9} {who:9} {e['error'] if e else 'not run'}")
                continue
            mfu = [f"{e[k]:9.1%}" if e.get(k) is not None else f"{'-':>9}" for k in ("mfu_nemo", "mfu_lora")]
            print(f"{dtype:9} {who:9} {e['tokens_per_s_after_warmup']:9.0f} "
                  f"{(e.get('peak_memory_bytes') or 0) / 2**30:9.2f} {' '.join(mfu)}")
    print(f"wrote {out}")
    failed = [d for d, r in report["runs"].items() if "error" in r["hwcompat"]]
    return 1 if failed else 0


def gemm_peak(config: dict, rows: int, threads: int, dtype: str, seconds: float = 1.0) -> dict:
    """FLOP/s of ``torch.mm`` at the model's linear shapes (x[rows, in] @ W[in, out]), best of each over ~``seconds``;
    the CPU's attainable peak for this model in ``dtype``."""
    import time

    import torch

    torch.set_num_threads(threads)
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes = {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, i), "down": (i, h)}
    rates = {}
    for name, (a, b) in shapes.items():
        x, w = torch.randn(rows, a, dtype=getattr(torch, dtype)), torch.randn(a, b, dtype=getattr(torch, dtype))
        torch.mm(x, w)  # warm-up: oneDNN picks its kernel
        best, spent = 0.0, 0.0
        while spent < seconds / len(shapes):
            t = time.perf_counter()
            torch.mm(x, w)
            dt = time.perf_counter() - t
            spent += dt
            best = max(best, 2.0 * rows * a * b / dt)
        rates[name] = best
    return {"dtype": dtype, "rows": rows, "threads": threads, "flops_per_s_by_shape": rates,
            "peak_flops_per_s": max(rates.values())}


def add_mfu(report: dict, runs: dict, model: Path, args, threads: int) -> None:
    """Each run's MFU against the GEMM peak measured here (see the module docstring)."""
    from hwcompat import selftest

    config = json.loads((Path(model) / "config.json").read_text())
    rows_len = report.get("mean_row_tokens") or args.max_len
    per_token = selftest.lora_flops_per_token(config, 16, int(rows_len))
    peaks = {d: gemm_peak(config, args.batch * int(rows_len), threads, d) for d in ("float32", "bfloat16")}
    report["gemm_peak"] = peaks
    report["lora_flops_per_token"] = per_token
    for r in runs.values():
        r["achieved_flops_per_s"] = r["tokens_per_s"] * per_token
        r["mfu_fp32_peak"] = r["achieved_flops_per_s"] / peaks["float32"]["peak_flops_per_s"]
        r["mfu_bf16_peak"] = r["achieved_flops_per_s"] / peaks["bfloat16"]["peak_flops_per_s"]


def eval_loss(model_dir: Path, adapter: Path, eval_file: Path, max_len: int) -> float:
    """One scorer for both adapters: token-weighted loss on response tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hwcompat.train import batching
    from hwcompat.data.problems import Report
    from hwcompat.data.rows import read_jsonl
    from hwcompat.train.objectives.sft import evaluate_loss

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = read_jsonl(eval_file, "auto", Report())
    data = batching.tokenize_all(tok, rows, False, max_len, "truncate", Report(), "eval")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter))
    return evaluate_loss(model, data, 8, tok.pad_token_id, torch.device("cpu"), "float32")


def cfg_base(args, model: Path, train: Path, evals: Path, threads: int) -> dict:
    return {"model": str(model), "train_data": [str(train)], "eval_data": [str(evals)], "max_seq_len": args.max_len,
            "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "max_steps": args.steps, "learning_rate": args.lr,
            "warmup_ratio": 0.0, "micro_batch_size": args.batch, "eval_at_start": False, "eval_metrics": "none",
            "chat_template": "false", "num_threads": threads}


def _cpu_hwcompat(tmp: Path, name: str, cfg: dict, malloc: str, env: dict) -> dict:
    """`hwcompat train` as a user runs it (malloc auto: tcmalloc where installed), or on the system malloc."""
    cfg = {**cfg, "output_dir": str(tmp / name), "cpu_allocator": malloc}
    (tmp / f"{name}.yaml").write_text(json.dumps(cfg))
    res = subprocess.run([sys.executable, "-m", "hwcompat", "train", str(tmp / f"{name}.yaml")], capture_output=True,
                         text=True, env=env)
    if res.returncode:
        return {"error": f"exit {res.returncode}", "stderr_tail": res.stderr[-3000:]}
    hw = json.loads((tmp / name / "summary.json").read_text())
    return {"tokens_per_s": hw["tokens_per_s"], "train_seconds": hw["train_seconds"], "batching": hw["batching"],
            "peak_memory_bytes": hw["peak_memory_bytes"], "cpu_allocator": hw.get("cpu_allocator"),
            "dtype": hw.get("dtype"), "attention": hw.get("attention")}


def _cpu_script(python: str, code: str, tmp: Path, name: str, argv: list[str], malloc: str, env: dict) -> dict:
    """A peer's script (the plain Trainer, TRL) in its own process; ``malloc`` tcmalloc preloads it there too."""
    from hwcompat.probe.malloc import QUIET, find_tcmalloc

    script = tmp / f"{name}_run.py"  # never trl.py: that name would shadow the package
    script.write_text(code)
    run_env = {**env, "TOKENIZERS_PARALLELISM": "false"}
    if malloc == "tcmalloc":
        run_env.update({"LD_PRELOAD": str(find_tcmalloc()), **QUIET})
    args = [*argv[:2], str(tmp / name), *argv[3:]]
    res = subprocess.run([python, str(script), *args], capture_output=True, text=True, env=run_env)
    if res.returncode:
        return {"error": f"exit {res.returncode}", "stderr_tail": res.stderr[-3000:]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {"tokens_per_s": out["real_tokens"] / out["train_seconds"], "train_seconds": out["train_seconds"],
            "real_tokens": out["real_tokens"], "peak_memory_bytes": out.get("peak_rss_bytes"), "malloc": malloc,
            "dtype": argv[8] if len(argv) > 8 else "float32"}


#: name -> (trainer, settings, malloc): hwcompat's settings are config keys over its defaults, a script's its dtype.
#: TRL's variants are what a careful user sets on a CPU (issue #41 §3): completion-only loss and length grouping
#: always, bf16 where the CPU has it, tcmalloc.
VARIANTS = {
    "hwcompat": ("hwcompat", {}, "auto"),  # its defaults: the profile's dtype and attention, tcmalloc where installed
    "hwcompat_fp32": ("hwcompat", {"dtype": "float32"}, "auto"),
    "hwcompat_sdpa": ("hwcompat", {"attention": "sdpa"}, "auto"),
    "hwcompat_eager": ("hwcompat", {"attention": "eager"}, "auto"),
    "hwcompat_system_malloc": ("hwcompat", {}, "system"),
    "trl_sft_bf16": ("trl", {"dtype": "bfloat16"}, "tcmalloc"),  # TRL at its best on a CPU with native bf16
    "trl_sft_fp32": ("trl", {"dtype": "float32"}, "tcmalloc"),
    "trl_sft": ("trl", {"dtype": "float32"}, "system"),  # TRL as most users run it
    "plain_trainer": ("plain", {"dtype": "float32"}, "system"),
}
DEFAULT_VARIANTS = "hwcompat,trl_sft_bf16,hwcompat_fp32,trl_sft_fp32"


def run_variant(name: str, tmp: Path, args, paths: tuple[Path, Path, Path], threads: int, env: dict) -> dict:
    """One run of one variant in its own folder (``name`` carries the round)."""
    trainer, settings, malloc = VARIANTS[name.split("@")[0]]
    model, train, evals = paths
    if trainer == "hwcompat":
        return _cpu_hwcompat(tmp, name, cfg_base(args, model, train, evals, threads) | settings, malloc, env)
    argv = [str(model), str(train), "", str(args.steps), str(args.batch), str(args.max_len), str(args.lr),
            str(threads), settings["dtype"]]
    if trainer == "trl":
        return _cpu_script(args.trl_python, TRL, tmp, name, argv, malloc, env)
    return _cpu_script(sys.executable, PLAIN, tmp, name, argv, malloc, env)


def alternate(names: list[str], rounds: int) -> list[str]:
    """Run order: the list, then reversed, and so on (a noisy shared machine's drift falls on both sides)."""
    order = []
    for k in range(rounds):
        order += [f"{n}@{k}" for n in (names if k % 2 == 0 else names[::-1])]
    return order


def merge_rounds(results: dict[str, dict]) -> dict[str, dict]:
    """Per variant: median tokens/s over its rounds, the highest peak memory, every round's figure kept."""
    import statistics

    merged: dict[str, dict] = {}
    for key, r in results.items():
        merged.setdefault(key.split("@")[0], {"rounds": []})["rounds"].append(r)
    for r in merged.values():
        first = r["rounds"][0]
        r.update({k: v for k, v in first.items() if k not in ("tokens_per_s", "train_seconds", "peak_memory_bytes")})
        r["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in r["rounds"])
        r["train_seconds"] = statistics.median(x["train_seconds"] for x in r["rounds"])
        r["peak_memory_bytes"] = max(x.get("peak_memory_bytes") or 0 for x in r["rounds"])
    return merged


def compare(report: dict, runs: dict) -> None:
    """hwcompat (its defaults) against each peer variant and against TRL's fastest: the goal's ratios."""
    hw = runs["hwcompat"]
    for name, r in runs.items():
        if name != "hwcompat":
            report.setdefault("ratios", {})[name] = {
                "speedup": hw["tokens_per_s"] / r["tokens_per_s"],
                "memory": hw["peak_memory_bytes"] / r["peak_memory_bytes"] if r.get("peak_memory_bytes") else None,
                "eval_loss_delta": hw["eval_loss"] - r["eval_loss"]}
    trl = {n: r for n, r in runs.items() if n.startswith("trl")}
    if trl:
        best = max(trl, key=lambda n: trl[n]["tokens_per_s"])
        report["trl_best"] = best
        report["speedup_vs_trl_best"] = report["ratios"][best]["speedup"]
        report["memory_vs_trl_best"] = report["ratios"][best]["memory"]
        report["eval_loss_vs_trl_best"] = report["ratios"][best]["eval_loss_delta"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "small"), default="smollm2",
                    help="smollm2: the demo model (meaningful losses); small: a random tiny Llama (speed only)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="default: bench/results/train-cpu-smollm2.json "
                                               "(--gpu: train-gpu-<card>.json)")
    ap.add_argument("--gpu", action="store_true", help="the card at hand: hwcompat vs TRL in bf16 and fp16, MFU")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: tiny shapes on the CPU (the script works)")
    ap.add_argument("--trl-python", help="an interpreter with TRL installed (e.g. a venv made with "
                                         "--system-site-packages): adds TRL's SFTTrainer to the comparison")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma list of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS}; TRL's need --trl-python)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; tokens/s is each variant's median")
    ap.add_argument("--table", metavar="RESULT.json", help="print a result file's markdown table (docs/cpu.md)")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())), end="")
        return 0
    if args.gpu:
        return gpu_main(args)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "hwcompat" not in names:
        ap.error(f"--variants: {', '.join(unknown) or 'hwcompat is missing'}; known: {', '.join(VARIANTS)}")
    names = [n for n in names if args.trl_python or VARIANTS[n][0] != "trl"]
    args.out = args.out or str(ROOT / "bench" / "results" / "train-cpu-smollm2.json")
    threads = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="hwcompat-bench-"))
    train, evals = make_data(tmp, n_train=args.steps * args.batch, n_eval=48)
    model = make_model(args.model, tmp, train)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_") and k != "LD_PRELOAD"}
    results = {}
    for key in alternate(names, args.rounds):
        results[key] = run_variant(key, tmp, args, (model, train, evals), threads, env)
        if "error" in results[key]:
            print(f"{key}: {results[key]['error']}\n{results[key].get('stderr_tail', '')}", file=sys.stderr)
            return 1
        print(f"{key}: {results[key]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    runs = merge_rounds(results)
    for name, r in runs.items():  # training is seeded: round 0's adapter stands for the variant
        r["eval_loss"] = eval_loss(model, tmp / f"{name}@0" / "adapter", evals, args.max_len)
    report = {"benchmark": "train", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": "cpu", "machine": platform.machine(), "cpu_flags": _cpu_flags(), "threads": threads,
              "model": args.model, "steps": args.steps, "batch": args.batch, "max_seq_len": args.max_len,
              "length_spread_tokens": "30-400", "rounds": args.rounds, "order": list(results), **runs}
    summary = json.loads((tmp / "hwcompat@0" / "summary.json").read_text())
    report["mean_row_tokens"] = summary["tokens_per_s"] * summary["train_seconds"] / max(1, args.steps * args.batch)
    add_mfu(report, runs, model, args, threads)
    compare(report, runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, runs, threads)
    print(f"wrote {args.out}")
    return 0


#: How docs/cpu.md names each variant (its table is this function's output: tests/test_docs.py compares them).
LABELS = {"hwcompat": "hwcompat (its defaults)", "hwcompat_fp32": "hwcompat, dtype=float32",
          "trl_sft_bf16": "TRL `SFTTrainer`, bf16, tcmalloc", "trl_sft_fp32": "TRL `SFTTrainer`, fp32, tcmalloc",
          "trl_sft": "TRL `SFTTrainer`, fp32 (its default)", "plain_trainer": "transformers Trainer + PEFT",
          "hwcompat_eager": "hwcompat, attention=eager", "hwcompat_sdpa": "hwcompat, attention=sdpa",
          "hwcompat_system_malloc": "hwcompat, glibc malloc"}


def markdown_table(report: dict) -> str:
    """The result file as the docs print it: each variant's figures, then the goal's ratio."""
    lines = ["| SFT | dtype | tokens/s (rounds) | eval loss | peak RSS | MFU (of the GEMM peak in its dtype) |",
             "|---|---|---|---|---|---|"]
    for name in (n for n in VARIANTS if n in report):
        r = report[name]
        rounds = ", ".join(f"{x['tokens_per_s']:.0f}" for x in r["rounds"])
        lines.append(f"| {LABELS[name]} | {r['dtype']} | {r['tokens_per_s']:.0f} ({rounds}) | {r['eval_loss']:.4f} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | "
                     f"{r['mfu_bf16_peak' if r['dtype'] == 'bfloat16' else 'mfu_fp32_peak']:.1%} |")
    if report.get("trl_best"):
        lines.append(f"\nhwcompat at its defaults against TRL at its best ({LABELS[report['trl_best']]}): "
                     f"**{report['speedup_vs_trl_best']:.2f}×** the tokens/s at {report['memory_vs_trl_best']:.2f}× "
                     f"the peak RSS, eval loss {report['eval_loss_vs_trl_best']:+.4f} (goal: ≥ 2.5× at no more "
                     "memory and no worse loss).")
    return "\n".join(lines) + "\n"


def _cpu_flags() -> list[str]:
    from hwcompat.probe import cpu

    return list(cpu.probe()[0].cpu_flags)


def print_table(report: dict, runs: dict, threads: int) -> None:
    print(f"{'':24} {'dtype':>9} {'tokens/s':>10} {'eval loss':>10} {'peak GiB':>9} {'MFU fp32':>9} {'MFU bf16':>9}")
    for name, r in runs.items():
        print(f"{name:24} {r.get('dtype') or '?':>9} {r['tokens_per_s']:10.0f} {r['eval_loss']:10.4f} "
              f"{(r.get('peak_memory_bytes') or 0) / 2**30:9.2f} {r['mfu_fp32_peak']:9.1%} {r['mfu_bf16_peak']:9.1%}")
    pk = report["gemm_peak"]
    print(f"GEMM peak at the model's shapes ({pk['float32']['rows']} rows, {threads} threads): "
          f"fp32 {pk['float32']['peak_flops_per_s'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {pk['bfloat16']['peak_flops_per_s'] / 1e9:.1f}; "
          f"LoRA {report['lora_flops_per_token'] / 1e6:.1f} MFLOP per token")
    for name, ratio in report.get("ratios", {}).items():
        mem = f", memory {ratio['memory']:.2f}x" if ratio["memory"] else ""
        print(f"hwcompat vs {name}: {ratio['speedup']:.2f}x tokens/s{mem}, eval loss {ratio['eval_loss_delta']:+.4f}")
    if "trl_best" in report:
        print(f"vs TRL at its best ({report['trl_best']}): {report['speedup_vs_trl_best']:.2f}x (goal >= 2.5x)")


if __name__ == "__main__":
    sys.exit(main())
