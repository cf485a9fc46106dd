"""Checkpoints: everything needed to continue bit-for-bit, written atomically.

A checkpoint folder holds the trainable (LoRA) weights as safetensors, the
optimizer / scheduler / grad-scaler state and the RNG states (loaded back
with ``weights_only=True``), and ``state.json`` (step, metrics so far). It
is built in a temp folder and renamed into place, so an interrupt during
the write never leaves a half checkpoint that ``--resume`` would trust.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from hwcompat.fsutil import atomic_dir

PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


FILES = ("trainable.safetensors", "optim.pt", "rng.pt", "state.json")


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first (temp folders start with a dot and are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith(PREFIX) and p.is_dir()), reverse=True)


def problem(ck: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, empty, torn), or None; cheap, no torch."""
    from hwcompat.errors import InputError
    from hwcompat.weights import read_header

    for name in FILES:
        f = ck / name
        if not f.is_file() or f.stat().st_size == 0:
            return f"{name} is {'empty' if f.is_file() else 'missing'}"
    try:
        state = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        int(state["step"])
        state["python_random"][1]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"state.json is damaged ({type(exc).__name__})"
    try:
        read_header(ck / "trainable.safetensors")
    except InputError as exc:
        return f"trainable.safetensors is damaged ({str(exc).split('(', 1)[-1].rstrip(')')[:120]})"
    return None


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint with a state.json (what a resume starts from; ``--resume`` then passes over a
    damaged one to the one before it, see recipe._load_checkpoint)."""
    return next((ck for ck in candidates(run_dir) if (ck / "state.json").is_file()), None)


def rng_state() -> dict[str, Any]:
    """Every random state a step consumes (torch CPU, CUDA, Python's ``random``), to restore it exactly."""
    import torch

    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        rng["xpu"] = torch.xpu.get_rng_state_all()
    return rng


def save(run_dir: Path, step: int, model, optimizer, scheduler, scaler, state: dict[str, Any], keep: int,
         rng: dict[str, Any] | None = None, objective: dict[str, Any] | None = None) -> Path:
    """``rng``: the random state to record (default: now); a stop mid-step passes the state at its start.
    ``objective``: what the objective keeps between steps (GRPO's rollouts under num_iterations), objective.pt."""
    rng = dict(rng or rng_state())
    py_state = rng.pop("python")
    target = checkpoint_dir(run_dir) / f"{PREFIX}{step:07d}"
    # a full disk raises here (OSError, or torch.save's RuntimeError); the partial folder is removed by atomic_dir
    # and the loop decides (train/diskspace.py): the reserve's space, then a clear stop
    _write(target, model, optimizer, scheduler, scaler, state, step, rng, py_state, objective)
    from hwcompat.train.rundir import record_written

    record_written(run_dir, checkpoint_dir(run_dir).name)
    done = sorted(p for p in checkpoint_dir(run_dir).iterdir() if p.name.startswith(PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def named_weights(model) -> dict[str, Any]:
    """What a checkpoint keeps, by name: a mapping given as is (a full fine-tune's host masters), else a module's
    trainable parameters."""
    if isinstance(model, dict):
        return model
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def size_estimate(model) -> int:
    """Bytes one checkpoint takes at most: the trainable weights in fp32 (LoRA adapters and full fine-tuning's
    masters alike), AdamW's two fp32 moments beside them, and a MiB for the RNG, the schedule and state.json; a
    tenth more for the filesystem's own blocks."""
    n = sum(p.numel() for p in named_weights(model).values())
    return int((12 * n + (1 << 20)) * 1.1)


def _write(target: Path, model, optimizer, scheduler, scaler, state: dict[str, Any], step: int,
           rng: dict[str, Any], py_state, objective: dict[str, Any] | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    with atomic_dir(target) as tmp:
        trainable = {n: p.detach().cpu().contiguous() for n, p in named_weights(model).items()}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}, tmp / "optim.pt")
        torch.save(rng, tmp / "rng.pt")
        if objective:
            torch.save(objective, tmp / "objective.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step,
                                                    "python_random": [py_state[0], list(py_state[1]), py_state[2]]}))


def load(path: Path, model, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore in place; returns state.json. Parameter names must match (same config)."""
    import torch
    from safetensors.torch import load_file

    from hwcompat.errors import InputError

    weights = load_file(str(path / "trainable.safetensors"))
    params = named_weights(model) if isinstance(model, dict) else dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise InputError(f"checkpoint {path} does not match this model/LoRA config (e.g. {missing[0]}); "
                         "resume with the run's own config.yaml")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    optim = torch.load(path / "optim.pt", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    if scaler is not None and optim["scaler"] is not None:
        scaler.load_state_dict(optim["scaler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "xpu" in rng and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.set_rng_state_all(rng["xpu"])
    state = json.loads((path / "state.json").read_text())
    if (path / "objective.pt").is_file():
        state["objective"] = torch.load(path / "objective.pt", weights_only=True)
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))
    return state
