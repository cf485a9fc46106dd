"""Read a user's YAML file safely, with errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hwcompat.errors import InputError


def load_yaml(path: str | Path, what: str, error: type[InputError] = InputError) -> Any:
    """``yaml.safe_load`` of ``path``; ``what`` ("config", "profile", …) starts every message."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {p}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {p}: cannot read it ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise error(f"{what} {p}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
