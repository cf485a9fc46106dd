"""Read a user's YAML file safely, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hwcompat import envvars
from hwcompat.errors import InputError


#: A YAML document hwcompat reads (a config, a profile, a list of readings) is small; a bigger one is a mistake.
MAX_BYTES = 64 << 20


def _read(p: Path, what: str, error: type[InputError]) -> bytes:
    """A regular file only, with a bound: a FIFO with no writer or /dev/zero must not hang or fill memory."""
    from hwcompat.userfile import read_regular

    return read_regular(p, what, error, limit=MAX_BYTES)


def load_yaml(path: str | Path, what: str, error: type[InputError] = InputError) -> Any:
    """A safe load of ``path``; ``what`` ("config", "profile", …) starts every message."""
    p = Path(path)
    return _parse(_read(p, what, error), p, what, error)


def _parse(data: bytes, p: Path, what: str, error: type[InputError]) -> Any:
    import yaml  # here, not at module level: `detect` answers from the cache below without it

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p}: cannot read it ({exc})") from None
    # libyaml's C parser when PyYAML has it (about 10x faster), else the pure-Python one; both are the
    # *safe* loaders: plain data, never Python objects.
    loader = _strict(getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if _nesting(text) > MAX_DEPTH:
        # Maybe deep, maybe brackets inside a quoted string (a system prompt of "[[[…"): the pure-Python loader
        # tells them apart safely (it raises RecursionError where the C one would crash).
        loader = _strict(yaml.SafeLoader)
    try:
        value = yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader, chosen above)
        too_big = _expanded_size(value, {}) > MAX_VALUES
    except RecursionError:
        raise error(f"{what} {p}: nests more than {MAX_DEPTH} levels deep (or deeper than hwcompat follows); "
                    "flatten the document") from None
    except ValueError as exc:  # e.g. a 5,000-digit integer: Python refuses to convert it
        raise error(f"{what} {p}: a value cannot be read ({str(exc)[:120]})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise error(f"{what} {p}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if too_big:
        raise error(f"{what} {p}: expands to more than {MAX_VALUES:,} values through YAML aliases (& and *); "
                    "hwcompat refuses documents like that (an 'alias bomb'); write the values out")
    return value


_STRICT: dict[type, type] = {}


def _strict(base: type) -> type:
    """``base`` (a safe loader) that refuses a key given twice in one mapping: YAML keeps the last silently, so
    ``learning_rate`` written twice would train with whichever came last. Merge keys (``<<``) may still be
    overridden, as YAML defines."""
    if base in _STRICT:
        return _STRICT[base]
    import yaml

    class Strict(base):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {str(key)[:60]!r} is given twice (first on line {seen[key] + 1}); "
                            "YAML would silently keep the last one: remove one", key_node.start_mark)
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    _STRICT[base] = Strict
    return Strict


#: Values a document may expand to once its aliases are followed; real configs have hundreds.
MAX_VALUES = 1_000_000
#: Nesting a document may have. PyYAML's C composer recurses on the C stack: 100,000 nested "[" crash the
#: process (SIGSEGV) before Python can raise RecursionError, so depth is checked on the text first.
MAX_DEPTH = 200


def _nesting(text: str) -> int:
    """An upper bound on the document's nesting: open flow brackets, or block indentation in steps of 1."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    indent = max((len(line) - len(line.lstrip(" ")) for line in text.splitlines()), default=0)
    return max(deepest, indent // 2)


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Values in ``node`` with every alias expanded, counted over the shared graph (no expansion done)."""
    if not isinstance(node, (dict, list)):
        return 1
    key = id(node)
    if key not in memo:
        memo[key] = MAX_VALUES + 1  # a cycle (a recursive alias) counts as too big
        items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
        total = 1
        for k, v in items:
            total += _expanded_size(k, memo) + _expanded_size(v, memo)
            if total > MAX_VALUES:
                break
        memo[key] = total
    return memo[key]


def cache_dir() -> Path:
    """hwcompat's own memo files (never user data): $HWCOMPAT_CACHE_DIR, else ~/.cache/hwcompat."""
    return Path(envvars.get("HWCOMPAT_CACHE_DIR") or Path.home() / ".cache" / "hwcompat") / "data"


def digest(data: bytes) -> str:
    """BLAKE2b of the bytes; from the builtin _blake2 module, which loads in a tenth of OpenSSL's time."""
    try:
        from _blake2 import blake2b
    except ImportError:  # an interpreter without the builtin module
        from hashlib import blake2b
    return blake2b(data, digest_size=16).hexdigest()


def read_cached(key: str) -> Any:
    """The JSON memo stored under ``key``, or None when there is none (or it cannot be read)."""
    try:
        with open(cache_dir() / f"{key}.json", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def store_cached(key: str, value: Any) -> None:
    """Keep ``value`` as JSON under ``key`` (atomic: temp file + rename); a cache that cannot be written is skipped."""
    import tempfile

    tmp = None
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(value, fh)
        os.replace(tmp, folder / f"{key}.json")
    except (OSError, TypeError, ValueError):  # read-only home, or data JSON cannot hold
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_packaged_yaml(path: str | Path, what: str, error: type[InputError] = InputError) -> Any:
    """``load_yaml`` for hwcompat's own data files (profiles, catalogs), memoised by content.

    The parsed data is kept as JSON under a BLAKE2b hash of the file's bytes, so an edited file is a new key
    and can never be answered from an old parse (no mtime trust). Saves importing and running the YAML
    parser on every ``detect``. Never for user files; a cache that cannot be read or written is skipped.
    """
    p = Path(path)
    data = _read(p, what, error)
    key = digest(data)
    cached = read_cached(key)
    if cached is not None:
        return cached
    value = _parse(data, p, what, error)
    if json.loads(json.dumps(value)) == value:  # e.g. non-string keys: JSON would change the data
        store_cached(key, value)
    return value
