"""Your model's answers, row by row, and its mistakes turned into preference pairs (``hwcompat eval --predictions /
--pairs``): the loop SFT -> eval --pairs -> DPO -> guard, without a hand-written script.

A pair is (the row's reference, a wrong answer). The model's own mistakes are the obvious wrong answers, but pairs
made from mistakes alone are few and alike, and DPO on them can make the model worse at the rows it already gets
right (55 mistake pairs did, on a 7-intent task; 243 diverse ones helped). So for a row it gets right, the pair's
rejected answer is a *confusable* one: of ``samples`` answers sampled from the model (temperature 1), the wrong one
the model itself rates most likely (highest mean log-probability per token). A right row whose samples are all
right gives no pair.

A row is right when its headline metric is 1 (field F1 for JSON answers, accuracy for labels, exact match
otherwise: ``data.metrics``). Prompt-only rows (no reference) get predictions but no pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hwcompat.data import metrics

#: The per-row metrics of each task kind (data.metrics.detect_kind), the first being the headline.
ROW_KEYS = {"json": ("field_f1", "json_valid", "field_precision", "field_recall"), "label": ("accuracy",),
            "exact": ("exact_match",)}


@dataclass(frozen=True)
class Row:
    messages: tuple  # (role, content) turns before the answer
    reference: str | None
    where: str  # file:line


def score_row(kind: str, answer: str, reference: str | None) -> dict[str, float]:
    return {k: metrics.row_score(k, answer, reference) for k in ROW_KEYS[kind]} if reference is not None else {}


def right(kind: str, scores: dict[str, float]) -> bool:
    return bool(scores) and scores[ROW_KEYS[kind][0]] >= 1.0


def predictions(rows: list[Row], answers: list[str], kind: str) -> list[dict[str, Any]]:
    """One record per row: its prompt, reference, the model's answer, the row's metrics and whether it is right."""
    out = []
    for row, answer in zip(rows, answers):
        scores = score_row(kind, answer, row.reference)
        out.append({"where": row.where, "prompt": _messages(row.messages), "reference": row.reference,
                    "answer": answer, "metrics": scores, "correct": right(kind, scores) if scores else None})
    return out


def pairs(rows: list[Row], answers: list[str], kind: str, confusable: dict[int, str]) -> list[dict[str, Any]]:
    """Preference pairs: chosen = the reference; rejected = the model's wrong answer, or for a row it got right the
    confusable answer found for it (``confusable[i]``)."""
    out = []
    for i, (row, answer) in enumerate(zip(rows, answers)):
        if row.reference is None:
            continue
        got_it = right(kind, score_row(kind, answer, row.reference))
        wrong = confusable.get(i) if got_it else answer
        if not wrong or wrong.strip() == row.reference.strip():
            continue
        out.append({"prompt": _messages(row.messages), "chosen": [{"role": "assistant", "content": row.reference}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                    "source": "confusable" if got_it else "mistake", "where": row.where})
    return out


def _messages(turns) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def sample_answers(model, tokenizer, prompt_ids: list[list[int]], n: int, max_new: int, device, seed: int,
                   batch: int = 8) -> list[list[tuple[str, float]]]:
    """``n`` sampled answers per prompt (temperature 1) with their mean log-probability per token under the model,
    through the rollout's one-prefill, G-way-expanded sampler."""
    import torch

    from hwcompat.train import rollout

    eos = rollout.eos_ids(model, tokenizer)
    out: list[list[tuple[str, float]]] = []
    for s in range(0, len(prompt_ids), batch):
        chunk = prompt_ids[s:s + batch]
        with torch.no_grad():
            got = rollout.generate(model, chunk, n, max_new, 1.0, 1.0, eos, tokenizer.pad_token_id,
                                   rollout.seed_for(seed, s))
            logps = _mean_logps(model, chunk, got.completions, n, tokenizer.pad_token_id, device)
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in got.completions]
        out += [list(zip(texts[i * n:(i + 1) * n], logps[i * n:(i + 1) * n])) for i in range(len(chunk))]
    return out


def _mean_logps(model, prompts, completions, n: int, pad_id: int, device) -> list[float]:
    """Mean log p(token) of each completion given its prompt (a padded forward, the completion positions only)."""
    import torch

    width = max(len(p) for p in prompts)
    longest = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), width + longest), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, comp in enumerate(completions):
        p = prompts[j // n]
        ids[j, width - len(p):width] = torch.tensor(p)
        ids[j, width:width + len(comp)] = torch.tensor(comp, dtype=torch.long)
        attn[j, width - len(p):width + len(comp)] = 1
    ids, attn = ids.to(device), attn.to(device)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                   logits_to_keep=longest + 1).logits[:, :-1].float()
    token = logits.log_softmax(-1).gather(-1, ids[:, width:].unsqueeze(-1)).squeeze(-1)
    mask = attn[:, width:].float()
    return ((token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).tolist()


def confusable(rows: list[Row], answers: list[str], kind: str, sampled: dict[int, list[tuple[str, float]]]
               ) -> dict[int, str]:
    """For each right row with samples: its most likely wrong sample (by mean log-probability)."""
    out = {}
    for i, samples in sampled.items():
        wrong = [(logp, text) for text, logp in samples
                 if text and not right(kind, score_row(kind, text, rows[i].reference))]
        if wrong:
            out[i] = max(wrong)[1]
    return out
