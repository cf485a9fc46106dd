"""One set of rules for a value a user wrote, for every reader of written structure: the training config
(train/config_values.py), the profiles (profiles/parse.py), emulate files (probe/emulate.py) and the run spec the
launcher hands each worker (train/spec.py, its tables made from the dataclasses' annotations: ``shape_of``).

Each reader says *where* (the file, the entry, the key path) and raises its own error type; *what* is wrong is
said here, once, in the same words: "expected an integer, got 'x'", "'fp8' is not one of: a, b", "unknown key
(did you mean 'dtype'?)". Pure functions returning the phrase, or None when the value is fine.

A structure is declared as data, a ``Shape`` (a table of ``Field``s: kind, required, closed choices, a further rule,
a nested shape, a list's items), and ``check`` walks any value against it, raising one ``Problem`` with the key path.
Rules between fields (an AMD reading needs a gfx target) stay with their reader. pydantic (64 ms to import and build
one model here) would alone exceed detect's 60 ms budget; msgspec (12 ms) would take a fifth of it and speak in its
own words ("Expected `int`, got `str` - at `$.x`"); this module costs 1 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

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


@dataclass(frozen=True)
class Field:
    """What one key of a user-written structure must hold. ``rule`` is a further check returning the problem or None
    (a positive number, a gfx target); ``shape`` checks a nested mapping, ``each`` every item of a list; ``null``
    lets an optional key be written as null; ``hint`` is added to a wrong-kind problem (how to write it)."""

    kind: str | None = None
    required: bool = False
    choices: tuple[str, ...] | None = None
    rule: Callable[[Any], str | None] | None = None
    shape: "Shape | None" = None
    each: "Shape | Field | None" = None
    null: bool = False
    hint: str = ""
    values: "Field | None" = None  # a mapping of string keys, each value checked by this


@dataclass(frozen=True)
class Shape:
    """A mapping's table of keys. ``blank_is_missing``: a required key holding null or "" counts as absent."""

    fields: Mapping[str, Field] = field(default_factory=dict)
    blank_is_missing: bool = False

    def loose(self) -> "Shape":
        """The same keys, none required (a variant replaces only what it names)."""
        return replace(self, fields={k: replace(f, required=False) for k, f in self.fields.items()})

    def required(self) -> list[str]:
        return [k for k, f in self.fields.items() if f.required]


class Problem(ValueError):
    """One thing wrong, and where: ``path`` is the keys and list indices from the top of the structure."""

    def __init__(self, path: tuple[str | int, ...], why: str):
        super().__init__(why)
        self.path, self.why = path, why

    def dotted(self, top: str = "") -> str:
        """``variants[0].match.compute_capability``; ``top`` names the structure's own level."""
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
        return out or top


def check(value: Any, spec: Shape | Field, path: tuple[str | int, ...] = ()) -> None:
    """Raise a Problem for the first thing in ``value`` that ``spec`` does not allow."""
    if isinstance(spec, Shape):
        _check_mapping(value, spec, path)
        return
    if value is None and spec.null:
        return
    why = kind_problem(value, spec.kind) if spec.kind else None
    why = why and why + spec.hint
    why = why or (choice_problem(value, spec.choices) if spec.choices is not None else None)
    why = why or (spec.rule(value) if spec.rule else None)
    if why:
        raise Problem(path, why)
    if spec.shape is not None:
        _check_mapping(value, spec.shape, path)
    if spec.each is not None:
        if not isinstance(value, list):
            raise Problem(path, f"expected a list, got {excerpt(value)}")
        for i, item in enumerate(value):
            check(item, spec.each, path + (i,))
    if spec.values is not None:
        for key, item in value.items():
            if not isinstance(key, str):
                raise Problem(path, f"expected string keys, got {excerpt(key)}")
            check(item, spec.values, path + (key,))


def _check_mapping(value: Any, shape: Shape, path: tuple[str | int, ...]) -> None:
    why = kind_problem(value, "mapping")
    if why:
        raise Problem(path, why)
    unknown = unknown_key(value, shape.fields)
    if unknown:
        raise Problem(path + (unknown[0],), f"unknown key{unknown[1]}")
    missing = missing_key(value, shape.required(), shape.blank_is_missing)
    if missing:
        raise Problem(path, f"missing required key {missing!r}")
    for key, spec in shape.fields.items():
        if key in value:
            check(value[key], spec, path + (key,))


_ANNOTATED = {str: "string", int: "integer", float: "number", bool: "bool"}


def of_annotation(kind: Any) -> Field:
    """The Field a type annotation means (``str``, ``int | None``, ``list[str]``, ``dict[str, float]``, ``Any``), for
    records whose table is a dataclass (the run spec); an annotation it cannot say is a TypeError when the table is
    made, so a new field's type fails the tests, not a user's run."""
    from types import UnionType
    from typing import Union, get_args, get_origin

    origin, args = get_origin(kind), get_args(kind)
    if kind is Any:
        return Field()
    if origin in (Union, UnionType) and type(None) in args and len(args) == 2:
        return replace(of_annotation(next(a for a in args if a is not type(None))), null=True)
    if origin is list and len(args) == 1:
        return Field(each=of_annotation(args[0]))
    if origin is dict and len(args) == 2 and args[0] is str:
        return Field("mapping", values=of_annotation(args[1]))
    if kind in _ANNOTATED:
        return Field(_ANNOTATED[kind])
    raise TypeError(f"no schema kind for the annotation {kind!r}")


def shape_of(cls: type, leave_out: Iterable[str] = ()) -> Shape:
    """A dataclass's fields as a Shape: each annotation's Field, required where the field has no default."""
    from dataclasses import MISSING, fields
    from typing import get_type_hints

    hints = get_type_hints(cls)
    return Shape({f.name: replace(of_annotation(hints[f.name]),
                                  required=f.default is MISSING and f.default_factory is MISSING)
                  for f in fields(cls) if f.name not in leave_out})
