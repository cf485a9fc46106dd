"""Preference pairs for DPO: read and checked with file:line, in the formats TRL users already have.

    {"prompt": "…", "chosen": "…", "rejected": "…"}                                   # standard
    {"prompt": [{"role": "user", …}], "chosen": [{"role": "assistant", …}], "rejected": […]}   # conversational
    {"chosen": [user…, assistant…], "rejected": [user…, assistant…]}                  # implicit prompt

Errors: missing/empty fields, NUL and other corruption (the SFT checks), chosen identical to rejected, and
(implicit prompt) chosen and rejected with different prompts. Warnings: duplicate pairs, eval pairs also in
train. Truncation that leaves a response with no tokens is an error found at tokenisation. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat.data.problems import Report, bad_text, clean_text
from hwcompat.data.rows import CHARS_PER_TOKEN_LIMIT, check_rows, json_rows, split_eval, too_long
from hwcompat.data.turns import ROLES, Example, order_problem


@dataclass(frozen=True)
class Pair:
    """One prompt and two answers to it; ``chosen`` is preferred."""

    prompt: tuple[tuple[str, str], ...]  # (role, content) turns before the answer, ending with a user turn
    chosen: str
    rejected: str
    file: str
    line: int

    def example(self, chosen: bool) -> Example:
        """The pair's chosen (or rejected) side as an SFT row, so both sides are tokenised and masked like SFT."""
        return Example(self.prompt + (("assistant", self.chosen if chosen else self.rejected),), self.file, self.line)

    @property
    def key(self) -> str:
        return json.dumps([self.prompt, self.chosen, self.rejected])

    @property
    def prompt_key(self) -> str:
        return json.dumps(self.prompt)


def _turns(value: Any, where: str, report: Report) -> list[tuple[str, str]] | None:
    """A list of {role, content} messages, each checked like an SFT message."""
    if not isinstance(value, list) or not value:
        report.error(f"{where}: expected a non-empty list of {{role, content}} messages, got {json.dumps(value)[:60]}")
        return None
    out = []
    for i, m in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            report.error(f"{w}: expected {{role: {' | '.join(ROLES)}, content}}, got {json.dumps(m)[:60]}")
            return None
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            report.error(f"{w}.content: {'empty' if isinstance(content, str) else 'expected a string'}")
            return None
        if bad_text(content, f"{w}.content", report):
            return None
        out.append((m["role"], content))
    return out


def _answer(row: dict, key: str, where: str, report: Report) -> str | None:
    """``chosen`` / ``rejected`` as a string or as one assistant message."""
    value = row.get(key)
    if value is None:
        report.error(f"{where}: {key}: missing")
        return None
    if isinstance(value, list):
        turns = _turns(value, f"{where}: {key}", report)
        if turns is None:
            return None
        if len(turns) != 1 or turns[0][0] != "assistant":
            report.error(f"{where}: {key}: expected one assistant message (the answer), got roles "
                         f"{[r for r, _ in turns]}; put earlier turns in prompt")
            return None
        return turns[0][1]
    return clean_text(value, f"{where}: {key}", report, "a string or an assistant message")


def _prompt(row: dict, where: str, report: Report) -> list[tuple[str, str]] | None:
    value = row.get("prompt")
    if isinstance(value, str):
        if not value.strip():
            report.error(f"{where}: prompt: empty")
            return None
        return None if bad_text(value, f"{where}: prompt", report) else [("user", value)]
    turns = _turns(value, f"{where}: prompt", report)
    problem = order_problem(turns, "user") if turns is not None else None
    if problem:
        report.error(f"{where}: prompt{problem}")
        return None
    return turns


def _implicit(row: dict, where: str, report: Report) -> tuple[list, str, str] | None:
    """TRL's implicit-prompt form: chosen and rejected are whole conversations sharing everything but the answer."""
    sides = []
    for key in ("chosen", "rejected"):
        turns = _turns(row.get(key), f"{where}: {key}", report)
        if turns is None:
            return None
        if turns[-1][0] != "assistant" or len(turns) < 2:
            report.error(f"{where}: {key}: the conversation must end with the assistant's answer after a prompt")
            return None
        problem = order_problem(turns, "assistant")
        if problem:
            report.error(f"{where}: {key}{problem}")
            return None
        sides.append(turns)
    if sides[0][:-1] != sides[1][:-1]:
        report.error(f"{where}: chosen and rejected have different prompts (the messages before the last assistant "
                     "turn differ); a preference pair compares two answers to one prompt")
        return None
    return sides[0][:-1], sides[0][-1][1], sides[1][-1][1]


def _pair(row: dict, where: str, report: Report) -> tuple[list, str, str] | None:
    if "prompt" not in row and isinstance(row.get("chosen"), list):
        return _implicit(row, where, report)
    if "prompt" not in row:
        report.error(f"{where}: prompt: missing (expected prompt, chosen and rejected; got {sorted(row)})")
        return None
    prompt, chosen, rejected = (_prompt(row, where, report), _answer(row, "chosen", where, report),
                                _answer(row, "rejected", where, report))
    return (prompt, chosen, rejected) if prompt and chosen and rejected else None


def read_pairs(path: str | Path, report: Report, system_prompt: str | None = None,
               max_seq_len: int | None = None, columns: dict[str, str] | None = None) -> list[Pair]:
    """One file of preference pairs (JSONL or any container ``sources`` reads); problems go to ``report`` with
    their location."""
    p = Path(path)
    max_chars = max_seq_len * CHARS_PER_TOKEN_LIMIT if max_seq_len else None
    pairs: list[Pair] = []
    for lineno, where, row in json_rows(p, report, max_seq_len, columns):
        parsed = _pair(row, where, report)
        if parsed is None:
            continue
        prompt, chosen, rejected = parsed
        if chosen == rejected:
            report.error(f"{where}: chosen and rejected are identical: the pair teaches nothing; fix or drop the row")
            continue
        if too_long(prompt + [("assistant", max(chosen, rejected, key=len))], max_chars, where, report, max_seq_len):
            continue
        if system_prompt and prompt[0][0] != "system":
            prompt = [("system", system_prompt)] + prompt
        pairs.append(Pair(tuple(prompt), chosen, rejected, str(p), lineno))
    report.counts[str(p)] = len(pairs)
    report.formats[str(p)] = "preference pairs"
    if not pairs and not any(e.startswith(f"{p}") for e in report.errors):
        report.error(f"{p}: no preference pairs (the file is empty)")
    return pairs


def load_pairs(train_files: list[str], eval_files: list[str], eval_fraction: float, seed: int,
               system_prompt: str | None = None, max_seq_len: int | None = None,
               columns: dict[str, str] | None = None) -> tuple[list[Pair], list[Pair], Report]:
    """Read and check every file; the caller refuses to train when ``report.errors``."""
    report = Report()
    train = [x for f in train_files for x in read_pairs(f, report, system_prompt, max_seq_len, columns)]
    evals = [x for f in eval_files for x in read_pairs(f, report, system_prompt, max_seq_len, columns)]
    if report.errors:
        return train, evals, report
    if not eval_files:
        train, evals = split_eval(train, eval_fraction, seed)
    check_rows(train, evals, report, "duplicate pairs in train", "eval prompts also in train")
    if not train:
        report.error("train data: no pairs left after the eval split")
    return train, evals, report
