"""Atomic writes, run-folder locks and leftovers: nothing the user had is lost or half-written.

A write goes to a uniquely named temp file (or folder) beside the target, then a rename: a crash or Ctrl-C
mid-write leaves the old file or nothing, never half a file. Outputs get the user's umask (mkstemp alone
would make them 0600). A folder being written is locked (``flock``) for the life of the writer; temp names
follow one pattern (``.NAME.<random>.tmp``, ``.NAME.old``), so a killed writer's leftovers are recognised and
removed by the next writer of that folder, and nothing else ever is.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hwcompat.userfile import read_regular


def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def user_mode(path: str | Path, directory: bool = False) -> None:
    """Give a temp file (0600) or folder (0700) the mode a plain open()/mkdir() would have had."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def temp_name(target: Path) -> str:
    """The prefix of every temp artefact for ``target`` (see ``clean_stale``)."""
    return f".{target.name}."


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(path), suffix=".tmp", dir=path.parent))
    user_mode(tmp, directory=True)
    try:
        yield tmp
        _files_to_user_mode(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_nofollow(path: str | Path, flags: int) -> int:
    """``os.open`` for a file hwcompat creates or writes, never through a symbolic link planted at its name and
    never anything but a regular file (a FIFO would block, a device would be written).

    Why: lock files and logs live in shared folders (``/tmp``, a run folder); a link there must not let
    hwcompat truncate or append to its target.
    """
    import errno

    from hwcompat.errors import InputError

    odd = InputError(f"{path} is not a regular file (a FIFO, device or socket sits at a name hwcompat writes); "
                     "remove it and run again")
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666 & ~umask())
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path} is a symbolic link; hwcompat never writes through a link at a name it uses "
                             "(it could truncate the link's target). Remove the link and run again") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO with no reader, a folder
            raise odd from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise odd
    os.set_blocking(fd, True)
    return fd


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log hwcompat owns (metrics.jsonl), without following a planted link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _files_to_user_mode(folder: Path) -> None:
    """Files a library wrote into a temp folder get the user's umask too: safetensors' writer makes them 0600, so a
    host user could not read what a uid-1000 container wrote (the README promises the umask)."""
    mode = 0o666 & ~umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, mode)
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, (0o777 & ~umask()))


def clean_stale(folder: str | Path, target: str | None = None) -> list[str]:
    """Remove hwcompat's own leftovers in ``folder`` (``.NAME.<random>.tmp``, ``.NAME.old``); returns their names.

    ``target`` limits it to one output's leftovers (a merge or export into a shared folder). Only call with
    the lock of what you clean held: then no live writer owns them.
    """
    import re

    name = re.escape(target) if target else ".+"
    pattern = re.compile(rf"^\.{name}\.[a-z0-9_]{{8}}\.tmp$|^\.{name}\.old$")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if pattern.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


#: The ledger of what hwcompat wrote in a folder (a run folder): the only names it may ever remove there.
LEDGER = ".hwcompat-outputs.json"


def ledger_names(folder: str | Path) -> set[str] | None:
    """The names recorded in ``folder``'s ledger; None when it has none, empty when it cannot be read."""
    from hwcompat.errors import InputError

    path = Path(folder) / LEDGER
    if not os.path.lexists(path):
        return None
    try:
        names = json.loads(read_regular(path, "ledger", limit=1 << 20))["written"]
        return {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}
    except (InputError, ValueError, KeyError, TypeError):  # a damaged ledger owns nothing
        return set()


def record_written(folder: str | Path, *names: str, only_if_ledger: bool = False, planned: bool = False) -> None:
    """Add ``names`` (that exist) to ``folder``'s ledger; call with the folder's or the output's lock held,
    after the write. ``only_if_ledger``: record only in a folder that keeps one (a run folder), so a merge or
    export into any other folder leaves nothing beside its output. ``planned``: record names about to be
    written by a library that creates them when it likes (a tracker's folder), after the caller refused any
    existing one that was not hwcompat's."""
    folder = Path(folder)
    have = ledger_names(folder)
    if have is None and only_if_ledger:
        return
    have = have or set()
    names = tuple(n for n in names if planned or os.path.lexists(folder / n))
    if not set(names) <= have:
        atomic_write_json(folder / LEDGER, {"written": sorted(have | set(names))})


