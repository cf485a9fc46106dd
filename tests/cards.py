"""A catalog card as a real probe reads it, resolved against an installed torch: what the compat and wheel-fact
tests ask ("does torch X run card Y, and what does hwcompat say?")."""

from dataclasses import replace

from hwcompat.probe.emulate import from_catalog
from hwcompat.profiles import load_profiles
from hwcompat.resolve import resolve_device
from hwcompat.software import Software

PROFILES = load_profiles()


def real(name, **kw):
    """Catalog card ``name`` read through NVML (not emulated: its torch is checked)."""
    return replace(from_catalog([name])[0], emulated=False, source="nvml", **kw)


def problems(card, version, cuda=None, hip=None):
    """The problems hwcompat reports for ``card`` with torch ``version`` installed."""
    return resolve_device(real(card), PROFILES, Software.with_torch(version, cuda, hip)).problems
