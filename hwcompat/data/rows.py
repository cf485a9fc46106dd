"""Training data: read every file strictly, check every row, normalise to chat turns (turns.py: one reader per row
format; problems.py: the report and the shared text checks).

The checks run before any model is loaded (``hwcompat data check`` runs them
alone). Every error reads ``file:line: field: what is wrong`` so a user can
jump to it; a scraper's NUL byte or a broken UTF-8 sequence is found here,
not after five hours of training on gibberish. No torch import here.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from hwcompat.data.problems import Report
from hwcompat.data.turns import FORMATS, Example, detect_format, row_messages, untrained_turns

#: Characters per token no real text reaches: a row longer than this many characters per allowed token
#: is cut by more than 99 % by truncation, and tokenising it alone can take minutes and gigabytes.
CHARS_PER_TOKEN_LIMIT = 100


BOM = b"\xef\xbb\xbf"



def json_rows(path: str | Path, report: Report, max_seq_len: int | None = None,
              columns: dict[str, str] | None = None) -> Iterator[tuple[int, str, dict]]:
    """(line or row number, its location, object) for every row of a data file in any container (JSONL, gzip
    JSONL, CSV/TSV, Parquet, Arrow, a save_to_disk folder: ``sources``), after the byte-level checks (NUL bytes,
    UTF-8, BOM, JSON, far-too-long rows); every problem goes to ``report`` with its location."""
    from hwcompat.data.sources import rows

    yield from rows(path, report, max_seq_len, columns)



def json_line(bline: bytes, lineno: int, where: str, report: Report, max_chars: int | None,
              max_seq_len: int | None) -> dict | None:
    if lineno == 1 and bline.startswith(BOM):
        bline = bline[len(BOM):]
        report.warn("byte order mark", f"{where}: the file starts with a UTF-8 BOM; it was ignored")
    if max_chars and len(bline) > 4 * max_chars:  # bytes >= characters / 4: surely too long, undecoded
        report.error(f"{where}: {len(bline):,} bytes in one row, far beyond max_seq_len={max_seq_len} tokens "
                     "(truncation would keep under 1 %); split or drop the row")
        return None
    if b"\x00" in bline:
        col = bline.index(b"\x00") + 1
        report.error(f"{where}: NUL byte (\\x00) at column {col}: the file is corrupted "
                     "(often a scraper or an encoding bug); remove the bytes or the row")
        return None
    try:
        text = bline.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.error(f"{where}: invalid UTF-8 at column {exc.start + 1} (byte 0x{bline[exc.start]:02x}); "
                     "re-encode the file as UTF-8")
        return None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        report.error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
        return None
    except RecursionError:
        report.error(f"{where}: JSON nested too deeply to read; a training row is a flat object")
        return None
    except ValueError as exc:  # e.g. a 5,000-digit integer: Python refuses to convert it
        report.error(f"{where}: a value cannot be read ({str(exc)[:100]})")
        return None
    if not isinstance(row, dict):
        report.error(f"{where}: expected a JSON object per line, got {type(row).__name__}")
        return None
    return row



def read_jsonl(path: str | Path, fmt: str, report: Report, system_prompt: str | None = None,
               max_seq_len: int | None = None, columns: dict[str, str] | None = None) -> list[Example]:
    """Read one data file (JSONL or any container ``sources`` reads); append problems to ``report``; return the
    good rows. ``columns`` renames the file's columns to the format's fields.

    With ``max_seq_len``, rows far beyond it in characters are errors found here, cheaply, before any
    tokenizer sees them (``CHARS_PER_TOKEN_LIMIT``)."""
    max_chars = max_seq_len * CHARS_PER_TOKEN_LIMIT if max_seq_len else None
    p = Path(path)
    examples: list[Example] = []
    seen_format: str | None = None if fmt == "auto" else fmt
    for lineno, where, row in json_rows(p, report, max_seq_len, columns):
        if seen_format is None:
            seen_format = detect_format(row)
            if seen_format is None:
                report.error(f"{where}: cannot tell the data format: expected 'messages', 'conversations' "
                             f"(ShareGPT), 'prompt'/'completion' or 'instruction'/'output' keys, got "
                             f"{sorted(map(str, row))[:12]}; a CSV or Parquet file with other column names "
                             "needs columns: {prompt: YOUR_COLUMN, completion: YOUR_COLUMN}")
                continue
        msgs = row_messages(row, seen_format, where, report)
        if msgs is None:
            continue
        if too_long(msgs, max_chars, where, report, max_seq_len):
            continue
        untrained = untrained_turns(row, seen_format)
        if system_prompt and msgs[0][0] != "system":
            msgs = [("system", system_prompt)] + msgs
            untrained = frozenset(i + 1 for i in untrained)
        examples.append(Example(tuple(msgs), str(p), lineno, untrained))
    report.counts[str(p)] = len(examples)
    if seen_format:
        report.formats[str(p)] = FORMATS[seen_format].label if seen_format in FORMATS else seen_format
    if not examples and not any(e.startswith(f"{p}") for e in report.errors):
        report.error(f"{p}: no examples (the file is empty)")
    return examples



def too_long(msgs, max_chars: int | None, where: str, report: Report, max_seq_len: int | None) -> bool:
    n = sum(len(c) for _, c in msgs)
    if max_chars and n > max_chars:
        report.error(f"{where}: {n:,} characters, far beyond max_seq_len={max_seq_len} "
                     "tokens (truncation would keep under 1 %); split or drop the row")
        return True
    return False


#: What stands in for a missing answer while a prompt-only row goes through the strict row checks.
_NO_ANSWER = "(no answer given)"



def _with_placeholder_answer(row: dict, fmt: str) -> tuple[dict, bool]:
    """A prompt-only row completed with a placeholder answer, so it passes through the same checks as a training
    row (roles, order, types, text); returns (row, whether it had its own answer)."""
    answer = FORMATS[fmt].answer_key
    if answer and row.get(answer) is None:
        return {**row, answer: _NO_ANSWER}, False
    msgs = row.get("messages")
    if fmt == "messages" and isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and (
            msgs[-1].get("role") in ("user", "system")):
        return {**row, "messages": [*msgs, {"role": "assistant", "content": _NO_ANSWER}]}, False
    return row, True



def read_prompts(path: str | Path, report: Report, max_rows: int | None = None,
                 columns: dict[str, str] | None = None) -> list[tuple[tuple[tuple[str, str], ...], str | None, str]]:
    """Rows to generate for: (the conversation up to the answer, the reference answer or None, "file:line").

    Training rows (their answer is the reference) or prompt-only rows (``prompt`` without ``completion``,
    ``messages`` ending with a user turn), each checked with the training rows' own rules and located by
    file:line (``generate --file``, ``export --verify --data``)."""
    out = []
    for _, where, row in json_rows(path, report, columns=_present(columns, path, report)):
        fmt = detect_format(row)
        if fmt is None:
            report.error(f"{where}: expected \"prompt\" (a string), \"messages\" (a list of {{role, content}}) or "
                         f"\"instruction\", got keys {sorted(row)[:6]}")
            continue
        full, answered = _with_placeholder_answer(row, fmt)
        msgs = row_messages(full, fmt, where, report)
        if msgs is not None:
            out.append((tuple(msgs[:-1]), msgs[-1][1] if answered else None, where))
        if max_rows and len(out) >= max_rows:
            break
    if not out and not report.errors:
        report.error(f"{path}: no rows (the file is empty)")
    return out



def _present(columns: dict[str, str] | None, path: str | Path, report: Report) -> dict[str, str] | None:
    """A run's ``columns`` mapping for a prompts file: the prompt's column must be there; the answer's may not be
    (prompt-only rows), so a mapped answer column the file lacks is dropped from the mapping."""
    if not columns:
        return None
    from hwcompat.data.sources import rows

    first = next(iter(rows(path, Report())), None)
    if first is None:
        return columns
    return {ours: theirs for ours, theirs in columns.items() if theirs in first[2] or ours not in ANSWER_FIELDS}


ANSWER_FIELDS = ("completion", "output", "chosen", "rejected")



def check_rows(train: list, evals: list, report: Report, duplicates: str = "exact duplicates in train",
               leaks: str = "eval rows also in train") -> None:
    """Dataset-level warnings: duplicates and eval rows leaking from train (rows with .key, .prompt_key, .file,
    .line: SFT examples and preference pairs alike)."""
    from hwcompat.data.sources import location

    counts = Counter(e.key for e in train)
    first: dict[str, Any] = {}
    for e in train:
        if e.key in first and counts[e.key] > 1:
            f = first[e.key]
            again = f"row {f.line}" if location(f.file, 0).endswith("row 0") else f"line {f.line}"
            report.warn(duplicates, f"{location(e.file, e.line)} repeats {again}"
                        + (f" of {f.file}" if f.file != e.file else ""))
        first.setdefault(e.key, e)
    train_prompts = {e.prompt_key: e for e in train}
    for e in evals:
        if e.prompt_key in train_prompts:
            t = train_prompts[e.prompt_key]
            report.warn(leaks, f"{location(e.file, e.line)} = {location(t.file, t.line)}")



def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic split: the same seed always holds out the same rows."""
    import random

    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(examples) * fraction))) if len(examples) > 1 else 0
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]



def load_datasets(train_files: list[str], eval_files: list[str], fmt: str, eval_fraction: float, seed: int,
                  system_prompt: str | None = None, max_seq_len: int | None = None,
                  columns: dict[str, str] | None = None) -> tuple[list[Example], list[Example], Report]:
    """Read and check everything; the caller refuses to train when ``report.errors``."""
    report = Report()
    train: list[Example] = []
    for f in train_files:
        train += read_jsonl(f, fmt, report, system_prompt, max_seq_len, columns)
    evals: list[Example] = []
    for f in eval_files:
        evals += read_jsonl(f, fmt, report, system_prompt, max_seq_len, columns)
    if report.errors:
        return train, evals, report
    if not eval_files:
        train, evals = split_eval(train, eval_fraction, seed)
    check_rows(train, evals, report)
    if not train:
        report.error("train data: no examples left after the eval split")
    return train, evals, report
