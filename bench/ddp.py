"""Two gloo processes: DistributedDataParallel (+ no_sync) vs the hand-made per-tensor all_reduce it replaced.

    python bench/ddp.py [--steps 12] [--accum 4] [--hidden 256] [--layers 4] [--out bench/results/ddp.json]

Same model (a Llama built from a config, LoRA on every linear), same data, same loss normalisation (the
global response-token count), same scalar collectives (token count, logged loss, the stop flag per
micro-batch) in both; only the gradient reduction differs:
  before: backward on every micro-batch, then one all_reduce per LoRA tensor and a division (the old loop);
  after:  DDP over the trainable parameters, no_sync() on all but the last micro-batch (bucketed, overlapped).
Reports the median step time of each, their ratio, collective calls per step, and the largest difference
between the two runs' LoRA weights after the last step (they must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=2000)
    model = LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))


def _batches(args, rank: int, world: int):
    import torch

    g = torch.Generator().manual_seed(1)
    total = args.steps * args.accum * world
    ids = torch.randint(0, 2000, (total, args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, :, : args.seq // 2] = -100  # prompt half: no loss, as in SFT
    return [(ids[i], labels[i]) for i in range(rank, total, world)]


def _worker(rank: int, world: int, port: int, mode: str, args, out: dict) -> None:
    import torch
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world)
    calls = {"n": 0}
    real_all_reduce = td.all_reduce

    def counted(*a, **k):
        calls["n"] += 1
        return real_all_reduce(*a, **k)

    td.all_reduce = counted
    model = _model(args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine = model
    if mode == "ddp":
        engine = DistributedDataParallel(model, broadcast_buffers=False)

        # DDP's own all-reduce runs in C++ where no Python patch sees it; its default Python hook does the same
        # averaging through torch.distributed.all_reduce, so each bucket is counted by `counted` above.
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        engine.register_comm_hook(None, allreduce_hook)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    data = _batches(args, rank, world)
    times, per_step = [], []
    for step in range(args.steps):
        window = data[step * args.accum:(step + 1) * args.accum]
        t0, c0 = time.perf_counter(), calls["n"]
        n = torch.tensor([float(sum((lab != -100).sum().item() for _, lab in window))], dtype=torch.float64)
        td.all_reduce(n)
        for i, (ids, lab) in enumerate(window):
            if i:
                td.all_reduce(torch.tensor([0.0], dtype=torch.float64))  # the stop flag, as the recipe checks it
            last = i == len(window) - 1
            with (engine.no_sync() if mode == "ddp" and not last else nullcontext()):
                logits = engine(input_ids=ids).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                                         ignore_index=-100, reduction="sum") / (n.item() / world)
                loss.backward()
        if mode == "manual":
            for p in trainable:
                if p.grad is not None:
                    td.all_reduce(p.grad)
                    p.grad /= world
        td.all_reduce(torch.tensor([loss.item()], dtype=torch.float64))  # the logged loss
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        td.all_reduce(torch.tensor([0.0], dtype=torch.float64))  # stop flag after the step
        times.append(time.perf_counter() - t0)
        per_step.append(calls["n"] - c0)
    if rank == 0:
        out[mode] = {"step_s": times, "collectives_per_step": per_step,
                     "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                     "trainable_tensors": len(trainable)}
    td.destroy_process_group()


def _run(mode: str, args) -> dict:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), mode, args, out), nprocs=2, join=True)
        return dict(out)[mode]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddp.json"))
    args = ap.parse_args()
    res = {mode: _run(mode, args) for mode in ("manual", "ddp")}
    diff = max((res["manual"]["weights"][k] - res["ddp"]["weights"][k]).abs().max().item()
               for k in res["manual"]["weights"])
    rows = {}
    for mode, r in res.items():
        steady = r["step_s"][2:]  # the first steps include allocator and DDP bucket warm-up
        rows[mode] = {"median_step_s": statistics.median(steady), "collectives_per_step": r["collectives_per_step"][-1],
                      "trainable_tensors": r["trainable_tensors"]}
    report = {"benchmark": "ddp", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "settings": vars(args), "processes": 2, "backend": "gloo", "results": rows,
              "ratio_step_time_ddp_vs_manual": rows["ddp"]["median_step_s"] / rows["manual"]["median_step_s"],
              "max_abs_weight_difference": diff}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'gradient reduction':32} {'step (median)':>14} {'collectives/step':>17}")
    for mode, name in (("manual", "per-tensor all_reduce (before)"), ("ddp", "DDP + no_sync (after)")):
        r = rows[mode]
        print(f"{name:32} {r['median_step_s']:13.3f}s {r['collectives_per_step']:17d}")
    print(f"DDP / before step time: {report['ratio_step_time_ddp_vs_manual']:.2f}x; "
          f"largest LoRA weight difference after {args.steps} steps: {diff:.2e}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
