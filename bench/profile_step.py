"""Where a CPU LoRA step's time and memory go: the profile behind the CPU trainer's malloc choice (#25).

    python bench/profile_step.py [--steps 6] [--dtype float32|bfloat16] [--attention sdpa|cpu_bf16|eager]
                                 [--out bench/results/profile-step-cpu.json]

SmolLM2-135M (the demo's model), LoRA r=16 on every linear, hwcompat's loss (response positions only, chunked),
length-grouped micro-batches of 8 rows from bench/train.py's data (prompts 30-400 tokens), on the CPU in fp32 or
as hwcompat runs bf16 (the frozen base in bf16, fp32 adapters, bf16 autocast), with the attention hwcompat's CPU
profile picks for that dtype (sdpa in fp32, its own cpu_bf16 kernel in bf16) unless ``--attention`` names one:

- ``saved``: the activations autograd keeps for backward in one forward of the longest micro-batch, by their
  last dimension (hidden 576, MLP 1536, attention head 64, sequence, LoRA rank 16): what checkpointing or a
  fused kernel could save.
- ``ops``: the top operators by self CPU time over two steps (torch.profiler).
- ``variants``: tokens/s and peak RSS of the same steps, each in its own process, alternating: the system
  malloc, tcmalloc and jemalloc (where installed, LD_PRELOAD), and gradient checkpointing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")


def setup(checkpointing: bool, dtype: str = "float32", attention: str = "sdpa"):
    """The model with LoRA, hwcompat's loss, an optimizer and the shuffled length-grouped micro-batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.train import make_data
    from hwcompat.data.problems import Report
    from hwcompat.data.rows import read_jsonl
    from hwcompat.demo.model import ensure_model
    from hwcompat.train import batching
    from hwcompat.train.objectives.sft import ResponseLoss

    torch.manual_seed(0)
    model_dir = ensure_model()
    tok = AutoTokenizer.from_pretrained(model_dir)
    train, _ = make_data(Path(tempfile.mkdtemp(prefix="hwcompat-profile-")), 160, 8)
    data = batching.tokenize_all(tok, read_jsonl(train, "auto", Report()), False, 512, "truncate", Report(), "train")
    data.sort(key=lambda e: len(e.input_ids))
    groups = [data[i:i + 8] for i in range(0, len(data), 8)]
    random.Random(0).shuffle(groups)
    from hwcompat.train.cpu_attention import implementation

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=implementation(attention))
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():  # as train/model.py loads a base for a bf16 profile: frozen in bf16, adapters fp32
        if not p.requires_grad:
            p.data = p.data.to(getattr(torch, dtype))
    from hwcompat.train.model import _cast_once

    model = _cast_once(model)  # as hwcompat trains: no fp32 round trip of a LoRA input under autocast
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = [batching.collate(g, "padded", pad) for g in groups]
    return model, ResponseLoss(model), opt, batches


def step(loss_fn, opt, b, dtype: str = "float32") -> int:
    import torch

    tensors = {k: b[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "float32"):
        loss = loss_fn(tensors, float(b["n_target"]))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return int(b["attention_mask"].sum())


def variant(name: str, steps: int, dtype: str, attention: str) -> dict:
    """Run in a child process: tokens/s after one warm-up step, and the process's peak RSS."""
    _, loss_fn, opt, batches = setup(name == "checkpointing", dtype, attention)
    seconds, tokens = 0.0, 0
    for i in range(steps):
        t = time.perf_counter()
        n = step(loss_fn, opt, batches[i], dtype)
        if i:
            seconds, tokens = seconds + time.perf_counter() - t, tokens + n
    return {"tokens_per_s": tokens / seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def saved_and_ops(steps: int, dtype: str, attention: str) -> dict:
    """The saved activations of the longest micro-batch's forward, by last dimension; the top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _, loss_fn, opt, batches = setup(False, dtype, attention)
    longest = max(batches, key=lambda b: b["input_ids"].numel())
    seen, by_dim = set(), collections.Counter()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            by_dim[str(t.shape[-1]) if t.dim() else "scalar"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "float32"):
        loss = loss_fn({k: longest[k] for k in ("input_ids", "attention_mask", "labels")}, 1.0)
    del loss
    step(loss_fn, opt, batches[0], dtype)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[1:3]:
            step(loss_fn, opt, b, dtype)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return {"longest_batch": list(longest["input_ids"].shape), "saved_bytes": sum(by_dim.values()),
            "saved_by_last_dim": dict(by_dim.most_common()),
            "ops": [{"op": e.key, "self_share": e.self_cpu_time_total / total, "calls": e.count} for e in ops]}


def _child(name: str, steps: int, dtype: str, attention: str) -> dict:
    from hwcompat.probe.malloc import QUIET, find_tcmalloc

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    lib = {"tcmalloc": find_tcmalloc(), "jemalloc": next((p for p in JEMALLOC if Path(p).exists()), None)}.get(name)
    if name in ("tcmalloc", "jemalloc"):
        if lib is None:
            return {"skipped": f"{name} not installed"}
        env.update({"LD_PRELOAD": str(lib), **QUIET})
    res = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(steps), "--dtype", dtype,
                          "--attention", attention],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        return {"error": res.stderr[-1500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--attention", choices=("sdpa", "cpu_bf16", "eager"),
                    help="default: what hwcompat's CPU profile picks for the dtype")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the child's side
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile-step-cpu.json"))
    args = ap.parse_args()
    args.attention = args.attention or ("cpu_bf16" if args.dtype == "bfloat16" else "sdpa")
    if args.variant:
        print(json.dumps(variant(args.variant, args.steps, args.dtype, args.attention)))
        return 0
    names = ("system", "tcmalloc", "jemalloc", "checkpointing")
    runs = {n: [] for n in names}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            runs[n].append(_child(n, args.steps, args.dtype, args.attention))
            print(n, runs[n][-1], flush=True)
    report = {"benchmark": "profile_step", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "threads": os.cpu_count(), "dtype": args.dtype, "attention": args.attention, "steps": args.steps,
              "rounds": args.rounds, "variants": runs, **saved_and_ops(args.steps, args.dtype, args.attention)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved activations of {report['longest_batch']}: {report['saved_bytes'] / 2**30:.2f} GiB")
    for dim, b in report["saved_by_last_dim"].items():
        print(f"  last dim {dim:>6}: {b / 2**30:6.2f} GiB")
    for o in report["ops"]:
        print(f"  {o['op'][:50]:50} {o['self_share']:6.1%}")
    print(f"{'variant':14} {'tokens/s':>9} {'peak RSS GiB':>13}")
    for n, rs in runs.items():
        ok = [x for x in rs if "tokens_per_s" in x]
        if ok:
            tps = sorted(x["tokens_per_s"] for x in ok)[len(ok) // 2]
            rss = max(x["peak_rss_bytes"] for x in ok) / 2**30
            print(f"{n:14} {tps:9.0f} {rss:13.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
