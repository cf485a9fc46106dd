"""Entry point of the training process: ``python -m hwcompat.train.worker RUN_DIR [--resume]``.

Started by ``hwcompat train`` with the profile environment already set, so
torch is first imported here, after the allocator and vendor flags exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hwcompat.errors import HwcompatError


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1:
        print("usage: python -m hwcompat.train.worker RUN_DIR [--resume]", file=sys.stderr)
        return 2
    import logging

    # bitsandbytes' CPU backend warns on import (peft imports it whenever it is installed) that an optional
    # 4-bit kernel package is missing; hwcompat never runs 4-bit on the CPU, so the line is noise to the user.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from hwcompat.train.loop import SecondInterrupt, run

    # From the first line on, a signal is a clean exit with a true message: loop.run holds one handler for the
    # whole life of the process (load, evals, steps, adapter, export) and saves what exists.
    try:
        return run(Path(paths[0]), resume=resume)
    except HwcompatError as exc:
        print(f"hwcompat: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SecondInterrupt:
        print("hwcompat: interrupted (second Ctrl-C); no new checkpoint written"
              + ("; the earlier checkpoints are untouched" if resume else ""), file=sys.stderr)
        return 130
    except KeyboardInterrupt as exc:  # Terminated (any signal) before the first step: load or first eval
        kept = ("the run's checkpoints are untouched: resume again with --resume" if resume else
                "no step was made, so there is nothing to save: run the same command again to start")
        print(f"hwcompat: {'interrupted' if getattr(exc, 'exit_code', 130) == 130 else 'terminated'} before "
              f"training started (model load or first eval); {kept}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
