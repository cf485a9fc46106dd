"""``detect --json`` memoised by everything its answer is a function of.

The resolver is pure (no I/O, no environment reads), so the host plan is fully determined by: what the
probes read (every field of every device, host problems and facts), the installed software facts, the
user's overrides, hwcompat's data files (by content) and its code (version plus every module's size and
mtime). All of them are part of the key, so a changed card, driver, torch, profile or source file is a
new key and can never be answered from an old plan. A hit skips importing and building the profiles and
the resolver (about 18 ms of a 65 ms cold start: Python 3.11 compiles six functions per dataclass).
Probing still runs every time: the memo never answers for hardware it has not just looked at.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from hwcompat import __version__, envvars
from hwcompat.datafiles import data_dir
from hwcompat.yamlfile import digest, read_cached, store_cached

_PKG = Path(__file__).resolve().parents[1]  # the hwcompat package (this module lives in cli/)


def _code_stamp(folder: str = str(_PKG), prefix: str = "") -> list[Any]:
    """Every module of the package by (path, size, mtime): an edited checkout is a new key."""
    stamp: list[Any] = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.endswith(".py"):
                st = e.stat()
                stamp.append((prefix + e.name, st.st_size, st.st_mtime_ns))
            elif e.is_dir() and e.name != "__pycache__":
                stamp += _code_stamp(e.path, prefix + e.name + "/")
    return sorted(stamp)


def _data_digest() -> str:
    """The profiles and catalog by content (the profiles folder may be the user's, HWCOMPAT_PROFILES_DIR)."""
    folders = [Path(envvars.get("HWCOMPAT_PROFILES_DIR") or data_dir("profiles")), data_dir("catalog")]
    parts = []
    for folder in folders:
        for f in sorted(folder.glob("*.yaml")):
            parts.append(f.name.encode() + b"\0" + f.read_bytes())
    return digest(b"\0\0".join(parts))


def key(host, software, overrides: dict[str, Any]) -> str:
    """The memo key of one detect: readings, software, overrides, data and code."""
    facts = {"version": __version__, "code": _code_stamp(), "data": _data_digest(), "host": asdict(host),
             "software": asdict(software), "overrides": overrides}
    return "plan-" + digest(json.dumps(facts, sort_keys=True, default=str).encode())


def plan_dict(host, software, overrides: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The plan as ``detect --json`` prints it: from the memo when every input is unchanged, else ``build()``."""
    k = key(host, software, overrides)
    cached = read_cached(k)
    if isinstance(cached, dict):
        return cached
    value = build()
    store_cached(k, value)
    return value
