"""Layer streaming on a real card: hwcompat's streamer vs resident training vs FSDP2 CPU offload, one run.

    python bench/stream_gpu.py [--out bench/results/stream-gpu-<card>.json] [--smoke]

Models are built from a config with random weights (no hub). An H100 is capped with
``torch.cuda.set_per_process_memory_fraction`` to act as a smaller card:

- fits:   a ~1.1B Llama (TinyLlama's shape) in bf16 at 8,192 tokens per step (4 x 2,048): resident with
          gradient checkpointing, streamed (``offload: layers``), and FSDP2 ``fully_shard`` with
          ``CPUOffloadPolicy`` on a one-process group. Goal: streamed / resident step time <= 1.15.
- 8b-fp32 at a 24 GB cap (an M40's memory) and 14b-bf16 at a 16 GB cap (a V100's): resident does not
  fit; streamed trains with peak memory under the cap. Reports tokens/s, bytes moved per step and the
  achieved host -> device GB/s (a pinned layer copy timed alone) against the link's peak from NVML.
- QLoRA under the same caps (``qlora`` engine): the decoder's linear layers as bitsandbytes NF4
  ``Linear4bit`` (quantised in place as they move to the card; no saved 4-bit checkpoint needed), LoRA
  on top, gradient checkpointing: the other way a 24 or 16 GB card trains these models.

Each engine's measured peak sits beside the planner's allocator-side estimate for the same setting
(``plan.estimate``: offload=layers for streamed, method=qlora for qlora), so the planner's accuracy under a
cap is measured too. ``--engines`` picks engines (gpu_evidence.sh runs the capped cases streamed + qlora
within its budget). The JSON is rewritten after every engine, so a run stopped by its time limit keeps what
it measured.

``--smoke`` runs the same code on the CPU with tiny shapes (no caps, no streams): a check that the script
works, not a measurement. Results: JSON plus a short table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # config.json fields (Llama-style); sizes of public models, weights random
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "14b": {"hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 8, "vocab_size": 151936},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256},
}
GIB = 2**30
# case -> (shape, dtype, memory cap in GiB or None, batch, seq, engines)
CASES = {
    "fits": ("1b", "bfloat16", None, 4, 2048, ("resident", "streamed", "fsdp2_cpu_offload")),
    "8b-fp32": ("8b", "float32", 24, 1, 2048, ("resident", "streamed", "fsdp2_cpu_offload")),
    "14b-bf16": ("14b", "bfloat16", 16, 1, 2048, ("resident", "streamed")),
}
SMOKE = {"fits": ("tiny", "float32", None, 2, 32, ("resident", "streamed", "fsdp2_cpu_offload", "qlora")),
         "tiny-bf16": ("tiny", "bfloat16", None, 1, 32, ("streamed", "qlora"))}
ENGINES = ("resident", "streamed", "fsdp2_cpu_offload", "qlora")


def build(shape: str, dtype: str, qlora_on=None):
    """A random-weight Llama on the host, LoRA r=16 on every linear (adapters fp32); with ``qlora_on`` (a
    device) the decoder's linears are NF4 first, quantised as they move there."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model = model.to_empty(device="cpu")
    _fill(model)
    with torch.no_grad():
        model.model.rotary_emb.__init__(cfg)  # buffers are not parameters: recompute inv_freq
    model.config.use_cache = False
    if qlora_on is not None:
        model = _nf4(model, getattr(torch, dtype), qlora_on)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _fill(model) -> None:
    """Random N(0, 0.02) weights at memory speed: one 16M-value block tiled over every parameter (an 8B fp32
    model drawn value by value takes minutes; step time and memory do not depend on which random values)."""
    import torch

    block = torch.empty(1 << 24).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            flat, n = p.view(-1), p.numel()
            src = block.roll(i * 7919)[: min(n, block.numel())].to(p.dtype)  # another phase per tensor
            for start in range(0, n, src.numel()):
                flat[start:start + src.numel()].copy_(src[: n - start])


