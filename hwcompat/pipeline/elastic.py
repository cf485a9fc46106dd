"""torchrun, with the exit code a user (or ``docker stop``) expects: ``python -m hwcompat.pipeline.elastic ARGS``.

torchrun's own entry point turns any worker exit other than 0 into exit 1 and a ChildFailedError report.
When every failed worker agrees on one of hwcompat's codes (2: bad input, 130: Ctrl-C, 143: SIGTERM, all
after a checkpoint where there was one), that code is the launcher's too, so scripts and container
restart policies can tell "stopped cleanly" from "crashed". The arguments are torchrun's, unchanged.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable

#: Worker exit codes passed through as the launcher's own.
PASSED = {2, 130, 143}
#: How a worker ends when torchrun closes it after a peer failed: killed by SIGTERM or, past the grace period,
#: SIGKILL, or hwcompat's own clean exit on SIGTERM. torchrun books these as failures too.
CLOSED = {-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM}


def exit_code(worker_codes: Iterable[int]) -> int:
    """The launcher's code: the workers' one agreed hwcompat code, else 1. Workers torchrun closed after a peer
    failed are not the cause, unless every worker ended so (the launcher's own signal then reached them all)."""
    codes = set(worker_codes)
    cause = codes - CLOSED or codes
    return cause.pop() if len(cause) == 1 and cause <= PASSED else 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        return exit_code(f.exitcode for f in exc.failures.values())
    except SignalException as exc:  # this launcher was signalled; its workers were sent the same signal
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
