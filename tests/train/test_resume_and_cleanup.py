"""#22: the run folder removes only what hwcompat wrote, a resume continues only the same training, and a damaged
log or checkpoint falls back to the last good state with the file named."""

import json
import os
import shutil

import pytest

from hwcompat.errors import InputError
from hwcompat.train.rundir import LEDGER, open_run_dir
from tests import cli
from tests.train.conftest import make_config


def _cfg(run, **kw):
    from hwcompat.train.config import TrainConfig

    d = TrainConfig(model="/m", train_data=["/t.jsonl"], output_dir=str(run)).to_dict()
    d.update(kw)
    return d


# --- 8. only what hwcompat's ledger lists is ever removed ---------------------------------------------------------

def _failed_run(run):
    """A folder whose run failed before its first checkpoint: hwcompat's records, with their ledger."""
    lock = open_run_dir(str(run), _cfg(run), False, False).lock
    for name in ("run.json", "config.yaml", "profile.json", "devices.json"):
        (run / name).write_text("{}")
    from hwcompat.fsutil import record_written

    record_written(run, "run.json", "config.yaml", "profile.json", "devices.json")
    lock.release()


def _users_files(run):
    (run / "model.Modelfile").write_text("FROM mine\n")
    (run / "model.gguf").write_bytes(b"GGUF mine")
    (run / "merged").mkdir()
    (run / "merged" / "weights").write_text("mine")


def test_a_rerun_over_a_failed_run_keeps_the_users_own_files(tmp_path):
    run = tmp_path / "run"
    _failed_run(run)
    _users_files(run)
    out = open_run_dir(str(run), _cfg(run), False, False)
    out.lock.release()
    assert "starting over" in " ".join(out.notes)
    assert not (run / "run.json").exists()  # hwcompat's own record was cleared
    assert (run / "model.Modelfile").read_text() == "FROM mine\n" and (run / "model.gguf").read_bytes() == b"GGUF mine"
    assert (run / "merged" / "weights").read_text() == "mine"


def test_overwrite_removes_only_the_ledgers_names(tmp_path):
    run = tmp_path / "run"
    _failed_run(run)
    (run / "adapter").mkdir()
    (run / "summary.json").write_text('{"steps": 3}')
    from hwcompat.fsutil import record_written

    record_written(run, "adapter", "summary.json")
    _users_files(run)
    out = open_run_dir(str(run), _cfg(run), False, True)
    out.lock.release()
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert (run / "model.Modelfile").exists() and (run / "model.gguf").exists() and (run / "merged").exists()


def test_an_export_run_refuses_a_folder_with_a_handwritten_modelfile(tmp_path):
    from hwcompat.train.rundir import EXPORTS, RECORDS, RESULTS

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.Modelfile").write_text("FROM mine\n")
    with pytest.raises(InputError, match=r"holds model.Modelfile, which hwcompat did not write"):
        open_run_dir(str(run), _cfg(run, export="gguf"), False, True, RECORDS + RESULTS + EXPORTS)
    assert (run / "model.Modelfile").read_text() == "FROM mine\n"


def test_a_run_folder_from_before_the_ledger_still_resumes_and_keeps_exports(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000004").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": _cfg(run)}))
    (run / "config.yaml").write_text("model: /m\n")
    (run / "model.Modelfile").write_text("FROM mine\n")
    assert not (run / LEDGER).exists()
    out = open_run_dir(str(run), _cfg(run), False, True)
    out.lock.release()
    assert not (run / "run.json").exists() and not (run / "checkpoints").exists()
    assert (run / "model.Modelfile").read_text() == "FROM mine\n"


# --- 9. a run folder never overwrites the config it was started from ------------------------------------------------

def test_output_dir_dot_never_replaces_the_users_config(tmp_path, tiny_model, task_files):
    import yaml

    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=2, output_dir=".")
    before = cfg.read_bytes()
    res = cli.run("train", "config.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "holds config.yaml, which hwcompat did not write" in res.stderr, res.stderr[-2000:]
    assert cfg.read_bytes() == before and yaml.safe_load(before)["output_dir"] == "."
    assert not (tmp_path / "run.json").exists()


def test_the_demo_never_clears_a_users_run_in_its_default_folder(tmp_path):
    from hwcompat.cli.demo import _demo_owns

    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"origins": {"train_data": "config file"}}))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not _demo_owns("runs/demo")
        (run / "run.json").write_text(json.dumps({"origins": {"train_data": "demo"}}))
        assert _demo_owns("runs/demo")
    finally:
        os.chdir(cwd)


# --- 13. a resume continues only the same training ----------------------------------------------------------------

@pytest.fixture
def checkpointed(tmp_path, tiny_model, task_files):
    """A 2-step run that stopped with a checkpoint at step 2 (its adapter and summary removed)."""
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=4, checkpoint_every=2, eval_metrics="none",
                      eval_at_start=False)
    res = cli.train(cfg)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-0000004", ignore_errors=True)
    return run


