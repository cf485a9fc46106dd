"""What an estimate is asked about: the run (``PlanInput``) and the host beside the card (``Host``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlanInput:
    method: str = "lora"  # lora | qlora | full
    seq_len: int = 2048
    batch_size: int = 1
    gradient_accumulation: int = 1  # micro-steps per optimizer step (optimizer_offload=host copies each one's grads)
    lora_rank: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    lora_dropout: bool = True
    # Sequences per training row: DPO puts a pair's chosen and rejected answers in one forward (2).
    sequences_per_row: int = 1
    # Share of positions that need logits. A plain causal-LM forward computes them everywhere (1.0);
    # hwcompat's trainer only at response tokens, so `train` passes its data's worst-case share.
    logit_fraction: float = 1.0
    generations: int = 0  # grpo: completions per prompt (G); 0: not a GRPO run. batch_size counts completions
    completion_len: int = 0  # grpo: max_completion_length (the rollout's new tokens per row)
    offload: str = "none"  # none | layers (train/stream.py); "auto" is decided by decide_offload, never estimated
    prefetch: int = 1  # offload=layers: device slots = prefetch + 1
    optimizer_offload: str = "none"  # full: none | host (train/host_optim.py); "auto": decide_offload


@dataclass(frozen=True)
class Host:
    """What a streamed run depends on besides the card's memory: host RAM, the link, the card's speed."""

    ram_bytes: int | None = None  # the host's RAM (the CPU reading); None: unknown, not checked
    pcie_generation: int | None = None
    pcie_width: int | None = None
    peak_tflops: float | None = None  # the card's dense peak in the run's dtype; None: step time not estimated
    unified: bool = False  # the card's memory is this host's RAM: the training process's host side shares it
    # catalog/throughput.yaml (PCIe rates, pinned-copy efficiency, sustained share of peak), read when the Host is
    # made, so an estimate reads no file
    throughput: dict[str, Any] = field(default_factory=lambda: throughput_table(), compare=False, repr=False)


_THROUGHPUT: dict[str, Any] = {}


def throughput_table() -> dict[str, Any]:
    """catalog/throughput.yaml, read once (PCIe rates, peak TFLOPS by device name)."""
    if not _THROUGHPUT:
        from hwcompat.datafiles import data_dir
        from hwcompat.yamlfile import load_packaged_yaml

        _THROUGHPUT.update(load_packaged_yaml(data_dir("catalog") / "throughput.yaml", "throughput table"))
    return _THROUGHPUT
