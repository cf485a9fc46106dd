"""The sampling temperature a user gives (``hwcompat generate``, the Modelfile's PARAMETER): one rule for both.

``inf`` samples uniformly (random bytes), ``nan`` compares false everywhere (silently greedy), and a positive
value as small as 1e-300 divides the logits into infinities (NaN probabilities, a traceback): a temperature is
0 (greedy) or a finite number from ``MIN_TEMPERATURE`` to ``MAX_TEMPERATURE``.
"""

from __future__ import annotations

import math

from hwcompat.errors import InputError

MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0


def check_temperature(value: float, what: str = "--temperature") -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not (value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE)):
        raise InputError(f"{what} {value}: use {what} >= 0: 0 is greedy (deterministic), a sampled run takes "
                         f"{MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g} (about 0.7-1.0 is usual)")
    return float(value)