LOCK_NAME = ".hwcompat.lock"


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.hwcompat.lock`` for the life of one writer (train, merge, export).

    The lock file holds the owner's PID and command, so a second writer is told who has it. The descriptor
    can be made inheritable so the lock passes through ``exec`` to the training process, and is released by
    the kernel whenever that process ends, however it ends.
    """

    def __init__(self, folder: str | Path, what: str, target: str | None = None):
        """Lock ``folder`` as a whole, or only its output ``target`` (lock file ``.TARGET.lock``, removed again
        on release so a merge or export leaves nothing beside its output)."""
        self.path = Path(folder) / (f".{target}.lock" if target else LOCK_NAME)
        self.remove = target is not None
        while True:
            self.fd = self._acquire(folder, what, target)
            try:  # a releaser may have unlinked the file between our open() and flock(): then lock afresh
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"PID {os.getpid()} ({what})\n".encode(), 0)

    def _acquire(self, folder: str | Path, what: str, target: str | None) -> int:
        import fcntl

        from hwcompat.errors import InputError

        fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise InputError(f"{Path(folder) / target if target else folder} is in use by {owner}; wait for it to "
                             "finish or stop it (the lock goes away with the process)") from None
        return fd

    def keep_across_exec(self) -> None:
        os.set_inheritable(self.fd, True)

    def release(self) -> None:
        if self.remove:
            Path(self.path).unlink(missing_ok=True)  # while still held: see the inode check above
        try:
            os.close(self.fd)
        except OSError:
            pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, ``kill``) or SIGHUP (the terminal or ssh session closed) turned into an
    exception, so ``with``/``finally`` cleanups run."""

    exit_code = 143

    def __init__(self, signum: int = 15) -> None:
        super().__init__()
        self.signum = signum
        self.exit_code = 128 + signum


#: The signals that end a user's process and that hwcompat turns into a clean exit (SIGINT is Python's
#: KeyboardInterrupt already): ``docker stop`` / ``kill`` and a closed terminal.
STOP_SIGNALS = ("SIGTERM", "SIGHUP")


@contextmanager
def terminate_cleanly() -> Iterator[None]:
    """While inside: SIGTERM / SIGHUP raise ``Terminated`` (exit 143 / 129) instead of killing the process
    mid-write. A SIGHUP that the parent set to be ignored (``nohup``) stays ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    old = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name)
        if signal.getsignal(sig) is signal.SIG_IGN and name == "SIGHUP":
            continue
        old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


@contextmanager
def output_target(path: str | Path, what: str, overwrite: bool, kind: str = "file") -> Iterator[Path]:
    """Claim one output (a file or folder): refuse an existing one without ``overwrite``, lock it, clear a
    killed writer's leftovers for it, and turn SIGTERM into a clean exit while it is written."""
    from hwcompat.errors import InputError

    path = Path(path)
    if path.exists() and (kind == "file") != path.is_file():
        want = "a file path like OUT/model.gguf" if kind == "file" else "a folder path"
        raise InputError(f"{path} is a {'folder' if path.is_dir() else 'file'}; give {want}")
    if path.exists() and not overwrite and (kind == "file" or any(path.iterdir())):
        raise InputError(f"{path} already exists; pass --overwrite to replace it (nothing was written)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot create it ({exc.strerror or exc})") from None
    lock = FolderLock(path.parent, what, target=path.name)
    try:
        clean_stale(path.parent, path.name)
        with terminate_cleanly():
            yield path
        record_written(path.parent, path.name, only_if_ledger=True)  # e.g. a Modelfile exported into a run
    except BaseException:
        clean_stale(path.parent, path.name)  # whatever the writer had in flight (we still hold the lock)
        raise
    finally:
        lock.release()


def require_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse before writing when ``folder``'s filesystem has less free space than ``needed`` bytes (+5 %)."""
    from hwcompat.errors import HwcompatError

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed * 1.05:
        raise HwcompatError(f"no space left for {what} on the filesystem of {folder}: about {needed / 2**20:,.0f} MB "
                            f"needed, {free / 2**20:,.0f} MB free; free some space or choose another output. "
                            "Nothing was written")
