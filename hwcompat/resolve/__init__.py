"""The resolver: (readings, profiles, installed software, overrides) -> decisions, each with its reason.

``decide.py`` holds the pure decision (small functions: dtype, attention, compile, environment, quantization);
``answers.py`` the typed values it returns (``ResolvedProfile``, ``ResolvedDevice``, ``HostPlan``), which cross into
the launcher, the run spec and ``detect --json``.
"""

from hwcompat.resolve.answers import HostPlan, ResolvedDevice, ResolvedProfile
from hwcompat.resolve.decide import (CODE_LOADING_VARS, MIN_CUDA_CC, SETTABLE, Overrides, match_profile,
                                     resolve_device, resolve_host)

__all__ = ["CODE_LOADING_VARS", "MIN_CUDA_CC", "SETTABLE", "HostPlan", "Overrides", "ResolvedDevice",
           "ResolvedProfile", "match_profile", "resolve_device", "resolve_host"]
