"""Training data: read JSONL strictly, check every row, normalise to chat turns.

The checks run before any model is loaded (``hwcompat data check`` runs them
alone). Every error reads ``file:line: field: what is wrong`` so a user can
jump to it; a scraper's NUL byte or a broken UTF-8 sequence is found here,
not after five hours of training on gibberish. No torch import here.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hwcompat.errors import DataError
from hwcompat.textcheck import text_problem

ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 20
#: Characters per token no real text reaches: a row longer than this many characters per allowed token
#: is cut by more than 99 % by truncation, and tokenising it alone can take minutes and gigabytes.
CHARS_PER_TOKEN_LIMIT = 100
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Example:
    """One training row as chat turns; the assistant turns are what gets trained."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    file: str
    line: int  # the line (text) or row (Parquet/Arrow) in ``file``
    untrained: frozenset[int] = frozenset()  # assistant turns that are context only (an OpenAI row's weight: 0)

    @property
    def key(self) -> str:
        return json.dumps(self.messages)

    @property
    def prompt_key(self) -> str:
        return json.dumps([m for m in self.messages if m[0] != "assistant"])

    @property
    def response(self) -> str:
        """The last assistant turn: what eval generation is compared with."""
        return next(c for r, c in reversed(self.messages) if r == "assistant")


@dataclass
class Report:
    """Errors block training; warnings are summarised with counts and examples."""

    errors: list[str] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)  # kind -> example locations/messages
    counts: dict[str, int] = field(default_factory=dict)  # file -> rows read
    sources: dict[str, str] = field(default_factory=dict)  # file -> its container (JSONL, gzip JSONL, CSV, Parquet …)
    formats: dict[str, str] = field(default_factory=dict)  # file -> the row format detected (or given)

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, kind: str, msg: str) -> None:
        self.warnings.setdefault(kind, []).append(msg)

    @property
    def ok(self) -> bool:
        return not self.errors

    def failure(self) -> DataError:
        """The error a run stops with when these checks failed: before any step, so nothing was trained. It
        carries the report, so a caller that was not training (``hwcompat eval``) can say what it was doing."""
        exc = DataError("data checks failed; nothing was trained\n" + self.render())
        exc.report = self  # type: ignore[attr-defined]
        return exc

    def render(self) -> str:
        lines = []
        errors = list(dict.fromkeys(self.errors))  # one file read as train and eval: each problem once
        shown = errors[:MAX_ERRORS_SHOWN]
        lines += [f"error: {e}" for e in shown]
        if len(errors) > len(shown):
            lines.append(f"error: … and {len(errors) - len(shown)} more errors")
        for kind, items in self.warnings.items():
            examples = "; ".join(items[:3])
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            lines.append(f"warning: {kind}: {len(items)} row(s): {examples}{more}")
        for f, n in self.counts.items():
            container = self.sources.get(f)
            if container and container.endswith("TSV"):  # the one quoting rule, said where it applies
                container += ' read quote-aware as pandas reads it: a cell may be quoted with "'
            kind = ", ".join(x for x in (container, self.formats.get(f)) if x)
            lines.append(f"read {n} row(s) from {f}" + (f" ({kind})" if kind else ""))
        if errors:
            lines.append(f"{len(errors)} error(s): fix them and run `hwcompat data check` again")
        return "\n".join(lines)


def _detect_format(row: dict) -> str | None:
    """The first format (``FORMATS``, in order) whose keys the row has."""
    return next((f.name for f in FORMATS.values() if any(k in row for k in f.keys)), None)


def shown(value: Any, width: int = 60) -> str:
    """A user's value in a message: its repr cut to ``width`` characters; a value nested past what repr can
    walk (a row read from deep JSON) is named by its type."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= width else text[:width - 1] + "…"


def bad_text(value: str, where: str, report: Report) -> bool:
    """Decoded text that would corrupt training: escaped NUL (an error, like a raw NUL byte), lone surrogates
    (not Unicode: the tokenizer crashes on them), other control characters (a warning)."""
    problem = text_problem(value, in_row=True)
    if problem:
        report.error(f"{where}: {problem}")
        return True
    controls = [ch for ch in value if ord(ch) < 32 and ch not in "\t\n\r"]
    if controls:
        report.warn("control characters", f"{where}: {len(controls)} control character(s), e.g. "
                                          f"\\u{ord(controls[0]):04x}")
    return False


def clean_text(value: Any, where: str, report: Report, expected: str = "a string") -> str | None:
    """A non-empty string of clean text, or None with the error reported at ``where``."""
    if not isinstance(value, str):
        report.error(f"{where}: expected {expected}, got {type(value).__name__}")
        return None
    if not value.strip():
        report.error(f"{where}: empty")
        return None
    return None if bad_text(value, where, report) else value


def _text_field(row: dict, key: str, where: str, report: Report, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            report.error(f"{where}: {key}: missing")
        return None
    value = row[key]
    if not isinstance(value, str):
        report.error(f"{where}: {key}: expected a string, got {type(value).__name__}")
        return None
    if required and not value.strip():
        report.error(f"{where}: {key}: empty")
        return None
    if bad_text(value, f"{where}: {key}", report):
        return None
    return value


def _messages(row: dict, where: str, report: Report) -> list[tuple[str, str]] | None:
    """OpenAI chat rows: ``messages`` of {role, content}; content may be a list of text parts, an assistant turn may
    carry ``weight`` 0 or 1 (0: context, not trained) and a ``name``. Tool calls are refused with the row: how a
    tool call is written into the prompt is each chat template's own, and a wrong rendering trains the wrong text."""
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        report.error(f"{where}: messages: expected a list of {{role, content}}, "
                     f"got {type(msgs).__name__ if msgs is not None else 'nothing'}")
        return None
    if not msgs:
        report.error(f"{where}: messages: empty")
        return None
    out: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        turn = _message(m, f"{where}: messages[{i}]", report)
        if turn is None:
            return None
        out.append(turn)
    problem = order_problem(out, "assistant")
    if problem:
        report.error(f"{where}: messages{problem}")
        return None
    if all(_weight(m) == 0 for m in msgs if m.get("role") == "assistant"):
        report.error(f"{where}: messages: every assistant turn has weight 0: nothing to train")
        return None
    return out


