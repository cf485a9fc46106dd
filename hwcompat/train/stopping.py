"""Why a run stops before its last step, and what the user is told: signals, divergence, out of memory."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

from hwcompat.fsutil import Terminated
from hwcompat.resolve import ResolvedProfile
from hwcompat.train.config import TrainConfig

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}

#: Consecutive optimizer steps with a non-finite loss or gradient norm after which a run is stopped.
NONFINITE_STEPS = 3


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while the first one's checkpoint is pending: stop at once."""


class Signals:
    """One handler for the worker's whole life: SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session).

    In the training loop a signal only sets a flag; the loop checkpoints at the next micro-batch boundary
    and exits. Acting at a micro-batch, not an optimizer step, bounds the time to exit by one
    forward/backward pass, so ``docker stop`` (SIGKILL after 10 s) never lands before the checkpoint. Inside
    ``at_once()`` (model load, evals with generation, export) the handler raises ``Terminated`` instead, so a
    long phase stops within one forward pass too and its caller saves what exists. A SIGHUP the parent set to
    be ignored (``nohup``) stays ignored.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._raise = False
        self._old = {}
        for sig in EXIT_SIGNAL:
            if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
                continue
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise SecondInterrupt  # second Ctrl-C: stop now
        self.received = signum
        if self._raise:
            self._raise = False  # raised once; whoever catches it saves, with the flag still set
            raise Terminated(signum)

    @contextmanager
    def at_once(self) -> Iterator[None]:
        """While inside, a signal (or one already received) raises ``Terminated`` where the code is."""
        if self.received is not None:
            raise Terminated(self.received)
        self._raise = True
        try:
            yield
        finally:
            self._raise = False

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def exit_code(self) -> int:
        """130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP (and 143 for a rank that stopped because another
        was signalled)."""
        return EXIT_SIGNAL.get(self.received or signal.SIGTERM, 143)


def divergence_advice(cfg: TrainConfig, profile: ResolvedProfile, step: int, loss: float, grad_norm: float) -> str:
    """A run whose loss went NaN/inf stops before it can write a NaN adapter; say what to change."""
    fp16 = profile.dtype == "float16"
    return (f"training diverged: loss {loss} and gradient norm {grad_norm} were not finite for {NONFINITE_STEPS} "
            f"steps in a row (at step {step}); no adapter was written. Try a lower learning_rate (now "
            f"{cfg.learning_rate:g}, e.g. learning_rate={cfg.learning_rate / 10:g}), max_grad_norm=1.0"
            + (", or dtype=float32 (fp16 overflows on some models)" if fp16 else "")
            + "; earlier checkpoints, if any, are untouched")


def oom_advice(cfg: TrainConfig, profile: ResolvedProfile, step: int) -> str:
    tips = []
    if cfg.micro_batch_size > 1:
        tips.append(f"micro_batch_size={max(1, cfg.micro_batch_size // 2)} "
                    f"gradient_accumulation={cfg.gradient_accumulation * 2} (same effective batch)")
    tips.append(f"max_seq_len={max(128, cfg.max_seq_len // 2)}")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing=true (about a third more time, far less activation memory)")
    if not cfg.qlora and "nf4" in profile.quantization:
        tips.append("qlora=true (4-bit base weights)")
    return (f"out of memory at step {step} (micro_batch_size={cfg.micro_batch_size}, "
            f"max_seq_len={cfg.max_seq_len}). Try one of: " + "; ".join(tips) +
            ". `hwcompat plan` estimates what fits before you start.")
