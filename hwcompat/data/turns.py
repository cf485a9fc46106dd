"""Each SFT row format as chat turns: OpenAI ``messages``, ShareGPT ``conversations``, prompt/completion and Alpaca,
one ``RowFormat`` each (how a row is recognised, where its turns are, how it reads), and the one conversation-order
rule they and the preference pairs share. Every problem goes to the ``Report`` at ``file:line: field``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hwcompat.data.problems import Report, bad_text, clean_text, shown

ROLES = ("system", "user", "assistant")



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



def detect_format(row: dict) -> str | None:
    """The first format (``FORMATS``, in order) whose keys the row has."""
    return next((f.name for f in FORMATS.values() if any(k in row for k in f.keys)), None)



def row_messages(row: dict, fmt: str, where: str, report: Report) -> list[tuple[str, str]] | None:
    """One SFT row in its format as chat turns, or None (the problem is in ``report``)."""
    return FORMATS[fmt].read(row, where, report)
