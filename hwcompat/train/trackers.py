"""Experiment trackers, offline first: ``report_to: [tensorboard, trackio, mlflow, wandb]``.

Each through that project's own writer, nothing sent over a network unless the user's environment says so:
TensorBoard event files in ``RUN/tensorboard``; Trackio's local store in ``RUN/trackio`` (or the user's
``TRACKIO_DIR``); MLflow's file store in ``RUN/mlruns`` (or the user's ``MLFLOW_TRACKING_URI``); W&B in offline
mode in ``RUN/wandb`` (unless ``WANDB_MODE`` is set). A resume continues the same run in each (the ids are kept in
``RUN/trackers.json``; TensorBoard purges what a crash logged past the checkpoint), so a resumed run is one curve.
The packages are optional (``hwcompat[track]``); a missing one is refused before training, with the install line.
Only the writer process logs. Torch is imported only by TensorBoard's writer, inside ``open``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from pathlib import Path
from typing import Any, Mapping

from hwcompat.choices import TRACKERS
from hwcompat.errors import InputError

#: tracker -> (the module it needs, the PyPI package that has it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
            "mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}
PROJECT = "hwcompat"  # the project / experiment name unless the user's environment names one
STATE = "trackers.json"


#: tracker -> the folder its library writes in the run folder (theirs, on our behalf: the ledger lists them)
FOLDERS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "trackio": "trackio", "wandb": "wandb"}
#: tracker -> the variable that moves its store out of the run folder
ELSEWHERE = {"mlflow": "MLFLOW_TRACKING_URI", "trackio": "TRACKIO_DIR"}


def run_folders(names: list[str], run_dir: Path, env: Mapping[str, str]) -> tuple[str, ...]:
    """The names the trackers asked for write in the run folder, given the environment (the user's, or the
    training process's, where ``child_env`` set our own stores): a user's own folder at one of these names is
    refused like any other name hwcompat would write (``rundir.refuse_foreign``), never adopted."""
    ours = child_env(list(names), run_dir, {})

    def here(name: str) -> bool:
        var = ELSEWHERE.get(name)
        return var is None or env.get(var, ours[var]) == ours[var]

    return tuple(FOLDERS[n] for n in TRACKERS if n in names and here(n)) + ((STATE,) if names else ())


def check_installed(names: list[str]) -> None:
    """Before training: every tracker asked for is installed, else one error with the command that installs them."""
    missing = [PACKAGES[n][1] for n in names if importlib.util.find_spec(PACKAGES[n][0]) is None]
    if missing:
        raise InputError(f"report_to: {', '.join(missing)} not installed; pip install {' '.join(missing)} (or "
                         "pip install 'hwcompat[track]' for all four), or remove them from report_to")


def child_env(names: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """The variables the trackers' libraries read at import, for the training process: local stores in the run
    folder and W&B offline, each only where the user has not set it (their environment wins)."""
    out: dict[str, str] = {}
    if "trackio" in names and "TRACKIO_DIR" not in env:
        out["TRACKIO_DIR"] = str(run_dir / "trackio")
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in env:
        out["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").as_uri()
        out["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3's file store is in maintenance, not gone: no server needed
    if "wandb" in names and "WANDB_MODE" not in env:
        out["WANDB_MODE"] = "offline"
    return out


def flat_params(config: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """The resolved config and profile as one flat mapping of scalars (lists and mappings as JSON text)."""
    def scalar(v: Any) -> Any:
        return v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, sort_keys=True)

    return {**{f"config/{k}": scalar(v) for k, v in config.items()},
            **{f"profile/{k}": scalar(v) for k, v in profile.items()}}


class Trackers:
    """The trackers of one run; ``log(step, values)``, ``summary(values)``, ``close()``. Empty: does nothing."""

    def __init__(self, writers: list[Any] | None = None) -> None:
        self.writers = writers or []

    @classmethod
    def open(cls, names: list[str], run_dir: Path, params: dict[str, Any], start_step: int,
             say=print) -> "Trackers":
        """Each library's own chatter (banners, colours, sparklines) is held back; one plain line says where each
        tracker writes and how to look at it."""
        state = _state(run_dir)
        writers = []
        for name in (n for n in TRACKERS if n in names):
            with quiet():
                writers.append(OPENERS[name](run_dir, params, start_step, state))
            say(f"{name}: {writers[-1].where()}")
        _save_state(run_dir, state)
        return cls(writers)

    def log(self, step: int, values: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for w in self.writers:
            w.log(step, numbers)

    def summary(self, values: dict[str, Any]) -> None:
        for w in self.writers:
            w.summary({k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            with quiet():
                w.close()


def quiet():
    """The libraries print banners to stdout and stderr (Trackio in colour); a run's log keeps ours only."""
    import contextlib
    import io

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    from hwcompat.fsutil import atomic_write_json, record_written

    atomic_write_json(run_dir / STATE, state)
    record_written(run_dir, STATE)


class _TensorBoard:
    def __init__(self, run_dir: Path, params: dict[str, Any], start_step: int, state: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: steps a crash logged after the last checkpoint are hidden, so the resumed curve is one line
        self.w = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.w.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def where(self) -> str:
        return f"{self.w.log_dir} (tensorboard --logdir {shlex.quote(self.w.log_dir)})"

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def summary(self, values: dict[str, float]) -> None:
        self.w.add_text("summary", "\n".join(f"    {k}: {v:.4f}" for k, v in values.items()))

    def close(self) -> None:
        self.w.close()


class _MLflow:
    def __init__(self, run_dir: Path, params: dict[str, Any], start_step: int, state: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
        run = mlflow.start_run(run_id=state.get("mlflow_run_id"), run_name=run_dir.name)
        state["mlflow_run_id"] = self.run_id = run.info.run_id
        if not start_step:
            mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def where(self) -> str:
        uri = self.mlflow.get_tracking_uri()
        return f"run {self.run_id} in {uri} (mlflow ui --backend-store-uri {shlex.quote(uri)})"

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"summary/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, run_dir: Path, params: dict[str, Any], start_step: int, state: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        state["trackio_run"] = state.get("trackio_run") or run_dir.name
        self.project = os.environ.get("TRACKIO_PROJECT") or PROJECT
        self.run = trackio.init(project=self.project, name=state["trackio_run"], config=params, resume="allow",
                                auto_log_gpu=False, auto_log_cpu=False)

    def where(self) -> str:
        from trackio.utils import TRACKIO_DIR

        return (f"run {self.run.name} of project {self.project} in {TRACKIO_DIR} "
                f"(trackio show --project {shlex.quote(self.project)})")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.log({f"summary/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self.trackio.finish()


class _WandB:
    def __init__(self, run_dir: Path, params: dict[str, Any], start_step: int, state: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_dir.name,
                              id=state.get("wandb_run_id"), resume="allow", dir=str(run_dir), config=params)
        state["wandb_run_id"] = self.run.id

    def where(self) -> str:
        offline = self.run.settings.mode == "offline"
        return (f"run {self.run.id} ({'offline' if offline else self.run.settings.mode}) in {Path(self.run.dir).parent}"
                + (f" (upload later: wandb sync {shlex.quote(str(Path(self.run.dir).parent))})" if offline else ""))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "trackio": _Trackio, "wandb": _WandB}
