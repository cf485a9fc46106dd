"""Reading a user's file: a regular file only, with a bound, so no input can hang hwcompat or fill its memory.

Kept apart from ``fsutil`` (temp files, locks) because ``detect`` reads its YAML through it and must start in
milliseconds: this module imports nothing but ``os`` and ``stat``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: The most bytes hwcompat reads from one user file (config, data, readings); a larger one is refused, so
#: ``/dev/zero`` or a runaway file can never grow memory without bound.
MAX_READ = 4 << 30


def read_regular(path: str | Path, what: str, error: type | None = None, limit: int = MAX_READ) -> bytes:
    """The bytes of a user's *regular* file, read with a bound; anything else is a clear ``error``.

    A FIFO with no writer would hang ``open()``, ``/dev/zero`` grows memory until the OOM killer, and a pipe
    (``<(…)``) can be read only once (the launcher checks it, the trainer reads it again, and sees nothing).
    """
    from hwcompat.errors import InputError

    error = error or InputError
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO's open() returns at once
    except FileNotFoundError:
        raise error(f"{what} {p}: not found") from None
    except OSError as exc:
        raise error(f"{what} {p}: cannot read it ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode) and _is_dev_null(st):
            return b""  # the one stated exception: /dev/null, the usual "empty file" (`train /dev/null key=value`)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a pipe or FIFO (e.g. <(...))"
                    if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                    stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise error(f"{what} {p}: is {kind}; hwcompat reads only regular files (it reads a file more than "
                        "once and must know its size): write the content to a file and pass that")
        if st.st_size > limit:
            raise error(f"{what} {p}: {st.st_size:,} bytes, over the {limit:,}-byte limit for one file; split it")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:  # the file grew while read
                raise error(f"{what} {p}: grew past the {limit:,}-byte limit while it was read")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{what} {p}: cannot read it ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _is_dev_null(st: os.stat_result) -> bool:
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return st.st_rdev == null.st_rdev


def read_json_object(path: str | Path, what: str, limit: int = 64 << 20) -> dict:
    """A JSON object from a file a user gave (a model's config.json, tokenizer_config.json …): a file that is
    missing, not JSON or not an object is an InputError naming it and what to do."""
    import json

    from hwcompat.errors import InputError

    p = Path(path)
    raw = read_regular(p, what, limit=limit)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{what} {p}: not valid JSON ({str(exc)[:100]}); the file is damaged or was edited by "
                         "hand: restore it from the model's release") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {p}: expected a JSON object, got {type(data).__name__}; restore it from the "
                         "model's release")
    return data
