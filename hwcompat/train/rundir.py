"""The run folder's rules: who may write it, when a run starts over, what a resume may change.

- One writer at a time: an exclusive lock (``fsutil.FolderLock``) is taken before anything in the folder
  changes and is held by the training process until it exits; a second start is told which PID has it.
- Nothing in the folder changes until the start (or resume) is accepted: a refused ``--resume`` leaves
  config.yaml and run.json exactly as they were, so the run can still be resumed with its own config.
- A folder with a finished run or a checkpoint is replaced only with ``--overwrite``. A folder whose run
  failed before its first checkpoint holds nothing to keep: a plain rerun (or ``--resume``) starts over.
- A resume keeps the settings that shape the model or the data (model, data files, LoRA shape, seed,
  max_seq_len, optimizer and its hyperparameters, batching …): their state is in the checkpoint. Only the
  schedule may change (``RESUMABLE``), each change is recorded in run.json with the step it applies from,
  and a resume never moves a run backwards (fewer steps than it already made).
- Leftovers of a killed writer (hwcompat's own temp names only) are removed once the lock is held.
- Only what hwcompat wrote is ever removed or replaced: each output is recorded in the folder's ledger
  (``.hwcompat-outputs.json``) when it is written, a restart or ``--overwrite`` clears only the ledger's names,
  and a run refuses to start when a name it would write is taken by something the ledger does not list
  (the user's own config.yaml with ``output_dir: .``, a hand-written model.Modelfile): nothing is guessed.
"""

from __future__ import annotations

import os
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwcompat import fsutil
from hwcompat.errors import InputError, NothingToDo

#: Settings a resume may change: they decide how long to go on and what to do along the way, not what
#: the checkpoint's weights, optimizer state or data order mean.
RESUMABLE = ("epochs", "max_steps", "numerics_check", "eval_every", "eval_at_start", "eval_metrics", "eval_max_rows",
             "eval_max_new_tokens", "checkpoint_every", "keep_checkpoints", "export", "export_type",
             "export_imatrix", "force", "num_threads", "output_dir", "report_to")
#: What a run writes in its folder: the records at the start, then the logs, checkpoints and results.
RECORDS = ("config.yaml", "profile.json", "devices.json", "run.json")
RESULTS = ("metrics.jsonl", "checkpoints", "adapter", "summary.json", "report.html")
#: What ``export: gguf`` adds (the export chain's outputs in the run folder).
EXPORTS = ("merged", "model.gguf", "model.export.json", "model.Modelfile", "model.imatrix.gguf")
#: The ledger of what hwcompat wrote in a run folder (see the module docstring).
LEDGER = fsutil.LEDGER
record_written = fsutil.record_written
#: A run folder made before the ledger existed: what the trainer wrote there.
LEGACY_OWNED = RECORDS + ("metrics.jsonl", "checkpoints", "adapter", "summary.json")  # no report.html back then


def written(run_dir: Path) -> set[str]:
    """Names hwcompat recorded as its own writes in ``run_dir`` (a folder from before the ledger: see below)."""
    names = fsutil.ledger_names(run_dir)
    return _legacy_owned(run_dir) if names is None else names


def _legacy_owned(run_dir: Path) -> set[str]:
    """A run folder from before the ledger (it has run.json): the trainer's own names. Not the export's
    names, which a user may have made by hand; a folder without run.json owns nothing."""
    return set(LEGACY_OWNED) if (run_dir / "run.json").is_file() else set()