def _weight(turn: dict) -> object:
    """A turn's ``weight``; None when absent. Parquet and Arrow give every struct in a list the same fields, so a
    file where one turn has a weight has ``weight: null`` on all the others: null is absent, not an error."""
    return turn.get("weight")


def _weight_problem(turn: dict, role: str | None) -> str | None:
    weight = _weight(turn)
    if weight is None:
        return None
    if role != "assistant":
        return "only an assistant turn has a weight"
    if weight not in (0, 1) or isinstance(weight, bool):
        return f"expected 0 (context, not trained) or 1, got {shown(weight)}"
    return None


TOOL_ROLES = ("tool", "function", "ipython")
TOOL_KEYS = ("tool_calls", "function_call")


def _message(m: Any, w: str, report: Report) -> tuple[str, str] | None:
    """One OpenAI-style message as (role, text), or None with the problem at ``w``."""
    if not isinstance(m, dict):
        report.error(f"{w}: expected an object with role and content, got {type(m).__name__}")
        return None
    role = m.get("role")
    tool = next((k for k in TOOL_KEYS if m.get(k)), None)
    if role in TOOL_ROLES or tool:
        report.error(f"{w}{'.' + tool if tool else '.role'}: a tool {'call' if tool else 'result'}; hwcompat does "
                     "not train tool use yet (each chat template writes tool calls its own way): drop the row, or "
                     "its tool turns")
        return None
    if role not in ROLES:
        report.error(f"{w}.role: expected one of {', '.join(ROLES)}, got {shown(role)}")
        return None
    problem = _weight_problem(m, role)
    if problem:
        report.error(f"{w}.weight: {problem}")
        return None
    content = m.get("content")
    if isinstance(content, list):  # OpenAI's content parts; a problem is reported there
        content = _content_text(content, f"{w}.content", report)
        if content is None:
            return None
    content = clean_text(content, f"{w}.content", report)
    return None if content is None else (role, content)


def _content_text(content: list, where: str, report: Report) -> str | None:
    """OpenAI's list of content parts joined (text parts only), or None with the part that is not text."""
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            report.error(f"{where}[{k}]: expected a text part {{type: text, text}}, got {shown(kind)}; hwcompat trains "
                         "text only")
            return None
        texts.append(part["text"])
    return "".join(texts)


def untrained_turns(row: dict, fmt: str) -> frozenset[int]:
    """The assistant turns a row marks as context only (``weight: 0`` on an OpenAI message or a ShareGPT turn, as
    Axolotl and LLaMA-Factory read it), by turn index."""
    turns = FORMATS[fmt].turns_key if fmt in FORMATS else None
    msgs = row.get(turns) if turns else None
    if not isinstance(msgs, list):
        return frozenset()
    return frozenset(i for i, m in enumerate(msgs) if isinstance(m, dict) and _weight(m) == 0)


#: ShareGPT's speakers (``from``) as chat roles; its tool turns are refused like OpenAI's.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
SHAREGPT_TOOLS = ("function_call", "observation", "tool", "function_response", "function")


