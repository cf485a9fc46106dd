"""Profiles: one YAML per architecture family, one schema, one loader.

A profile is data: which devices it matches, what their silicon can do
(``hardware``), the choices hwcompat makes for them (dtype, attention,
compile backend, environment, quantization, torch build, image), each with
a reason and a source. Unknown keys are errors; vocabularies are closed.
The typed profile is model.py, its schema (every check, every error naming the file and the key path) parse.py;
this module loads them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from hwcompat import envvars
from hwcompat.choices import Attention, CompileBackend, Dtype  # noqa: F401 (the profile vocabularies, re-exported)
from hwcompat.datafiles import data_dir
from hwcompat.errors import ProfileError
from hwcompat.profiles.model import (QUANT_KINDS, Caveat, Choice, EnvVar, Evidence, Fp16Rate,  # noqa: F401 (API)
                                     Hardware, Image, Match, Profile, Quant, TorchBuild, Variant)
from hwcompat.profiles.parse import parse_profile
from hwcompat.yamlfile import load_packaged_yaml


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    raw = load_packaged_yaml(p, "profile", ProfileError)
    return parse_profile(raw, str(p))


@lru_cache(maxsize=4)
def _load_dir(directory: str) -> tuple[Profile, ...]:
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise ProfileError(f"no profiles (*.yaml) in {directory}")
    return tuple(load_profile(f) for f in files)


def load_profiles(directory: str | Path | None = None) -> dict[str, Profile]:
    """All profiles by name, from ``directory``, ``HWCOMPAT_PROFILES_DIR`` or the packaged set."""
    d = directory or envvars.get("HWCOMPAT_PROFILES_DIR") or data_dir("profiles")
    return {p.name: p for p in _load_dir(str(Path(d).resolve()))}
