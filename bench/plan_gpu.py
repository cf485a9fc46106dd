"""Planner accuracy on a real GPU: predicted vs torch.cuda.max_memory_allocated for several configs.

    python bench/plan_gpu.py [--out bench/results/plan-gpu-<device>.json] [--smoke]

For each config (LoRA / full, sequence length, micro-batch, gradient checkpointing) a Llama is built
from a config on the GPU in the card's profile dtype and attention, one training step runs the way
hwcompat's trainer does (LoRA on all linear layers, AdamW, every position labelled so the logits term
is the planner's worst case), and the peak allocation is compared with the plan's allocator-side total
(everything but the runtime context and allocator slack, which max_memory_allocated does not see).
Goal: within +/-15 %. Needs a CUDA or ROCm GPU; exits 2 without one. ``--smoke`` plans tiny shapes for the
emulated H100 on the CPU and measures nothing (measured_bytes null): the script works.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000),
    "qwen-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936),
}
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
CONFIGS = [  # (shape, method, seq_len, batch, gradient checkpointing)
    ("llama-1b", "lora", 1024, 4, False),
    ("llama-1b", "lora", 2048, 4, True),
    ("llama-1b", "full", 512, 2, False),
    ("qwen-0.5b", "lora", 2048, 2, False),
    ("qwen-0.5b", "lora", 4096, 1, True),
]


def measure(shape_name: str, method: str, seq: int, batch: int, gc: bool, dtype: str, attention: str) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hwcompat.train.objectives.sft import ResponseLoss

    torch.cuda.empty_cache()
    cfg = LlamaConfig(**SHAPES[shape_name], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = attention
    with torch.device("cuda"):  # initialised on the card: a CPU init of a 1B model takes longer than the step
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    loss_fn = ResponseLoss(model)
    with torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
        loss = loss_fn({"input_ids": ids, "labels": ids}, float(batch * seq))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, loss
    return peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true", help="plan tiny shapes for the emulated H100; measure nothing")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("plan_gpu: no GPU visible to torch; run this on a CUDA or ROCm machine", file=sys.stderr)
        return 2
    from hwcompat import plan as P
    from hwcompat.probe import probe_host
    from hwcompat.profiles import load_profiles
    from hwcompat.resolve import resolve_host
    from hwcompat.software import installed

    host = resolve_host(probe_host(["h100"] if args.smoke else None), load_profiles(), installed())
    device = next(d for d in host.devices if d.reading.vendor != "cpu" and d.profile)
    prof = device.profile
    rows = []
    for shape_name, method, seq, batch, gc in CONFIGS:
        dims = SMOKE_SHAPE if args.smoke else SHAPES[shape_name]
        shape = P.shape_from_config({**dims, "model_type": "llama", "tie_word_embeddings": False}, shape_name)
        plan = P.estimate(shape, P.PlanInput(method=method, seq_len=seq, batch_size=batch, gradient_checkpointing=gc),
                          prof.dtype, prof.attention, device.reading.vendor, device.reading.memory_bytes)
        predicted = plan.peak_bytes - plan.breakdown["runtime_overhead"]
        measured = None if args.smoke else measure(shape_name, method, seq, batch, gc, prof.dtype, prof.attention)
        ratio = predicted / measured if measured else None
        rows.append({"model": shape_name, "method": method, "seq_len": seq, "batch": batch,
                     "gradient_checkpointing": gc, "predicted_bytes": predicted, "measured_bytes": measured,
                     "ratio": ratio, "breakdown": plan.breakdown})
        print(f"{shape_name:10} {method:5} seq {seq:5} b {batch} gc {gc!s:5}  predicted {predicted / 2**30:6.2f} GiB  "
              + (f"measured {measured / 2**30:6.2f} GiB  ratio {ratio:.2f}" if measured else "(smoke: not measured)"))
    report = {"benchmark": "plan_gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device.reading.name, "driver": device.reading.driver_version, "torch": torch.__version__,
              "profile": prof.name, "dtype": prof.dtype, "attention": prof.attention, "rows": rows,
              "smoke": args.smoke, "within_15pct": sum(r["ratio"] is not None and abs(r["ratio"] - 1) <= 0.15
                                                        for r in rows)}
    out = Path(args.out or ROOT / "bench" / "results" /
               f"plan-gpu-{device.reading.name.replace(' ', '_')}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['within_15pct']}/{len(rows)} within 15 %; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
