"""What a run writes as it goes: metrics.jsonl's lines and the run's totals (tokens, seconds, peak memory).

A line that does not fit on a full disk is written into the space reserved at the start (diskspace.Reserve) and
stops the run with a checkpoint (``Full``); a resumed run's totals add to those before it.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hwcompat.fsutil import atomic_write_text
from hwcompat.train import diskspace
from hwcompat.train.distributed import log
from hwcompat.train.model import accelerator
from hwcompat.train.rundir import record_written

if TYPE_CHECKING:
    from hwcompat.train.recipe import Recipe


class Full(Exception):
    """A metrics line that could not be written for lack of disk, written after all into the reserve's space:
    the loop saves a checkpoint there too and stops."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def record(r: Recipe, line: dict[str, Any]) -> None:
    """One line of metrics.jsonl (writers only)."""
    try:
        append_jsonl(r.metrics_path, line)
    except OSError as exc:
        if not diskspace.disk_full(exc) or r.reserve is None or not r.reserve.release():
            raise
        append_jsonl(r.metrics_path, line)  # the line goes in; then the run stops with a checkpoint
        raise Full(f"{r.metrics_path.name} (step {line['step']}'s record)") from None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    from hwcompat.fsutil import append_line

    new = not os.path.lexists(path)
    append_line(path, json.dumps(record))
    if new:
        record_written(path.parent, path.name)


def trim_metrics(r: Recipe) -> None:
    """Keep the log up to the resumed step; a torn or blank line (a crash mid-write) is dropped and said."""
    kept, torn = [], 0
    for ln in r.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(ln)
            step = rec.get("step", 0) if isinstance(rec, dict) else None
        except ValueError:
            step = None
        if not isinstance(step, int):
            torn += 1
        elif step <= r.start_step:
            kept.append(ln)
    if torn:
        log(r.dist, f"note: {r.metrics_path}: dropped {torn} torn or blank line(s) (an interrupted write)")
    atomic_write_text(r.metrics_path, "".join(ln + "\n" for ln in kept))


TOTALS = ("tokens", "train_seconds", "wall_seconds", "peak_memory_bytes")


def totals(r: Recipe, finished: bool = False) -> dict[str, float]:
    """The whole run's counts: those before a resume (``r.prior``, kept in the checkpoint's history) plus this
    process's up to its last completed step (or now, when ``finished``), so a resumed run's speed, time and peak
    are the run's, not its last part's, and the memory curve does not drop at the resume."""
    p = r.prior
    tokens = r.tokens if finished else r.step_tokens
    seconds = r.train_seconds if finished else r.step_seconds
    return {"tokens": p.get("tokens", 0) + tokens * r.dist.world,
            "train_seconds": p.get("train_seconds", 0.0) + seconds,
            "wall_seconds": p.get("wall_seconds", 0.0) + (time.time() - r.t_start),
            "peak_memory_bytes": max(int(p.get("peak_memory_bytes", 0)), memory_now(r))}


def memory_now(r: Recipe) -> int:
    """The peak so far: the device allocator's on a GPU, the process's max RSS on the CPU."""
    backend = accelerator(r.device.type)
    return backend.max_memory_allocated() if backend else _rss_peak_bytes()


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
