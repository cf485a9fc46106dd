"""Where the packaged data (profiles, device catalog) lives.

In a wheel they sit in ``hwcompat/_data/<name>`` (hatch force-include); in
an editable install or a source checkout they are the top-level folders.
"""

from __future__ import annotations

from pathlib import Path

from hwcompat.errors import HwcompatError

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise HwcompatError(f"packaged data folder {name!r} not found next to {_PKG}; reinstall hwcompat")
