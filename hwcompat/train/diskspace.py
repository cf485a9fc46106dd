"""A full disk or an exhausted host memory ends a run cleanly, with the work saved.

Why a reserve: when the disk fills mid-run, the steps since the last checkpoint live only in memory, and saving
them needs the very space that ran out. So the writer process claims one checkpoint's worth of real blocks at the
start (``posix_fallocate``: a nearly full disk is said then, before the first step, not as a ``torch.save``
traceback hours later). When a write fails for lack of space, the reserve is given back and the checkpoint is
written into it; the run stops saying what ran out, at which step, what was kept and how to resume.

Host memory (``MemoryError``, or torch's CPU allocator failing) is said the same way, without a traceback and
without the dozens of "Exception ignored" lines an interpreter short of memory prints on its way out.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from hwcompat.errors import HwcompatError

#: Writes fail with these when the filesystem (or the user's quota) is full.
FULL = (errno.ENOSPC, errno.EDQUOT)
#: What torch's writers and allocator say instead of raising OSError / MemoryError.
TORCH_FULL = ("file write failed", "No space left on device", "Disk quota exceeded")
TORCH_NO_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")
#: The reserve's name: a hwcompat temp name, so a killed run's leftover is removed by the next start.
RESERVE = ".hwcompat-reserve"


class DiskFull(HwcompatError):
    """The disk ran out; the message says at which step, what was kept and how to resume."""


class HostMemoryExhausted(HwcompatError):
    """The host's memory ran out; exit without the interpreter's noise (see the worker)."""

    quiet_exit = True


def disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in FULL
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in TORCH_FULL)


def memory_exhausted(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                            and any(t in str(exc) for t in TORCH_NO_MEMORY))


def free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


class Reserve:
    """One checkpoint's worth of disk, held in the run folder until a write needs it."""

    def __init__(self, run_dir: Path, nbytes: int) -> None:
        self.run_dir, self.nbytes, self.path = run_dir, nbytes, None
        fd, name = tempfile.mkstemp(prefix=f"{RESERVE}.", suffix=".tmp", dir=run_dir)
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            os.close(fd)
            os.unlink(name)
            if exc.errno in FULL:
                raise DiskFull(f"not enough free disk for this run's checkpoints in {run_dir}: one needs "
                               f"{_mb(nbytes)}, {_mb(max(0, free_bytes(run_dir)))} is free; nothing was trained. Free "
                               "space (or set output_dir on a larger disk), then run the same command again") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: no reserve
                raise
            return
        os.close(fd)
        self.path = Path(name)

    def release(self) -> bool:
        """Give the space back (for the checkpoint that saves the run); whether there was any to give."""
        path, self.path = self.path, None
        if path is None:
            return False
        path.unlink(missing_ok=True)
        return True


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def stopped_message(run_dir: Path, step: int, total: int, what: str, kept: str, need: int) -> str:
    return (f"the disk of {run_dir} is full (no space left on device) at step {step}/{total}, while writing {what}; "
            f"{kept}. Free at least {_mb(need)} (old runs, `hwcompat` checkpoints of other runs, caches), then "
            f"resume with: hwcompat train {run_dir / 'config.yaml'} --resume")


def memory_message(run_dir: Path, step: int, total: int, phase: str, kept: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
    at = f"at step {step}/{total}" if total else "before the first step"
    return (f"the host ran out of memory {at} ({phase}: {first}); {kept}. Lower micro_batch_size "
            "or max_seq_len (`hwcompat plan` shows what fits), close other programs or raise the process's memory "
            f"limit (ulimit -v), then resume with: hwcompat train {run_dir / 'config.yaml'} --resume")
