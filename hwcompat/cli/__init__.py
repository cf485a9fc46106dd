"""The ``hwcompat`` command line: one module per subcommand.

This is the only place that catches ``HwcompatError``: it prints the
message to stderr and exits with the error's code (2 for bad input).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hwcompat import __version__
from hwcompat.errors import HwcompatError

#: subcommand -> module under hwcompat.cli; each has add_parser(subparsers) and run(args) -> int.
COMMANDS = {
    "detect": "detect",
    "env": "env",
    "train": "train",
    "data": "data",
    "demo": "demo",
    "plan": "plan",
    "doctor": "doctor",
    "images": "images",
    "merge": "merge",
    "export": "export",
    "selftest": "selftest",
    "report": "report",
    "generate": "inspect",
    "eval": "inspect",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (``detect`` must start fast)."""
    parser = argparse.ArgumentParser(
        prog="hwcompat",
        description="Fine-tune an LLM on the GPU you already have.",
    )
    parser.add_argument("--version", action="version", version=f"hwcompat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    added = set()
    for name, module in COMMANDS.items():
        if (only is None or name == only) and module not in added:
            mod = importlib.import_module(f"hwcompat.cli.{module}")
            (mod.add_parsers if hasattr(mod, "add_parsers") else mod.add_parser)(sub)  # a module may add several
            added.add(module)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named first on the command line, if any (options before it mean: build them all)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (train cfg.yaml --resume lr=1e-4): argparse leaves those here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra and getattr(args, "passthrough", False):  # `images run … -- ARGS`: the image's command takes them
        args.args = list(args.args or []) + (extra[1:] if extra[0] == "--" else extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from hwcompat.progress import quiet_library_bars

    quiet_library_bars()  # before any library that draws a bar is imported; the worker inherits it
    try:
        return int(args.func(args) or 0)
    except HwcompatError as exc:
        print(f"hwcompat: {'error: ' if exc.exit_code else ''}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM inside fsutil.terminate_cleanly (Terminated)
        code = getattr(exc, "exit_code", 130)
        print(f"hwcompat: {'interrupted' if code == 130 else 'terminated'}; nothing half-written was left",
              file=sys.stderr)
        return code
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a full disk or a dead output: said in one line, never a traceback
        return _os_error(exc)


def _os_error(exc: OSError) -> int:
    import errno
    import os

    try:  # stdout may be the thing that failed: stop the interpreter from flushing into it again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        print(f"hwcompat: error: cannot write the output{where}: {exc.strerror}; free some space and run it "
              "again (what was being written was removed)", file=sys.stderr)
        return 1
    print(f"hwcompat: error: {exc.strerror or exc}{where}", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
