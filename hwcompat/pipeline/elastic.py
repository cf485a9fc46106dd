"""torchrun, with the exit code a user (or ``docker stop``) expects: ``python -m hwcompat.pipeline.elastic ARGS``.

torchrun's own entry point turns any worker exit other than 0 into exit 1 and a ChildFailedError report.
When every failed worker agrees on one of hwcompat's codes (2: bad input, 130: Ctrl-C, 143: SIGTERM, all
after a checkpoint where there was one), that code is the launcher's too, so scripts and container
restart policies can tell "stopped cleanly" from "crashed". The arguments are torchrun's, unchanged.
"""

from __future__ import annotations

import sys

#: Worker exit codes passed through as the launcher's own.
PASSED = {2, 130, 143}


def exit_code(worker_codes: set[int]) -> int:
    return worker_codes.pop() if len(worker_codes) == 1 and worker_codes <= PASSED else 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        return exit_code({f.exitcode for f in exc.failures.values()})
    except SignalException as exc:  # this launcher was signalled; its workers were sent the same signal
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
