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
from hwcompat import envvars

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


def child_env(names: list[str], run_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The variables the trackers' libraries read at import, for the training process: local stores in the run
    folder and W&B offline, each only where the user has not set it (their environment wins)."""
    out: dict[str, str] = {}
    if "trackio" in names and "TRACKIO_DIR" not in env:
        out["TRACKIO_DIR"] = str(run_dir / "trackio")
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in env:
        out["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").as_uri()
    if "mlflow" in names and "MLFLOW_ALLOW_FILE_STORE" not in env and _mlflow_folder(
            env.get("MLFLOW_TRACKING_URI", out.get("MLFLOW_TRACKING_URI", ""))) is not None:
        out["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3's file store is in maintenance, not gone: no server needed
    if "wandb" in names and "WANDB_MODE" not in env:
        out["WANDB_MODE"] = "offline"
    return out


#: WANDB_MODE's values (wandb's Settings.mode): "dryrun" is offline and "run" online, from older releases.
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
#: Characters W&B refuses in a project name, and its length limit (wandb/sdk/wandb_settings.py, validate_project).
WANDB_PROJECT_BAD, WANDB_PROJECT_MAX = "/\\#?%:", 128
#: MLflow stores mlflow-skinny can write without more packages; the SQL ones need SQLAlchemy (full mlflow).
MLFLOW_SQL = ("sqlite", "postgresql", "mysql", "mssql")


def check_settings(names: list[str], run_dir: Path, env: Mapping[str, str], resume: bool) -> None:
    """Before the data and the model load, not as a library traceback minutes later: each tracker's settings in
    the user's environment can work (a store that can be written or reached, a W&B mode that exists and a key
    for online, a project name W&B takes), and a resume finds its MLflow run in the store it names."""
    if "trackio" in names and "TRACKIO_DIR" in env:
        _check_writable("TRACKIO_DIR", Path(env["TRACKIO_DIR"]))
    if "mlflow" in names:
        _check_mlflow(run_dir, env, resume)
    if "wandb" in names:
        _check_wandb(env)


def _check_writable(var: str, folder: Path) -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{var}={folder}: {existing} is {'not a folder' if not existing.is_dir() else 'not writable'}"
                         f", so the tracker could store nothing; point {var} at a writable folder, or unset it to "
                         "store in the run folder")


def _mlflow_folder(uri: str) -> Path | None:
    """The folder of a file-store URI (``file:///x`` or a plain path, as MLflow takes both); None for others."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if uri and not parsed.scheme else None


def _check_mlflow(run_dir: Path, env: Mapping[str, str], resume: bool) -> None:
    from urllib.parse import urlparse

    if "MLFLOW_TRACKING_URI" not in env:
        return
    uri = env["MLFLOW_TRACKING_URI"].strip()
    where = f"MLFLOW_TRACKING_URI={uri!r}"
    scheme = urlparse(uri).scheme
    folder = _mlflow_folder(uri)
    if not uri:
        raise InputError(f"{where}: empty; unset it to log into the run folder's mlruns/, or give a store "
                         "(file:///path, http://host:5000)")
    if folder is not None:
        _check_writable("MLFLOW_TRACKING_URI", folder)
        run_id = _state(run_dir).get("mlflow_run_id") if resume else None
        if run_id and not any(folder.glob(f"*/{run_id}/meta.yaml")):
            raise InputError(f"--resume: {where} does not hold this run's MLflow run {run_id} (trackers.json): the "
                             "store moved? Point MLFLOW_TRACKING_URI at the store the run started in, or remove "
                             "mlflow from report_to")
    elif scheme in ("http", "https"):
        _reachable(uri, where)
    elif scheme in MLFLOW_SQL:
        import importlib.util

        if importlib.util.find_spec("sqlalchemy") is None:
            raise InputError(f"{where}: a {scheme} store needs the full mlflow package (mlflow-skinny has no SQL "
                             "store): pip install mlflow; or use a file store (file:///path) or a server")
    elif scheme not in ("databricks", "databricks-uc"):
        raise InputError(f"{where}: not a store MLflow knows (file:///path, http(s)://host:port, databricks, "
                         f"{', '.join(MLFLOW_SQL)}); unset it to log into the run folder's mlruns/")


def _reachable(uri: str, where: str, timeout: float = 5.0) -> None:
    """A TCP connection to the server, in seconds at most: MLflow itself retries for minutes, then fails."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(uri)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"{where}: the port is not a number") from None
    if not u.hostname:
        raise InputError(f"{where}: no host in it; write http://host:5000")
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"{where}: cannot reach {u.hostname}:{port} ({exc.strerror or exc}); start the server, "
                         "or unset MLFLOW_TRACKING_URI to log into the run folder's mlruns/") from None


def _check_wandb(env: Mapping[str, str]) -> None:
    mode = env.get("WANDB_MODE", "offline")
    if mode not in WANDB_MODES:
        raise InputError(f"WANDB_MODE={mode!r}: not a W&B mode; use one of {', '.join(WANDB_MODES[:3])} "
                         "(unset: offline, in the run folder)")
    if mode in ("online", "shared", "run") and not env.get("WANDB_API_KEY") and not _netrc_key(env):
        raise InputError(f"WANDB_MODE={mode}: no W&B key (WANDB_API_KEY, or `wandb login`'s ~/.netrc entry); log in, "
                         "or set WANDB_MODE=offline and `wandb sync` the run later")
    project = env.get("WANDB_PROJECT")
    if project is not None and (not project or len(project) > WANDB_PROJECT_MAX
                                or any(c in project for c in WANDB_PROJECT_BAD)):
        raise InputError(f"WANDB_PROJECT={project!r}: W&B takes a project name of 1-{WANDB_PROJECT_MAX} characters "
                         f"without {' '.join(WANDB_PROJECT_BAD)}; for a team, set WANDB_ENTITY=team and "
                         "WANDB_PROJECT=name")


def _netrc_key(env: Mapping[str, str]) -> bool:
    import netrc
    from urllib.parse import urlparse

    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(env.get("HOME", os.path.expanduser("~")), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


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
        if not state and (run_dir / STATE).exists():
            say(f"warning: {run_dir / STATE} is damaged, so the trackers' run ids are lost: each starts a new run "
                "(this resumed run shows as two in each tracker)")
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
        mlflow.set_experiment(envvars.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
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
        self.project = envvars.get("TRACKIO_PROJECT") or PROJECT
        self.run = trackio.init(project=self.project, name=state["trackio_run"], config=params, resume="allow",
                                auto_log_gpu=False, auto_log_cpu=False)

    def where(self) -> str:
        from trackio.utils import TRACKIO_DIR

        return (f"run {self.run.name} of project {self.project} in {TRACKIO_DIR} "
                f"(TRACKIO_DIR={shlex.quote(str(TRACKIO_DIR))} trackio show --project {shlex.quote(self.project)})")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.log({f"summary/{k}": v for k, v in values.items()})

    def close(self) -> None:
        self.trackio.finish()


class _WandB:
    def __init__(self, run_dir: Path, params: dict[str, Any], start_step: int, state: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=envvars.get("WANDB_PROJECT") or PROJECT, name=run_dir.name,
                              id=state.get("wandb_run_id"), resume="allow", dir=str(run_dir), config=params)
        state["wandb_run_id"] = self.run.id

    def where(self) -> str:
        mode = envvars.get("WANDB_MODE", default=self.run.settings.mode)
        if mode == "disabled":
            return "disabled (WANDB_MODE=disabled): nothing is logged to W&B"
        if mode not in ("offline", "dryrun"):
            return f"run {self.run.id} ({mode}) at {self.run.url or 'W&B'}"
        # one offline folder per session: a resumed run's sync needs every one of them, not this session's only
        here = Path(self.run.dir).parent
        sessions = sorted(here.parent.glob(f"offline-run-*-{self.run.id}")) or [here]
        return (f"run {self.run.id} (offline) in {here.parent} (upload later: wandb sync "
                f"{' '.join(shlex.quote(str(p)) for p in sessions)})")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "trackio": _Trackio, "wandb": _WandB}
