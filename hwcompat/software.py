"""Installed-software facts, gathered without importing the packages.

``importlib.util.find_spec`` finds a package without running its import-time code, and torch's
build is read from its ``version.py`` as text (``hwcompat.compat``), so ``detect`` stays fast and
side-effect free. Doctor goes further and asks torch itself.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from hwcompat import compat


@dataclass(frozen=True)
class Software:
    torch: compat.InstalledTorch | None = None  # None when torch is not installed
    flash_attn: bool = False  # flash_attn importable (checked with find_spec, never imported)
    bitsandbytes: bool = False

    @classmethod
    def with_torch(cls, version: str, cuda: str | None = None, hip: str | None = None, **kw) -> "Software":
        """Tests and emulation: a torch described by its version facts alone."""
        return cls(torch=compat.InstalledTorch.from_version(version, cuda, hip), **kw)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed() -> Software:
    """Facts about this Python environment (cheap: file reads only)."""
    return Software(torch=compat.installed(), flash_attn=_has("flash_attn"), bitsandbytes=_has("bitsandbytes"))
