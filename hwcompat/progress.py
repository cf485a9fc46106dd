"""Progress a person and a machine can both read.

On a terminal: tqdm's bar. Anywhere else (a file, a pipe, ``docker logs``): one plain line every ``every`` steps or
``seconds``, whichever comes first, and at the end, with the same fields and no control characters, because a
redirected bar is one long line of carriage-return frames. Third-party bars (transformers' weight loading, its GGUF
dequantisation, huggingface_hub) follow the same rule through tqdm's own ``TQDM_DISABLE`` (``quiet_library_bars``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

PLAIN_SECONDS = 30.0  # the longest a redirected log stays silent while a loop runs
PLAIN_LINES = 10  # about this many step lines per run in a redirected log (plus one per PLAIN_SECONDS)


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def quiet_library_bars(env: dict[str, str] | None = None, stream: TextIO | None = None) -> None:
    """Turn off every third-party tqdm bar when stderr is not a terminal. tqdm reads ``TQDM_*`` defaults when it is
    imported, so this runs in ``main`` before any library that draws one (and the worker inherits it). A user's own
    ``TQDM_DISABLE`` is kept."""
    env = os.environ if env is None else env
    if not on_terminal(stream):
        env.setdefault("TQDM_DISABLE", "1")


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A loop's progress: ``update(n, **fields)`` after each unit, ``close()`` at the end (also on an exception)."""

    def __init__(self, total: int, desc: str = "", unit: str = "step", initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, transient: bool = False, every: int | None = None,
                 seconds: float = PLAIN_SECONDS, clock=time.monotonic) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total, self.n, self.desc, self.unit, self.transient = total, initial, desc, unit, transient
        self.fields: dict[str, Any] = {}
        self.enabled, self.seconds, self.clock = enabled, seconds, clock
        self.every = every or max(1, (total - initial) // PLAIN_LINES)
        self.started = self.last_time = clock()
        self.first, self.last_n = initial, initial
        self.bar = None
        if enabled and on_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit, mininterval=1.0,
                            dynamic_ncols=True, file=self.stream, leave=not transient)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.n += n
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.set_postfix(refresh=False, **fields)
            self.bar.update(n)
        elif self.enabled and not self.transient and (self.n - self.last_n >= self.every
                                                      or self.clock() - self.last_time >= self.seconds):
            self._line()
        elif self.enabled and self.transient and self.clock() - self.last_time >= self.seconds:
            self._line()  # a short inner loop (generation) says something only when it takes a while

    def line(self) -> str:
        """``step 12/40 (30%) | loss 0.5398 | tok_s 24,391 | elapsed 1m02s | eta 2m10s``: the bar's fields."""
        elapsed = self.clock() - self.started
        done = self.n - self.first
        eta = elapsed / done * (self.total - self.n) if done > 0 else None
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc + ': ' if self.desc else ''}{self.unit} {self.n}/{self.total}{pct}"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"elapsed {duration(elapsed)}")
        if eta is not None and self.n < self.total:
            parts.append(f"eta {duration(eta)}")
        return " | ".join(parts)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_n, self.last_time = self.n, self.clock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and not self.transient and self.n != self.last_n:
            self._line()  # the last step is always in the log
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
