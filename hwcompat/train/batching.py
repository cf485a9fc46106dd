"""Tokenise with loss masking, then batch without wasting compute on padding.

Masking: only assistant tokens are trained; every prompt, system and
template token is labelled -100. With a chat template the boundaries come
from rendering growing prefixes of the conversation, so they are exact for
any template that renders prefixes stably (checked, not assumed).

Batching (``batching`` in the config):
- ``packed``: each micro-batch's examples are concatenated into one row with
  position ids restarting per example; transformers builds a block-diagonal
  causal mask from them (flash-attention-2 uses varlen kernels), so examples
  never attend to each other and there is no padding at all.
- ``length_grouped``: examples of similar length share a micro-batch, padded
  to the longest in it; the padding mask keeps them apart.
- ``padded``: random order, padded to the longest in the batch (what a plain
  script does; kept for comparisons).
- ``auto``: packed with flash-attention-2 (no quadratic cost), else
  length_grouped.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any

from hwcompat.data.chat import PLAIN_HEADERS, bos_ids, ids_of, template
# the recipe's rendering, re-exported so a caller that tokenises also renders through this one module
from hwcompat.data.chat import render_prompt_ids, render_prompt_text, uses_chat_template  # noqa: F401
from hwcompat.data.problems import Report
from hwcompat.data.turns import Example
from hwcompat.data.sources import location
from hwcompat.choices import Batching

IGNORE = -100

@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    where: str  # file:line, for messages

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def tokenize_example(tokenizer, ex: Example, chat: bool) -> Tokenized:
    """Token ids and labels; raises ValueError when the template is not prefix-stable."""
    msgs = list(ex.messages)
    where = location(ex.file, ex.line)
    ids: list[int] = []
    labels: list[int] = []
    if chat:
        prev: list[int] = []
        for k, (role, _) in enumerate(msgs):
            if role == "assistant":
                with_prompt = ids_of(template(tokenizer, msgs[:k], where, tokenize=True, add_generation_prompt=True))
                full = ids_of(template(tokenizer, msgs[:k + 1], where, tokenize=True))
                if with_prompt[:len(prev)] != prev or full[:len(with_prompt)] != with_prompt:
                    raise ValueError(f"{where}: the chat template does not render prefixes stably, so prompt and "
                                     "response tokens cannot be told apart; set chat_template=false")
                ids += with_prompt[len(prev):]
                labels += [IGNORE] * (len(with_prompt) - len(prev))
                ids += full[len(with_prompt):]
                labels += [IGNORE] * (len(full) - len(with_prompt)) if k in ex.untrained else full[len(with_prompt):]
                prev = full
        return Tokenized(ids, labels, where)
    ids += bos_ids(tokenizer)
    labels += [IGNORE] * len(ids)
    for k, (role, content) in enumerate(msgs):
        if role == "assistant":
            head = tokenizer.encode(PLAIN_HEADERS[role], add_special_tokens=False)
            body = tokenizer.encode(content, add_special_tokens=False)
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids += head + body + eos
            labels += [IGNORE] * len(head) + ([IGNORE] * len(body + eos) if k in ex.untrained else body + eos)
            sep = tokenizer.encode("\n\n", add_special_tokens=False)
            ids += sep
            labels += [IGNORE] * len(sep)
        else:
            part = tokenizer.encode(f"{PLAIN_HEADERS[role]}{content}\n\n", add_special_tokens=False)
            ids += part
            labels += [IGNORE] * len(part)
    return Tokenized(ids, labels, where)


def tokenize_all(tokenizer, examples: list[Example], chat: bool, max_len: int, overlong: str,
                 report: Report, split: str) -> list[Tokenized]:
    """Tokenise, apply the max-length policy (never silently), flag rows with nothing to train."""
    out: list[Tokenized] = []
    for ex in examples:
        try:
            t = tokenize_example(tokenizer, ex, chat)
        except ValueError as exc:
            report.error(str(exc))
            continue
        if len(t.input_ids) > max_len:
            if overlong == "drop":
                report.warn(f"{split} rows over max_seq_len={max_len}, dropped", f"{t.where} ({len(t.input_ids)} tokens)")
                continue
            report.warn(f"{split} rows over max_seq_len={max_len}, truncated", f"{t.where} ({len(t.input_ids)} tokens)")
            t = Tokenized(t.input_ids[:max_len], t.labels[:max_len], t.where)
        if t.n_trainable == 0:
            report.error(f"{t.where}: response: no trainable tokens after truncation to max_seq_len={max_len} "
                         "(the prompt fills the whole window); raise max_seq_len or shorten the prompt")
            continue
        out.append(t)
    lengths = [len(t.input_ids) for t in out]
    if len(lengths) >= 8:
        med = statistics.median(lengths)
        for t in out:
            if len(t.input_ids) > 8 * med:
                report.warn(f"{split} length outliers (> 8x the median of {int(med)} tokens)",
                            f"{t.where} ({len(t.input_ids)} tokens)")
    return out


def resolve_batching(setting: str, attention: str, objective_default: str | None = None) -> str:
    """``auto``: the objective's own choice if it has one (DPO: random order), else by the attention kernel."""
    if setting != "auto":
        return setting
    if objective_default:
        return objective_default
    return "packed" if attention == "flash_attention_2" else "length_grouped"


def plan_batches(lengths: list[int], micro_batch: int, mode: str, seed: int) -> list[list[int]]:
    """Index lists, one per micro-batch, deterministic for (seed, lengths): a resume recomputes the same plan. The
    order is the seed's shuffle only; a run's costliest micro-batch is tried before its first step instead
    (loop.probe_memory), since moving it to the front changed what the run learned."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if mode == Batching.length_grouped:
        # Sort within mega-chunks so batches are length-homogeneous but epochs still differ.
        chunk = micro_batch * 32
        grouped: list[int] = []
        for s in range(0, len(idx), chunk):
            grouped += sorted(idx[s:s + chunk], key=lambda i: lengths[i], reverse=True)
        batches = [grouped[s:s + micro_batch] for s in range(0, len(grouped), micro_batch)]
        rng.shuffle(batches)
    else:
        batches = [idx[s:s + micro_batch] for s in range(0, len(idx), micro_batch)]
    return batches


def batch_cost(batch: list[int], lengths: list[int], mode: str) -> int:
    """Token positions a micro-batch puts through the model: the packed window's length, else rows x the longest."""
    if mode == Batching.packed:
        return sum(lengths[i] for i in batch)
    return len(batch) * max(lengths[i] for i in batch)


def collate(items: list[Tokenized], mode: str, pad_id: int) -> dict[str, Any]:
    """Tensors for one micro-batch; ``n_tokens`` counts real tokens, ``n_target`` trained ones."""
    import torch

    n_tokens = sum(len(t.input_ids) for t in items)
    n_target = sum(t.n_trainable for t in items)
    if mode == Batching.packed:
        ids = [x for t in items for x in t.input_ids]
        labels: list[int] = []
        pos: list[int] = []
        for t in items:
            # The first label of each example must not be predicted from the previous example.
            labels += [IGNORE] + t.labels[1:]
            pos += list(range(len(t.input_ids)))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos]), "n_tokens": n_tokens, "n_target": n_target}
    width = max(len(t.input_ids) for t in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels_t = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        input_ids[i, :n] = torch.tensor(t.input_ids)
        labels_t[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels_t, "attention_mask": mask, "n_tokens": n_tokens,
            "n_target": n_target}