def _nf4(model, compute_dtype, device):
    """Every linear of the decoder layers as a bitsandbytes NF4 Linear4bit, then the model on ``device``."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4")
                parent, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, leaf, q)
    return model.to(device)


def _batch(vocab: int, batch: int, seq: int, device):
    import torch

    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare(engine: str, model, device):
    """Place the model the engine's way; returns the module whose forward runs the loss."""
    import torch

    if engine in ("resident", "qlora"):
        model.to(device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    elif engine == "streamed":
        from hwcompat.train import stream

        stream.install(model, device, prefetch=1)
    else:  # FSDP2 on a one-process group: each decoder layer a unit, parameters offloaded to pinned host memory
        import torch.distributed as dist
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (1,))
        base = model.get_base_model()
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh, offload_policy=policy)
        # the loss calls the decoder and the LM head directly (logits at response positions only): each its root
        fully_shard(base.lm_head, mesh=mesh, offload_policy=policy)
        fully_shard(base.model, mesh=mesh, offload_policy=policy)
    return model


def run_engine(engine: str, case: tuple, device, steps: int) -> dict:
    """Warm-up step, then ``steps`` timed optimizer steps; step time, tokens/s, peak memory, bytes moved."""
    import torch

    from hwcompat.train.objectives.sft import ResponseLoss

    shape, dtype, cap, batch, seq, _ = case
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build(shape, dtype, qlora_on=device if engine == "qlora" else None)
    model = _prepare(engine, model, device)
    loss_fn = ResponseLoss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = _batch(SHAPES[shape]["vocab_size"], batch, seq, device)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else torch.autocast(device.type, enabled=False))
    times = []
    streamer = getattr(model, "hwcompat_streamer", None)
    for i in range(steps + 1):
        _sync(device)
        t = time.perf_counter()
        with autocast:
            loss = loss_fn(data, float(batch * seq))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i == 0 and streamer is not None:
            streamer.stats.bytes_moved = 0
        if i > 0:
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    out = {"step_seconds": step, "tokens_per_s": batch * seq / step, "loss": float(loss.detach()),
           "planned_allocated_bytes": planned_allocated(engine, case, device)}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    if streamer is not None:
        out["bytes_moved_per_step"] = streamer.stats.bytes_moved // steps
        out["layer_bytes"] = streamer.layer_bytes
        out["copy_gb_per_s"] = _copy_rate(streamer, device)
    del model, opt, loss_fn
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def planned_allocated(engine: str, case: tuple, device) -> int | None:
    """The planner's allocator-side peak for this engine's setting (what max_memory_allocated sees)."""
    from hwcompat import plan as P

    if engine == "fsdp2_cpu_offload":
        return None  # the planner has no FSDP term; FSDP2 is a comparison, not a path hwcompat runs
    shape, dtype, cap, batch, seq, _ = case
    dims = {**SHAPES[shape], "model_type": "llama", "tie_word_embeddings": False}
    inp = P.PlanInput(method="qlora" if engine == "qlora" else "lora", seq_len=seq, batch_size=batch,
                      gradient_checkpointing=engine != "streamed", lora_dropout=False,
                      offload="layers" if engine == "streamed" else "none")
    try:
        plan = P.estimate(P.shape_from_config(dims, shape), inp, dtype, "sdpa", device.type if device.type != "cuda"
                          else "nvidia", int((cap or 80) * GIB))
    except Exception as exc:  # noqa: BLE001 (a bench records what the planner refused)
        print(f"   planner: {exc}", flush=True)
        return None
    return plan.peak_bytes - plan.breakdown["runtime_overhead"]