def foreign(run_dir: Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Which of ``names`` exist in ``run_dir`` but are not hwcompat's writes (symbolic links included)."""
    ours = written(run_dir)
    return [n for n in names if n not in ours and os.path.lexists(run_dir / n)]


def refuse_foreign(run_dir: Path, names: tuple[str, ...] | list[str]) -> None:
    taken = foreign(run_dir, names)
    if taken:
        raise InputError(f"output_dir {run_dir} holds {', '.join(taken)}, which hwcompat did not write, at "
                         f"name(s) this run writes; hwcompat never replaces what it did not make (even with "
                         "--overwrite). Choose another output_dir (e.g. runs/NAME), or move those files away")


@dataclass
class RunDir:
    path: Path
    lock: fsutil.FolderLock
    resume: bool  # False when a --resume found nothing to resume and the run starts over
    notes: list[str] = field(default_factory=list)
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)  # resume: key -> {"from", "to"}
    from_step: int = 0


def _checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint (what a resume starts from); None when there is none."""
    from hwcompat.train import checkpoint

    ck = checkpoint.latest(run_dir)
    if ck is None:
        return None
    try:
        return int(json.loads((ck / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(ck.name.removeprefix(checkpoint.PREFIX))


def _state_step(ck: Path) -> int | None:
    try:
        return int(json.loads((ck / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finished_step(run_dir: Path) -> int | None:
    """Steps of a finished run (summary.json), which may be past its last checkpoint."""
    from hwcompat import summary as summary_file

    try:
        summary = summary_file.read(run_dir)
    except (OSError, InputError):
        return 0
    return None if summary is None else summary.steps


def recorded_config(run_dir: Path, purpose: str = "--resume") -> dict[str, Any]:
    """The config the run was made with (run.json), or a clear error when it is missing or damaged."""
    path = run_dir / "run.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        cfg = spec["config"]
        if not isinstance(cfg, dict):
            raise TypeError("config is not a mapping")
        return cfg
    except FileNotFoundError:
        raise InputError(f"{purpose}: {path} is missing, so the run's settings are unknown; start over with "
                         "--overwrite (its checkpoints cannot be trusted without them)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{purpose}: {path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); the run's "
                         "settings cannot be trusted; for a merge give --base MODEL_DIR, for a resume start over "
                         "with --overwrite") from None


def resume_changes(recorded: dict[str, Any], new: dict[str, Any], done: int) -> dict[str, dict[str, Any]]:
    """Allowed changes {key: {"from", "to"}}; raises naming every setting that may not change."""
    fixed = sorted(k for k in new if k not in RESUMABLE and k in recorded and recorded[k] != new[k])
    if fixed:
        was = ", ".join(f"{k}={json.dumps(recorded[k])}" for k in fixed)
        raise InputError(f"--resume: {', '.join(fixed)} cannot change on a resume (the checkpoint was made with "
                         f"{was}); resume with the run's own settings, or start a new run in another output_dir")
    changes = {k: {"from": recorded.get(k), "to": new[k]} for k in RESUMABLE
               if k in new and k != "output_dir" and recorded.get(k) != new[k]}
    if new.get("max_steps", 0) and new["max_steps"] < done:
        raise InputError(f"--resume: the run already made {done} steps; max_steps={new['max_steps']} would move it "
                         "backwards (a resume only goes on); give max_steps >= "
                         f"{done}, or start a new run")
    return changes


def nothing_left(recorded: dict[str, Any], new: dict[str, Any], end_step: int) -> bool:
    """A resume of a finished run that asks for no more steps than it made (same max_steps, or the same epochs)."""
    if new.get("max_steps", 0):
        return new["max_steps"] <= end_step
    return not recorded.get("max_steps", 0) and new.get("epochs") == recorded.get("epochs")


def _clear(run_dir: Path) -> list[str]:
    """Remove the previous run's outputs: only the names the ledger lists. Returns what was removed."""
    import shutil

    removed = []
    for name in sorted(written(run_dir)):
        target = run_dir / name
        if not os.path.lexists(target):
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        removed.append(name)
    (run_dir / LEDGER).unlink(missing_ok=True)
    return removed


