"""Objectives: what a run learns, each a small named piece the recipe drives.

An objective owns its data (rows read, checked and tokenised), its batch shape, its loss and its eval
metrics; the recipe (``hwcompat.train.loop``) owns everything else: the schedule, accumulation, clipping,
scaling, checkpoints, signals, logging and the distributed engine. Adding one is a new module here plus
its name below (the config's ``method`` vocabulary: ``method: sft``). This module never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple, Protocol

from hwcompat.choices import Method

#: objective name -> "module:class" under this package: one per member of choices.Method.
REGISTRY = {Method.sft.value: "sft:SFT", Method.dpo.value: "dpo:DPO", Method.grpo.value: "grpo:GRPO"}


class Objective(Protocol):
    """The interface the recipe relies on (see ``sft.SFT`` for the reference implementation)."""

    name: str

    @staticmethod
    def check(cfg) -> tuple[str, float]:
        """The launcher's text-level data checks (raises DataError): report text, worst share of answer positions."""

    def load(self, tokenizer, log) -> None:
        """Read, check and tokenise train/eval data (raises DataError); sets ``train`` and ``evals``."""

    def lengths(self) -> list[int]:
        """Token length of every training item, for the batch planner."""

    def collate(self, indices: list[int], mode: str, pad_id: int) -> dict[str, Any]:
        """One micro-batch of tensors plus ``n_tokens`` (processed) and ``n_target`` (loss-normalising count)."""

    def bind(self, model, compile_backend: str) -> None:
        """Keep the model the loss runs through (compiled where the profile says so)."""

    def loss(self, batch: dict[str, Any], n_items: float):
        """Summed loss of the batch divided by ``n_items`` (the accumulation window's global count)."""

    def evaluate(self, model, with_tasks: bool) -> dict[str, float]:
        """Eval metrics of the current model (``eval_loss`` at least, task metrics when ``with_tasks``)."""


def objective_class(name: str) -> type:
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def create(name: str, cfg, profile, device) -> Objective:
    return objective_class(name)(cfg, profile, device)


class HeadSplit(NamedTuple):
    """A causal LM taken apart for a loss that runs the head itself: where the logits come from and how."""

    base: Any
    decoder: Any  # hidden states
    head: Any  # the LM head (hidden -> vocabulary)
    scale: float | None  # Cohere's logit_scale: logits * scale
    cap: float | None  # Gemma 2's final_logit_softcapping: cap * tanh(logits / cap)


def head_split(model) -> HeadSplit | None:
    """The parts a loss needs to compute logits chunk by chunk at the positions it needs, else None.

    The one rule SFT's and DPO's losses share: the usual ``.model`` / ``.lm_head`` split, with the logit transform
    the model's own forward applies after the head (soft-capping, logit scale) carried along, so the chunked loss
    (``linear_logps``) gives exactly the model's logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(base, "model") and hasattr(base, "lm_head")):
        return None
    cfg = getattr(base, "config", None)
    scale = getattr(cfg, "logit_scale", None) or None
    cap = getattr(cfg, "final_logit_softcapping", None) or None
    return HeadSplit(base, base.model, base.lm_head, scale, cap)


def starting_weights(model, init_adapter: str | None, full: bool = False):
    """The trainable weights as loaded (before any step, before a resume's checkpoint) when the run starts from
    ``init_adapter`` (the reference is base + that adapter) or is a full fine-tune that needs a reference (``full``:
    a frozen copy of the trained weights as the card holds them); None otherwise (the reference is the bare base)."""
    if not (init_adapter or full):
        return None
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def as_reference(model, start):
    """The reference model, one copy of the base: the adapter disabled, or (``start``: init_adapter) the adapter's
    starting weights swapped in by pointer. DPO's and GRPO's KL reference alike."""
    if start is None:
        return model.disable_adapter()
    return swapped_in(model, start)


def swapped_in(model, weights, dtype=None):
    """A context in which the parameters named in ``weights`` hold those tensors (by pointer where device and
    dtype already match), put back as they were on the way out: a reference model without a second model."""
    import contextlib

    @contextlib.contextmanager
    def swapped():
        params = {n: p for n, p in model.named_parameters() if n in weights}
        streamer = getattr(model, "hwcompat_streamer", None)  # a streamed layer's visit binds its slot instead
        layers = (streamer.substituted({id(p): weights[n] for n, p in params.items()}, id(weights))
                  if streamer is not None else contextlib.nullcontext())
        live = {n: p.data for n, p in params.items()}
        for n, p in params.items():
            p.data = weights[n].to(p.device, dtype or weights[n].dtype)
        try:
            with layers:
                yield
        finally:
            for n, p in params.items():
                p.data = live[n]

    return swapped()
