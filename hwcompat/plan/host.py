"""The host side of a plan: the optimizer in host RAM (``optimizer_offload: host``), the PCIe link, the card's
peak throughput (``catalog/throughput.yaml``) and the host a device is planned with."""

from __future__ import annotations

from dataclasses import dataclass

from hwcompat import compat
from hwcompat.choices import Offload, Vendor
from hwcompat.plan.shape import GIB, ModelShape
from hwcompat.plan.inputs import Host, PlanInput, throughput_table


@dataclass(frozen=True)
class Stream:
    """The streamed terms of a plan (offload: layers)."""

    layer_bytes: int  # one decoder layer's frozen weights
    host_bytes: int  # host RAM the run needs: the base (loaded on the host, then pinned layer by layer) + a layer
    host_ram_bytes: int | None  # what the host has
    bytes_per_micro_step: int  # host -> device: every layer in forward and again in backward
    link_bytes_per_s: float  # effective pinned host -> device rate of the link
    link: str  # e.g. "PCIe 3.0 x16"
    copy_seconds: float  # per micro-step
    compute_seconds: float | None  # per micro-step, from the card's peak x sustained fraction
    step_seconds: float | None  # max(compute, copy): the copies overlap compute (+ a GRPO rollout's copies)
    rollout_bytes: int = 0  # GRPO: the rollout's share of bytes_per_micro_step (every layer per new token)

    @property
    def host_fits(self) -> bool:
        return self.host_ram_bytes is None or self.host_bytes <= self.host_ram_bytes


@dataclass(frozen=True)
class HostOptimizer:
    """The host side of ``optimizer_offload: host`` (train/host_optim.py): RAM and the copies of one step."""

    host_bytes: int  # fp32 masters, fp32 gradients, AdamW's two moments, pinned staging, the process
    host_ram_bytes: int | None
    bytes_per_step: int  # device -> host gradients (each micro-step) + host -> device weights (once a step)
    link: str
    copy_seconds: float  # per optimizer step, at the link's rate (gradient copies overlap backward)
    largest_params: int  # the largest model whose host side fits this host's RAM (0: unknown)

    @property
    def host_fits(self) -> bool:
        return self.host_ram_bytes is None or self.host_bytes <= self.host_ram_bytes


#: optimizer_offload=host: device gradients in flight to the host before the oldest copy is waited for
#: (train/host_optim.py IN_FLIGHT_BYTES).
HOST_GRAD_IN_FLIGHT = 256 << 20


def host_optimizer_terms(shape: ModelShape, inp: PlanInput, db: int, host: Host, vendor: str) -> HostOptimizer:
    """Host RAM and copies of ``optimizer_offload: host``: 16 bytes per parameter (fp32 master, fp32 gradient,
    AdamW's two moments), the pinned staging a CUDA card's gradients land in (its dtype), the process; each step
    moves every gradient down once per micro-step and every weight up once."""
    n = shape.params()
    staging = n * db if vendor == Vendor.nvidia else 0
    # the streamed working copy
    pinned = shape.layers * shape.layer_params() * db if inp.offload == Offload.layers else 0
    per_param = 16 + (db if vendor == Vendor.nvidia else 0) + (db if inp.offload == Offload.layers else 0)
    gen, width, rate = pcie_link(host)
    moved = n * db * (inp.gradient_accumulation + 1)
    ram = host.ram_bytes
    largest = max(0, (ram - HOST_RUNTIME) // per_param) if ram else 0
    return HostOptimizer(host_bytes=16 * n + staging + pinned + HOST_RUNTIME, host_ram_bytes=ram,
                         bytes_per_step=moved,
                         link=f"PCIe {gen}.0 x{width}{'' if host.pcie_generation else ' (assumed)'}",
                         copy_seconds=moved / rate, largest_params=largest)


#: Host RAM a training process needs besides the weights (Python, torch, tokenizer, data), bytes.
HOST_RUNTIME = int(1.5 * GIB)


def pcie_link(host: Host) -> tuple[int, int, float]:
    """(PCIe generation, width, effective pinned bytes/s) of the card's link; the catalog's default when unread."""
    table = host.throughput
    gen = host.pcie_generation or table["pcie_default"]["generation"]
    width = host.pcie_width or table["pcie_default"]["width"]
    lane = table["pcie"][gen]
    return gen, width, lane["gt_per_s"] * 1e9 * lane["encoding"] * width / 8 * table["pcie_efficiency"]


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The card's dense peak in ``dtype`` from the catalog (first name match), or None when unknown."""
    for row in throughput_table()["devices"]:
        if row["match"] in device_name:
            return row.get(dtype)
    return None


def host_for(device, cpu_ram_bytes: int | None, dtype: str) -> Host:
    """A resolved device's link and speed, and the host's RAM, as the planner's ``Host``."""
    r = device.reading
    return Host(ram_bytes=cpu_ram_bytes, pcie_generation=r.pcie_generation, pcie_width=r.pcie_width,
                peak_tflops=peak_tflops(r.name, dtype),
                unified=r.unified_memory or compat.is_tegra(r.capability))