def _make(run_dir: Path) -> None:
    if run_dir.is_symlink() and not run_dir.exists():
        raise InputError(f"output_dir {run_dir} is a symbolic link that leads nowhere (a loop or a dangling link); "
                         "point output_dir at a real folder")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output_dir {run_dir} is a file; choose a folder path for output_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output_dir {run_dir}: cannot create it ({exc.strerror or exc}); choose a writable "
                         "output_dir") from None
    if not _writable(run_dir):
        raise InputError(f"output_dir {run_dir} is not writable (read-only filesystem or permissions); choose "
                         "a writable output_dir")


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def _refuse_all_damaged(run_dir: Path, resume: bool, ck_step: int | None) -> None:
    """A resume whose every checkpoint lost its state.json (so no step can be told) must not quietly start over
    and clear them; other damage is found by the trainer, which falls back to an older checkpoint."""
    from hwcompat.train import checkpoint

    found = checkpoint.candidates(run_dir)
    if resume and found and all(_state_step(ck) is None for ck in found):
        why = "; ".join(f"{ck.name}: {checkpoint.problem(ck)}" for ck in found[:3])
        raise InputError(f"--resume: no usable checkpoint in {run_dir / 'checkpoints'} ({why}); nothing was changed. "
                         "Start the run again with --overwrite")


def open_run_dir(output_dir: str, new_config: dict[str, Any], resume: bool, overwrite: bool,
                 outputs: tuple[str, ...] = RECORDS + RESULTS) -> RunDir:
    """Lock the run folder and decide start / restart / resume before anything in it changes.

    ``outputs``: the names this run will write (``EXPORTS`` too when it exports), none of which may be taken.
    """
    if not str(output_dir).strip():
        raise InputError("output_dir is empty; give the run a folder, e.g. output_dir=runs/NAME (an empty value "
                         "would mean the current folder)")
    run_dir = Path(os.path.abspath(output_dir))  # no symlink resolution: a loop is an error below, not a crash
    _make(run_dir)
    lock = fsutil.FolderLock(run_dir, "hwcompat train")
    try:
        out = RunDir(run_dir, lock, resume)
        stale = fsutil.clean_stale(run_dir) + fsutil.clean_stale(run_dir / "checkpoints")
        if stale:
            out.notes.append(f"removed leftovers of an interrupted write: {', '.join(sorted(stale))}")
        ck_step, end_step = _checkpoint_step(run_dir), _finished_step(run_dir)
        finished = ((run_dir / "adapter").is_dir() or ((run_dir / "model").is_dir() and "model" in written(run_dir))
                    or end_step is not None)
        if resume and ck_step is None and finished:
            raise InputError(f"--resume: the run in {run_dir} finished (step {end_step}) and kept no checkpoint to "
                             "go on from (checkpoint_every=0 keeps one only on an interrupt); start a new run in "
                             "another output_dir, or --overwrite")
        refuse_foreign(run_dir, outputs)
        _refuse_all_damaged(run_dir, resume, ck_step)
        if resume and ck_step is None:
            out.resume = False
            out.notes.append("--resume: no checkpoint yet (the run stopped before its first one); starting over")
        if out.resume:
            recorded = recorded_config(run_dir)
            out.changes = resume_changes(recorded, new_config, max(ck_step or 0, end_step or 0))
            if end_step and nothing_left(recorded, new_config, end_step):
                raise NothingToDo(f"the run in {run_dir} finished at step {end_step} (summary.json): nothing to "
                                  "resume, nothing changed. To train on, give it more steps: hwcompat train "
                                  f"{run_dir / 'config.yaml'} --resume max_steps={2 * end_step}")
            out.from_step = ck_step or 0
        elif ck_step is not None or finished:
            if not overwrite:
                raise InputError(f"output_dir {run_dir} already holds a run; continue it with --resume, choose "
                                 "another output_dir, or pass --overwrite to replace it")
            _clear(run_dir)
        elif (run_dir / "run.json").exists():
            out.notes.append("the previous run in this folder stopped before its first checkpoint; starting over")
            _clear(run_dir)
        return out
    except BaseException:
        lock.release()
        raise
