"""#27: report_to — TensorBoard, Trackio, MLflow and W&B, offline in the run folder, read back with each library's own
reader, across a SIGTERM and a --resume (one curve in each, not two)."""

import json
import os
import shlex
import struct

import pytest

from hwcompat.train import trackers

ALL = ["tensorboard", "trackio", "mlflow", "wandb"]


def same(got, expected):
    """(step, value) pairs: the same steps, in order, and values equal to float32 precision."""
    return [s for s, _ in got] == [s for s, _ in expected] and all(
        abs(a - b) <= 1e-5 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, expected))


def _tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(run, run_id):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").as_uri())
    exp = client.get_experiment_by_name("hwcompat")
    runs = client.search_runs([exp.experiment_id])
    hist = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in ("train/loss", "eval/loss")}
    return runs, hist, client.get_run(run_id).data.params


def _trackio(run):
    """Trackio's own store reader; it reads TRACKIO_DIR when imported, so in a process of its own."""
    import subprocess
    import sys

    code = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_runs('hwcompat'), S.get_logs('hwcompat', 'run')], default=str))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "TRACKIO_DIR": str(run / "trackio")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wandb_records(path):
    """W&B's offline run file (its LevelDB-style log: 32 KiB blocks of crc32, length, type records) decoded with
    wandb's own protobuf schema; wandb 0.2x has no Python reader for it any more (its Go core reads it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _key(item):
    return item.key or "/".join(item.nested_key)  # wandb writes "train/loss" as the nested key [train, loss]


def _wandb(run):
    runs = {}
    for f in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                runs.setdefault(rec.run.run_id, {"files": 0, "history": [], "config": {}})["files"] += 1
                current = runs[rec.run.run_id]
                current["config"].update({_key(i): json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                current["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
    return runs


@pytest.mark.slow
def test_all_four_trackers_read_back_and_a_resumed_run_is_one_curve(tmp_path, tiny_model, task_files, run_cli):
    from tests.train.conftest import make_config, sigterm_site

    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=8, eval_every=4, eval_metrics="exact",
                      report_to=ALL)
    site = sigterm_site(tmp_path / "site")
    first = run_cli("train", str(cfg), env={"PYTHONPATH": str(site), "TEST_SIGTERM_AT_STEP": "5"}, timeout=600)
    assert first.returncode == 143, first.stderr[-3000:]
    run = tmp_path / "run"
    again = run_cli("train", str(run / "config.yaml"), "--resume", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for out in (first, again):  # one plain line each, no library banner or colour in the log
        assert "\x1b" not in out.stderr + out.stdout and "Trackio project initialized" not in out.stdout
        assert "tensorboard: " in out.stderr and "wandb: run " in out.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    assert [s for s, _ in losses] == list(range(1, 9)) and [s for s, _ in evals] == [0, 4, 8]
    ids = json.loads((run / "trackers.json").read_text())

    tb = _tensorboard(run)
    assert same(tb["train/loss"], losses) and same(tb["eval/loss"], evals), (tb["train/loss"], tb["eval/loss"])
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/memory_gib",
            "eval/exact_match"} <= set(tb)

    runs, hist, params = _mlflow(run, ids["mlflow_run_id"])
    assert len(runs) == 1  # the resume continued the run, it did not start a second one
    assert same(hist["train/loss"], losses) and same(hist["eval/loss"], evals), hist
    assert params["config/lora_r"] == "16" and params["profile/name"] == "cpu"

    names, logs = _trackio(run)
    assert names == ["run"]
    got = [(x["step"], x["train/loss"]) for x in logs if "train/loss" in x]
    assert same(got, losses), got

    wb = _wandb(run)
    assert list(wb) == [ids["wandb_run_id"]] and wb[ids["wandb_run_id"]]["files"] == 2  # one run id, two sessions
    hist = [(h["_step"], h["train/loss"]) for h in wb[ids["wandb_run_id"]]["history"] if "train/loss" in h]
    assert same(hist, losses), hist
    assert wb[ids["wandb_run_id"]]["config"]["config/lora_r"] == 16
    # the printed TensorBoard command, run as printed but with --inspect (which reads the files and exits)
    board = next(line for line in again.stderr.splitlines() if line.startswith("tensorboard: "))
    argv = shlex.split(board.split("(", 1)[1].rstrip(")"))
    import subprocess

    seen = subprocess.run([*argv, "--inspect"], capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0 and "train/loss" in seen.stdout + seen.stderr, seen.stderr[-1000:]
    sync = next(line for line in again.stderr.splitlines() if line.startswith("wandb: run "))
    argv = shlex.split(sync.split("upload later: ", 1)[1].rstrip(")"))
    # #35 family 9: both sessions' folders, not the second half only
    assert argv[:2] == ["wandb", "sync"] and len(argv) == 4 and all(os.path.isdir(a) for a in argv[2:]), argv
    # the printed trackio command names its store: run as printed, it finds the project
    show = next(line for line in again.stderr.splitlines() if line.startswith("trackio: "))
    assert f"TRACKIO_DIR={run / 'trackio'} trackio show --project hwcompat" in show


def test_a_missing_tracker_is_refused_before_training_with_the_install_line(monkeypatch):
    import importlib.util

    from hwcompat.errors import InputError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("wandb", "mlflow") else real(n, *a))
    with pytest.raises(InputError) as e:
        trackers.check_installed(["tensorboard", "mlflow", "wandb"])
    assert str(e.value) == ("report_to: mlflow-skinny, wandb not installed; pip install mlflow-skinny wandb (or pip "
                            "install 'hwcompat[track]' for all four), or remove them from report_to")
    from packaging.requirements import Requirement

    for req in ("mlflow-skinny", "wandb", "hwcompat[track]"):
        Requirement(req)


def test_an_unknown_tracker_names_the_four(tmp_path, run_cli):
    (tmp_path / "c.yaml").write_text("model: m\ntrain_data: [t.jsonl]\nreport_to: [tensorbord]\n")
    res = run_cli("train", str(tmp_path / "c.yaml"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "report_to: 'tensorbord' is not a tracker; use any of tensorboard, trackio, mlflow, wandb" in res.stderr


def test_the_users_own_tracker_settings_win_and_wandb_is_offline_by_default(tmp_path):
    env = trackers.child_env(ALL, tmp_path, {})
    assert env["WANDB_MODE"] == "offline" and env["TRACKIO_DIR"] == str(tmp_path / "trackio")
    assert env["MLFLOW_TRACKING_URI"] == (tmp_path / "mlruns").as_uri()
    mine = {"WANDB_MODE": "online", "TRACKIO_DIR": "/srv/trackio", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert trackers.child_env(ALL, tmp_path, mine) == {}
    assert trackers.child_env([], tmp_path, {}) == {}



# --- #35 family 1: the user's own tracker folders are refused, never adopted, never deleted ---------------------

@pytest.mark.parametrize("tracker,folder", [("mlflow", "mlruns"), ("wandb", "wandb"), ("tensorboard", "tensorboard"),
                                            ("trackio", "trackio")])
def test_a_users_own_tracker_folder_in_output_dir_is_refused(tmp_path, tiny_model, task_files, run_cli, tracker,
                                                             folder):
    from tests.train.conftest import make_config

    theirs = tmp_path / "run" / folder / "their-experiment"
    theirs.mkdir(parents=True)
    (theirs / "results.txt").write_text("a month of work")
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=1, report_to=[tracker])
    for extra in ([], ["--overwrite"]):
        res = run_cli("train", str(cfg), *extra, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert f"holds {folder}, which hwcompat did not write" in res.stderr
    assert (theirs / "results.txt").read_text() == "a month of work"
    assert not (tmp_path / "run" / "run.json").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_tracker_folder_elsewhere_leaves_the_users_folder_alone(tmp_path, tiny_model, task_files, run_cli):
    """MLFLOW_TRACKING_URI set: hwcompat writes no mlruns/ in the run folder, so the user's is neither refused
    nor recorded as hwcompat's, and an --overwrite leaves it."""
    from tests.train.conftest import make_config

    theirs = tmp_path / "run" / "mlruns"
    theirs.mkdir(parents=True)
    (theirs / "keep.txt").write_text("theirs")
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=1, report_to=["mlflow"], eval_at_start=False)
    env = {"MLFLOW_TRACKING_URI": (tmp_path / "store").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    for extra in ([], ["--overwrite"]):
        res = run_cli("train", str(cfg), *extra, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    assert (theirs / "keep.txt").read_text() == "theirs"
    assert "mlruns" not in json.loads((tmp_path / "run" / ".hwcompat-outputs.json").read_text())["written"]


# --- #35 families 9 and 13: tracker settings that cannot work are refused before the data and the model load ------

@pytest.mark.parametrize("env,message", [
    ({"MLFLOW_TRACKING_URI": ""}, "MLFLOW_TRACKING_URI='': empty"),
    ({"MLFLOW_TRACKING_URI": "bogus://x"}, "not a store MLflow knows"),
    ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "cannot reach 127.0.0.1:9"),
    ({"MLFLOW_TRACKING_URI": "file://FILE/mlruns"}, "is not a folder, so the tracker could store nothing"),
    ({"WANDB_MODE": "ofline"}, "WANDB_MODE='ofline': not a W&B mode; use one of online, offline, disabled"),
    ({"WANDB_MODE": "online", "HOME": "/nonexistent"}, "WANDB_MODE=online: no W&B key"),
    ({"WANDB_PROJECT": "team/project"}, "WANDB_PROJECT='team/project': W&B takes a project name"),
    ({"TRACKIO_DIR": "FILE/trackio"}, "TRACKIO_DIR=FILE/trackio: FILE is not a folder"),
])
def test_tracker_settings_that_cannot_work_are_refused_in_one_line(tmp_path, env, message):
    from hwcompat.errors import InputError

    (tmp_path / "a-file").write_text("x")  # a store under a file: no user, root included, can write there
    env = {k: v.replace("FILE", str(tmp_path / "a-file")) for k, v in env.items()}
    message = message.replace("FILE", str(tmp_path / "a-file"))

    with pytest.raises(InputError) as e:
        trackers.check_settings(ALL, tmp_path / "run", env, resume=False)
    assert message in str(e.value), str(e.value)


def test_tracker_settings_that_work_pass(tmp_path):
    ok = {"MLFLOW_TRACKING_URI": (tmp_path / "store").as_uri(), "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40,
          "WANDB_PROJECT": "tickets", "TRACKIO_DIR": str(tmp_path / "t" / "deeper")}
    trackers.check_settings(ALL, tmp_path / "run", ok, resume=False)
    trackers.check_settings(ALL, tmp_path / "run", {}, resume=False)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    trackers.check_settings(["wandb"], tmp_path / "run", {"WANDB_MODE": "online", "HOME": str(tmp_path)}, False)


def test_the_users_own_file_store_gets_the_opt_in_mlflow_3_needs(tmp_path):
    env = trackers.child_env(["mlflow"], tmp_path, {"MLFLOW_TRACKING_URI": (tmp_path / "mine").as_uri()})
    assert env == {"MLFLOW_ALLOW_FILE_STORE": "true"}
    assert trackers.child_env(["mlflow"], tmp_path, {"MLFLOW_TRACKING_URI": "http://h:5000"}) == {}


def test_a_resume_whose_mlflow_store_moved_is_refused(tmp_path):
    from hwcompat.errors import InputError

    run = tmp_path / "run"
    run.mkdir()
    (run / "trackers.json").write_text(json.dumps({"mlflow_run_id": "abc123"}))
    store = tmp_path / "elsewhere"
    with pytest.raises(InputError, match="does not hold this run's MLflow run abc123"):
        trackers.check_settings(["mlflow"], run, {"MLFLOW_TRACKING_URI": store.as_uri()}, resume=True)
    (store / "0" / "abc123").mkdir(parents=True)
    (store / "0" / "abc123" / "meta.yaml").write_text("run_id: abc123\n")
    trackers.check_settings(["mlflow"], run, {"MLFLOW_TRACKING_URI": store.as_uri()}, resume=True)


def test_a_bad_tracker_setting_stops_train_before_the_data_checks(tmp_path, run_cli):
    (tmp_path / "c.yaml").write_text("model: m\ntrain_data: [missing.jsonl]\nreport_to: [wandb]\n")
    res = run_cli("train", str(tmp_path / "c.yaml"), env={"WANDB_MODE": "onlin"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "WANDB_MODE='onlin': not a W&B mode" in res.stderr and "missing.jsonl" not in res.stderr


def test_wandb_disabled_says_nothing_is_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    said = []
    trackers.Trackers.open(["wandb"], tmp_path, {}, 0, say=said.append).close()
    assert said == ["wandb: disabled (WANDB_MODE=disabled): nothing is logged to W&B"]
    assert not (tmp_path / "wandb").exists()


def test_a_torn_trackers_json_is_said(tmp_path, monkeypatch):
    (tmp_path / "trackers.json").write_text('{"mlflow_run_id": "ab')
    monkeypatch.setenv("WANDB_MODE", "disabled")
    said = []
    trackers.Trackers.open(["wandb"], tmp_path, {}, 5, say=said.append).close()
    assert any("trackers.json is damaged" in m and "starts a new run" in m for m in said), said
