"""Library loggers whose lines are noise on every run, held back in the processes that train or evaluate.

bitsandbytes' CPU backend warns on import (peft imports it whenever it is installed) that an optional 4-bit
kernel package is missing, and the `kernels` package says it skips a publisher trust check because the trainer
is offline (HF_HUB_OFFLINE=1, by design): neither line is the user's to act on. Errors still show.
"""

from __future__ import annotations

QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


def quiet_library_loggers() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
