"""Installed-software facts, gathered without importing the packages.

``importlib.util.find_spec`` and package metadata tell what is installed
without running its import-time code (no CUDA init, no torch import), so
``detect`` stays fast and side-effect free. Doctor goes further and asks
torch itself.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Software:
    torch_version: str | None = None  # e.g. "2.13.0+cpu"; None when torch is not installed
    flash_attn: bool = False  # flash_attn importable (checked with find_spec, never imported)
    bitsandbytes: bool = False
    transformers_version: str | None = None
    peft_version: str | None = None

    @property
    def torch_build(self) -> str | None:
        """Local version tag: "cpu", "cu126", "rocm6.4"; None for a plain PyPI wheel."""
        if not self.torch_version or "+" not in self.torch_version:
            return None
        return self.torch_version.split("+", 1)[1]

    @property
    def torch_release(self) -> tuple[int, int] | None:
        if not self.torch_version:
            return None
        parts = self.torch_version.split("+")[0].split(".")
        try:
            return int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            return None


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed() -> Software:
    """Facts about this Python environment (cheap: metadata reads only)."""
    return Software(
        torch_version=_version("torch"),
        flash_attn=_has("flash_attn"),
        bitsandbytes=_has("bitsandbytes"),
        transformers_version=_version("transformers"),
        peft_version=_version("peft"),
    )