def _copy_rate(streamer, device) -> float | None:
    """One pinned layer copied host -> device alone, timed with events: the link as the streamer sees it."""
    import torch

    if device.type != "cuda":
        return None
    host = next(iter(streamer.host[0].values()))
    dst = torch.empty_like(host, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dst.copy_(host, non_blocking=True)
    start.record()
    for _ in range(5):
        dst.copy_(host, non_blocking=True)
    end.record()
    torch.cuda.synchronize(device)
    return 5 * host.numel() * host.element_size() / (start.elapsed_time(end) / 1e3) / 1e9


def _link() -> dict:
    """NVML's PCIe generation and width and their theoretical peak (catalog/throughput.yaml)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        gen, width = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h), pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)
    except Exception as exc:  # noqa: BLE001 (a bench records what it could not read)
        return {"error": str(exc)[:200]}
    from hwcompat.plan import throughput_table

    lane = throughput_table()["pcie"][gen]
    return {"pcie_generation": gen, "pcie_width": width,
            "peak_gb_per_s": lane["gt_per_s"] * lane["encoding"] * width / 8}


def run_case(name: str, case: tuple, device, steps: int, only: tuple[str, ...] = (), save=None) -> dict:
    import torch

    shape, dtype, cap, batch, seq, engines = case
    result: dict = {"shape": shape, "dtype": dtype, "cap_gib": cap, "tokens_per_step": batch * seq}
    if cap and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), device)
    for engine in engines:
        if only and engine not in only:
            continue
        print(f"== {name}: {engine}", flush=True)
        try:
            result[engine] = run_engine(engine, case, device, steps)
        except torch.OutOfMemoryError as exc:
            result[engine] = {"error": "out of memory", "detail": str(exc).splitlines()[0][:300]}
        except Exception as exc:  # noqa: BLE001 (a comparison engine that fails is a result too)
            result[engine] = {"error": type(exc).__name__, "detail": str(exc)[:300]}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        e = result[engine]
        if e.get("peak_allocated_bytes") and e.get("planned_allocated_bytes"):
            e["planned_over_measured"] = e["planned_allocated_bytes"] / e["peak_allocated_bytes"]
        print(f"   {e}", flush=True)
        if save is not None:
            save(result)
    if cap and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    res, st = result.get("resident", {}), result.get("streamed", {})
    if "step_seconds" in res and "step_seconds" in st:
        result["streamed_over_resident"] = st["step_seconds"] / res["step_seconds"]
    fs = result.get("fsdp2_cpu_offload", {})
    if "step_seconds" in fs and "step_seconds" in st:
        result["fsdp2_over_streamed"] = fs["step_seconds"] / st["step_seconds"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--engines", default="", help=f"comma-separated subset of {', '.join(ENGINES)} (default: each "
                                                  "case's own list)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the script works, nothing measured")
    args = ap.parse_args()
    import torch

    if args.smoke:
        device, cases = torch.device("cpu"), SMOKE
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        cases = {k: CASES[k] for k in args.cases.split(",")}
    else:
        print("stream_gpu: no GPU (use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"benchmark": "stream_gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": name, "torch": torch.__version__, "smoke": args.smoke,
              "link": _link() if device.type == "cuda" else None, "cases": {}}
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = Path(args.out or ROOT / "bench" / "results" / f"stream-gpu-{'smoke' if args.smoke else slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    only = tuple(e for e in args.engines.split(",") if e)
    for case_name, case in cases.items():
        def save(partial, case_name=case_name):  # after every engine: a run stopped at its limit keeps its results
            report["cases"][case_name] = partial
            out.write_text(json.dumps(report, indent=2) + "\n")
        save(run_case(case_name, case, device, args.steps, only, save))
    print(f"{'case':10} {'engine':18} {'step s':>8} {'tok/s':>9} {'peak GiB':>9} {'plan/meas':>9} {'copy GB/s':>9}")
    for case_name, r in report["cases"].items():
        for engine in ENGINES:
            e = r.get(engine)
            if e is None:
                continue
            if "error" in e:
                print(f"{case_name:10} {engine:18} {e['error']}")
                continue
            peak = e.get("peak_allocated_bytes")
            print(f"{case_name:10} {engine:18} {e['step_seconds']:8.3f} {e['tokens_per_s']:9.0f} "
                  f"{(peak or 0) / GIB:9.2f} {e.get('planned_over_measured') or 0:9.2f} "
                  f"{e.get('copy_gb_per_s') or 0:9.1f}")
        if "streamed_over_resident" in r:
            print(f"{case_name:10} streamed / resident step time: {r['streamed_over_resident']:.2f}x (goal <= 1.15x)")
        if "fsdp2_over_streamed" in r:
            print(f"{case_name:10} FSDP2 CPU offload / streamed step time: {r['fsdp2_over_streamed']:.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