def _files(run):
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".hwcompat.lock"}


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(checkpointed):
    before = _files(checkpointed)
    res = cli.train(checkpointed / "config.yaml", "--resume", "--devices", "2")
    assert res.returncode == 2 and "the number of processes: the run was trained with 1" in res.stderr, res.stderr
    assert "--devices 1" in res.stderr and _files(checkpointed) == before


@pytest.mark.slow
def test_resume_after_the_data_changed_in_place_is_refused(checkpointed, task_files):
    train, _ = task_files
    with open(train, "a") as fh:
        fh.write(json.dumps({"prompt": "new?", "completion": "row"}) + "\n")
    before = _files(checkpointed)
    res = cli.train(checkpointed / "config.yaml", "--resume")
    assert res.returncode == 2 and f"the content of {train}" in res.stderr, res.stderr[-2000:]
    assert _files(checkpointed) == before
    res = cli.train(checkpointed / "config.yaml", "--resume", "force=true")
    assert res.returncode == 0, res.stderr[-2000:]
    resumes = json.loads((checkpointed / "run.json").read_text())["resumes"]
    assert any(f"the content of {train}" in x for r in resumes for x in r.get("inputs_changed", []))


@pytest.mark.slow
def test_resume_after_the_base_weights_changed_is_refused(checkpointed, tiny_model, tmp_path):
    import json as _json

    model = _json.loads((checkpointed / "run.json").read_text())["config"]["model"]
    copy = tmp_path / "model-copy"
    shutil.copytree(model, copy)
    spec = _json.loads((checkpointed / "run.json").read_text())
    spec["inputs"]["base"] = "0" * 32  # as if the weights at the path had been replaced by another model
    (checkpointed / "run.json").write_text(_json.dumps(spec))
    res = cli.train(checkpointed / "config.yaml", "--resume")
    assert res.returncode == 2 and "the base model's weights or config.json changed" in res.stderr, res.stderr[-2000:]


def test_weights_digest_tells_models_apart_and_is_stable(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from hwcompat.fingerprint import weights_digest

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert weights_digest(copy) == weights_digest(tiny_model) != ""
    tensors = load_file(str(copy / "model.safetensors"))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1  # same shapes, other weights: a different fine-tune
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert weights_digest(copy) != weights_digest(tiny_model)


def test_weights_digest_samples_a_large_shard(tiny_model, tmp_path, monkeypatch):
    """Above the whole-file size, 64 samples of the tensor bytes: another fine-tune (every weight moved) differs."""
    from safetensors.torch import load_file, save_file

    from hwcompat import fingerprint

    monkeypatch.setattr(fingerprint, "WHOLE_BELOW", 0)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    same = fingerprint.weights_digest(copy)
    assert same == fingerprint.weights_digest(tiny_model)
    tensors = {k: v * 1.01 for k, v in load_file(str(copy / "model.safetensors")).items()}
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert fingerprint.weights_digest(copy) != same


# --- 14. a damaged log or checkpoint: the file named, the last good state used ---------------------------------------

@pytest.mark.slow
def test_a_torn_metrics_line_does_not_break_resume(checkpointed):
    with open(checkpointed / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "kind": "tra\n\n')
    res = cli.train(checkpointed / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dropped 2 torn or blank line(s)" in res.stderr
    steps = [json.loads(x)["step"] for x in (checkpointed / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncate trainable.safetensors", "empty optim.pt", "bad state.json",
                                    "missing rng.pt", "garbage optim.pt"])
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_model, task_files, damage):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=6, checkpoint_every=2, keep_checkpoints=3,
                      eval_metrics="none", eval_at_start=False)
    assert cli.train(cfg).returncode == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    newest = run / "checkpoints" / "step-0000004"
    verb, name = damage.split(" ")
    f = newest / name
    if verb == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif verb == "empty":
        f.write_bytes(b"")
    elif verb == "bad":
        f.write_text('{"step": ')
    elif verb == "missing":
        f.unlink()
    else:
        f.write_bytes(b"PK\x03\x04 not a torch file" * 10)
    res = cli.train(run / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step-0000004" in res.stderr and "at step 2/6" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_every_checkpoint_damaged_is_a_clear_error_and_changes_nothing(checkpointed):
    (checkpointed / "checkpoints" / "step-0000002" / "state.json").write_text("{")
    before = _files(checkpointed)
    res = cli.train(checkpointed / "config.yaml", "--resume")
    assert res.returncode == 2 and "no usable checkpoint" in res.stderr and "state.json" in res.stderr, res.stderr
    assert _files(checkpointed) == before


# --- #27 (newcomer): weights follow the user's umask like every other output ------------------------------------

@pytest.mark.slow
def test_adapter_and_checkpoint_files_follow_the_umask(checkpointed):
    """safetensors writes 0600; under umask 022 every file hwcompat writes is 0644 (checked on a real run)."""
    import stat

    old = os.umask(0o022)
    try:
        res = cli.train(checkpointed / "config.yaml", "--resume")
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr[-2000:]
    files = [checkpointed / "adapter" / "adapter_model.safetensors",
             *sorted((checkpointed / "checkpoints").glob("step-*/trainable.safetensors"))]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))
