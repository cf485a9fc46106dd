"""Several processes, one run: torch's own engine (torchrun, DistributedDataParallel), nothing hand-made.

torchrun starts the processes (one machine or several, c10d rendezvous); DDP averages the trainable
gradients in buckets that overlap the backward pass, and ``no_sync`` skips that on the accumulation
micro-steps. The only collectives written here are the few scalars the recipe must agree on: the
window's token count, the logged loss and "has anyone been signalled?".

Every machine's first process (local rank 0) is a *writer*: it keeps the run folder on its own disk —
checkpoints, metrics, evals, the adapter — so each box of a home lab holds a complete, resumable copy
(all replicas are identical by construction). Which machine gets global rank 0 is the rendezvous' choice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from hwcompat.errors import InputError
from hwcompat import envvars


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    nnodes: int = 1

    @property
    def writer(self) -> bool:
        """This process keeps its machine's run folder and prints its progress."""
        return self.local_rank == 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def log(dist: Dist, msg: str) -> None:
    if dist.writer:
        print(msg, file=sys.stderr, flush=True)


def init(device_kind: str) -> Dist:
    """Join the process group torchrun set up (nccl on GPUs, gloo on the CPU); one process: no group."""
    world = int(envvars.get("WORLD_SIZE", default="1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    td.init_process_group({"cuda": "nccl", "xpu": "xccl"}.get(device_kind, "gloo"))
    local_world = int(envvars.get("LOCAL_WORLD_SIZE", default=str(world)))
    return Dist(td.get_rank(), td.get_world_size(), int(envvars.get("LOCAL_RANK", default="0")),
                max(1, world // max(1, local_world)))


def check_same_run(dist: Dist, identity: dict[str, str]) -> None:
    """All processes resolved the same profile family and settings, or none trains.

    Each machine resolves its own card: a P40 box and a V100 box would train in different dtypes and
    kernels, which DDP cannot average meaningfully."""
    if dist.world == 1:
        return
    import torch.distributed as td

    seen: list = [None] * dist.world
    td.all_gather_object(seen, identity)
    for rank, other in enumerate(seen):
        diff = {k: (identity[k], other.get(k)) for k in identity if other.get(k) != identity[k]}
        if diff:
            what = "; ".join(f"{k}: {a} here, {b} on rank {rank}" for k, (a, b) in diff.items())
            raise InputError(
                f"the processes of this run disagree ({what}). Devices of different families cannot share one "
                "training run; train each group on its own (`hwcompat detect` on each machine shows its family), "
                "and give every machine the same config")


def wrap(module, dist: Dist, device):
    """DDP over the trainable parameters (frozen base weights are ignored by DDP's reducer)."""
    if dist.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def all_sum(dist: Dist, value: float, device) -> float:
    if dist.world == 1:
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=device)  # token counts stay exact
    torch.distributed.all_reduce(t)
    return t.item()


def all_average(dist: Dist, values: dict[str, float], device, summed: tuple[str, ...] = (),
                maxed: tuple[str, ...] = ()) -> dict[str, float]:
    """Every rank's figures, in two collectives: the mean across ranks, the total for ``summed`` keys, the largest
    for ``maxed`` ones (every rank holds the same keys: one objective, one config)."""
    if dist.world == 1 or not values:
        return values
    import torch

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    top = t.clone()
    torch.distributed.all_reduce(t)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    return {k: top[i].item() if k in maxed else t[i].item() / (1 if k in summed else dist.world)
            for i, k in enumerate(keys)}


def any_rank(dist: Dist, flag: bool, device) -> bool:
    """True on every rank when it is true on any (a stop must be agreed, or one rank would wait forever)."""
    return all_sum(dist, 1.0 if flag else 0.0, device) > 0


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


def close(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
        td.destroy_process_group()