def _sharegpt(row: dict, where: str, report: Report) -> list[tuple[str, str]] | None:
    """ShareGPT rows: ``conversations`` of {from: human | gpt | system …, value}."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        report.error(f"{where}: conversations: expected a non-empty list of {{from, value}}, got "
                     f"{type(turns).__name__ if turns else 'nothing'}")
        return None
    out: list[tuple[str, str]] = []
    for i, t in enumerate(turns):
        w = f"{where}: conversations[{i}]"
        speaker = t.get("from") if isinstance(t, dict) else None
        if speaker in SHAREGPT_TOOLS:
            report.error(f"{w}.from: {speaker!r} is a tool turn; hwcompat does not train tool use yet: drop the row, "
                         "or its tool turns")
            return None
        if speaker not in SHAREGPT_ROLES:
            report.error(f"{w}.from: expected one of human, gpt, system (or user, assistant, model), got "
                         f"{shown(speaker)}" if isinstance(t, dict) else f"{w}: expected {{from, value}}, got "
                         f"{type(t).__name__}")
            return None
        problem = _weight_problem(t, SHAREGPT_ROLES[speaker])
        if problem:
            report.error(f"{w}.weight: {problem}")
            return None
        value = clean_text(t.get("value"), f"{w}.value", report)
        if value is None:
            return None
        out.append((SHAREGPT_ROLES[speaker], value))
    problem = order_problem(out, "assistant")
    if problem:
        report.error(f"{where}: conversations{problem}")
        return None
    if all(_weight(t) == 0 for t, (role, _) in zip(turns, out) if role == "assistant"):
        report.error(f"{where}: conversations: every assistant turn has weight 0: nothing to train")
        return None
    return out


def order_problem(turns: list[tuple[str, str]], last: str) -> str | None:
    """The one conversation rule (SFT rows, DPO prompts): an optional system turn first, then user and assistant
    alternating from a user turn, ending with ``last``. Returns what is wrong (after the field name), or None."""
    start = 1 if turns and turns[0][0] == "system" else 0
    expected = "user"
    for i in range(start, len(turns)):
        role = turns[i][0]
        if role != expected:
            prev = turns[i - 1][0] if i else "the start"
            return f"[{i}].role: expected {expected!r} after {prev!r}, got {role!r}"
        expected = "assistant" if role == "user" else "user"
    if not turns or turns[-1][0] != last:
        why = "nothing to train on" if last == "assistant" else "the answers follow it"
        return f": the last turn must be {last!r} ({why}), got {turns[-1][0] if turns else 'none'!r}"
    return None


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
            seen_format = _detect_format(row)
            if seen_format is None:
                report.error(f"{where}: cannot tell the data format: expected 'messages', 'conversations' "
                             f"(ShareGPT), 'prompt'/'completion' or 'instruction'/'output' keys, got "
                             f"{sorted(map(str, row))[:12]}; a CSV or Parquet file with other column names "
                             "needs columns: {prompt: YOUR_COLUMN, completion: YOUR_COLUMN}")
                continue
        msgs = _row_messages(row, seen_format, where, report)
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


def _prompt_completion(row: dict, where: str, report: Report) -> list[tuple[str, str]] | None:
    prompt = _text_field(row, "prompt", where, report)
    completion = _text_field(row, "completion", where, report)
    return [("user", prompt), ("assistant", completion)] if prompt and completion else None


def _alpaca(row: dict, where: str, report: Report) -> list[tuple[str, str]] | None:
    """``instruction`` (+ ``input`` on its own paragraph) as the user turn, ``output`` as the answer."""
    instruction = _text_field(row, "instruction", where, report)
    extra = _text_field(row, "input", where, report, required=False)
    output = _text_field(row, "output", where, report)
    if instruction and output:
        return [("user", instruction + (f"\n\n{extra}" if extra and extra.strip() else "")), ("assistant", output)]
    return None


@dataclass(frozen=True)
class RowFormat:
    """One SFT data format: how a row is recognised and named, where its turns are, how it reads as chat turns."""

    name: str  # the ``data_format`` value
    label: str  # what `hwcompat data check` calls it
    keys: tuple[str, ...]  # a row with any of these keys is this format (``FORMATS`` is checked in order)
    read: Any  # (row, "file:line", Report) -> chat turns, or None with the problem in the report
    turns_key: str | None = None  # the list of turns, where ``weight: 0`` marks an assistant turn context only
    answer_key: str | None = None  # the answer field a prompt-only row leaves out


#: The formats, in the order a row is recognised (``messages`` first: a chat row may also carry a ``prompt``).
FORMATS = {f.name: f for f in (
    RowFormat("messages", "chat messages", ("messages",), _messages, turns_key="messages"),
    RowFormat("sharegpt", "ShareGPT conversations", ("conversations",), _sharegpt, turns_key="conversations"),
    RowFormat("prompt_completion", "prompt/completion", ("prompt", "completion"), _prompt_completion,
              answer_key="completion"),
    RowFormat("alpaca", "alpaca instruction/output", ("instruction", "output"), _alpaca, answer_key="output"),
)}


def _row_messages(row: dict, fmt: str, where: str, report: Report) -> list[tuple[str, str]] | None:
    """One SFT row in its format as chat turns, or None (the problem is in ``report``)."""
    return FORMATS[fmt].read(row, where, report)


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
        fmt = _detect_format(row)
        if fmt is None:
            report.error(f"{where}: expected \"prompt\" (a string), \"messages\" (a list of {{role, content}}) or "
                         f"\"instruction\", got keys {sorted(row)[:6]}")
            continue
        full, answered = _with_placeholder_answer(row, fmt)
        msgs = _row_messages(full, fmt, where, report)
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
