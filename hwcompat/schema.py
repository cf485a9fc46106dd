"""One set of rules for a value a user wrote, for the three readers of user-written structure: the training config
(train/config_values.py), the profiles (profiles/parse.py) and emulate files (probe/emulate.py).

Each reader says *where* (the file, the entry, the key path) and raises its own error type; *what* is wrong is
said here, once, in the same words: "expected an integer, got 'x'", "'fp8' is not one of: a, b", "unknown key
(did you mean 'dtype'?)". Pure functions returning the phrase, or None when the value is fine.
"""

from __future__ import annotations

from typing import Any, Iterable

from hwcompat.errors import excerpt
from hwcompat.textcheck import closest

#: The kinds a value may be asked to be, and how an error names each.
KINDS = {
    "integer": "an integer", "count": "an integer", "number": "a number", "bool": "true or false",
    "string": "a string", "text": "a non-empty string", "strings": "a list of strings", "mapping": "a mapping",
}


def kind_problem(value: Any, kind: str) -> str | None:
    """Why ``value`` is not of ``kind`` (one of KINDS), or None. A bool is never a number (YAML's ``yes``);
    a ``count`` is an integer that is not negative."""
    ok = {
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "count": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "string": isinstance(value, str),
        "text": isinstance(value, str) and bool(value.strip()),
        "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "mapping": isinstance(value, dict),
    }[kind]
    if not ok:
        return f"expected {KINDS[kind]}, got {excerpt(value)}"
    if kind == "count" and value < 0:
        return f"must not be negative, got {value}"
    return None


def choice_problem(value: Any, allowed: Iterable[str]) -> str | None:
    """Why ``value`` is not one of a closed vocabulary, or None."""
    allowed = [str(a) for a in allowed]
    if value in allowed:
        return None
    return f"{excerpt(value)} is not one of: {', '.join(allowed)}"


def unknown_key(mapping: dict, allowed: Iterable[str], cutoff: float = 0.6) -> tuple[Any, str] | None:
    """The first key of ``mapping`` that is not ``allowed``, with the nearest known one when there is one."""
    allowed = [str(a) for a in allowed]
    for key in mapping:
        if key not in allowed:
            near = closest(key, allowed, cutoff)
            return key, f" (did you mean {near!r}?)" if near else ""
    return None


def missing_key(mapping: dict, required: Iterable[str], empty_is_missing: bool = True) -> str | None:
    """The first ``required`` key ``mapping`` lacks (or, with ``empty_is_missing``, holds null or ""), or None."""
    return next((k for k in required if (mapping.get(k) in (None, "") if empty_is_missing else k not in mapping)),
                None)
