"""The one way hwcompat loads a tokenizer or a model through transformers: never a folder's own Python.

Every load passes ``trust_remote_code`` explicitly (default False). transformers' own default asks on a
terminal ("run the custom code? [y/N]") and a ``y`` runs the folder's code; without a terminal it raises a
traceback. A folder whose config names code (``auto_map``) is refused here first, with what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hwcompat.errors import InputError

#: The files whose ``auto_map`` makes transformers import Python shipped inside the model folder.
CODE_MAPS = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


def needs_code(folder: str | Path) -> str | None:
    """The file that asks for the folder's own code (``auto_map``), or None."""
    for name in CODE_MAPS:
        path = Path(folder) / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            return str(path)
    return None


def check_folder(folder: str | Path, what: str, trust_remote_code: bool) -> None:
    path = Path(folder)
    if not path.exists():
        raise InputError(f"{what} {folder}: no such folder (hwcompat loads local folders; give the path of a model "
                         "folder with config.json and tokenizer files)")
    if not path.is_dir():
        raise InputError(f"{what} {folder}: not a folder; give the model folder that holds its tokenizer files")
    code = needs_code(path)
    if code and not trust_remote_code:
        raise InputError(f"{what} {folder}: {code} names Python code shipped in the folder (auto_map), and hwcompat "
                         "never runs a folder's code unless told to. Use a model that transformers supports "
                         "natively, or set trust_remote_code: true in the config if you trust its author")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def tokenizer(folder: str | Path, what: str = "tokenizer", trust_remote_code: bool = False, **kw: Any):
    """``AutoTokenizer.from_pretrained`` of a local folder; a damaged tokenizer is an InputError naming it."""
    from transformers import AutoTokenizer

    check_folder(folder, what, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise InputError(f"{what} {folder}: cannot load it ({type(exc).__name__}: {_first_line(exc)}); check "
                         "tokenizer.json and tokenizer_config.json (a truncated download or an edit that broke "
                         "the JSON)") from None
    except Exception as exc:  # the tokenizers library raises its own Exception type for a broken tokenizer.json
        raise InputError(f"{what} {folder}: cannot load it ({type(exc).__name__}: {_first_line(exc)}); check "
                         "tokenizer.json") from None


def causal_lm(folder: str | Path, what: str = "model", trust_remote_code: bool = False, **kw: Any):
    """``AutoModelForCausalLM.from_pretrained`` of a local folder, code refused unless trusted."""
    from transformers import AutoModelForCausalLM

    check_folder(folder, what, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kw)
