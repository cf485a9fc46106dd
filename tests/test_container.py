"""#40 §1: the container contract (hwcompat/container.py): the exact `docker run` per card, where a relative
output_dir lands in an image, one clear line for an unwritable output mount, and the offline build's commands."""

import os
import shlex

import pytest

from tests import cli
import yaml

from hwcompat import container
from hwcompat.errors import InputError


def _run_line(*args):
    res = cli.run("images", "run", *args)
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.strip().splitlines()
    return shlex.split(line), res.stderr


@pytest.fixture
def task(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    model = tmp_path / "elsewhere" / "model"  # an absolute read outside the config's folder
    model.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": str(model), "train_data": ["train.jsonl"],
                                                        "output_dir": "runs/x"}))
    return folder / "config.yaml", model


@pytest.mark.parametrize("card, tag, devices", [
    ("rtx4090", "hwcompat:ada", ["--gpus", "all"]),
    ("m40", "hwcompat:maxwell", ["--gpus", "all"]),
    ("rx6600", "hwcompat:rdna2", ["--device=/dev/kfd", "--device=/dev/dri", "--group-add"]),
    ("b580", "hwcompat:battlemage", ["--device=/dev/dri", "--group-add"]),
])
def test_images_run_prints_the_cards_docker_run(task, card, tag, devices):
    config, model = task
    argv, said = _run_line("--emulate", card, "--config", str(config), "--", "max_steps=2")
    assert argv[:2] == ["docker", "run"] and tag in argv
    i = argv.index(tag)
    assert argv[i + 1:] == ["train", "/data/config.yaml", "max_steps=2"]
    flags = argv[:i]
    for d in devices:
        assert d in flags
    assert flags[flags.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert "--ipc=host" in flags and flags[flags.index("--network") + 1] == "none"
    mounts = [flags[j + 1] for j, f in enumerate(flags) if f == "-v"]
    assert f"{config.parent}:/data:ro" in mounts and f"{config.parent}:/output" in mounts
    assert f"{model}:{model}:ro" in mounts  # the model outside the config's folder, at its own path
    assert "/output" in said


def test_arguments_after_the_double_dash_go_to_the_command(task):
    config, _ = task
    argv, _ = _run_line("--config", str(config), "--", "--resume")
    assert argv[-3:] == ["train", "/data/config.yaml", "--resume"]
    argv, _ = _run_line("cpu", "--config", str(config), "--", "--resume", "max_steps=9")
    assert argv[-4:] == ["train", "/data/config.yaml", "--resume", "max_steps=9"]


def test_images_run_without_a_config_runs_the_demo_on_the_cpu_image(tmp_path):
    argv, _ = _run_line("cpu", "--output", str(tmp_path / "out"))
    assert argv[-2:] == ["hwcompat:cpu", "demo"] and f"{tmp_path / 'out'}:/output" in argv
    assert "hwcompat-cache:/cache" in argv  # the demo model prepared once, kept between containers
    assert "--gpus" not in argv and "--device=/dev/dri" not in argv


def test_a_relative_output_dir_lands_on_the_output_mount_in_an_image(tmp_path, monkeypatch):
    from hwcompat.train.config import load_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "m", "train_data": ["t.jsonl"],
                                                          "output_dir": "runs/x"}))
    assert load_config(tmp_path / "config.yaml").config.output_dir == str(tmp_path / "runs" / "x")  # a host
    monkeypatch.setenv("HWCOMPAT_OUTPUT_ROOT", "/output")
    assert load_config(tmp_path / "config.yaml").config.output_dir == "/output/runs/x"  # not the read-only /data
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "m", "train_data": ["t.jsonl"],
                                                          "output_dir": "/home/me/runs/x"}))
    with pytest.raises(InputError, match="in the image a run is written under /output"):
        load_config(tmp_path / "config.yaml")
    assert container.output_dir("/output/run", tmp_path, "/output") == "/output/run"


def test_an_unwritable_output_mount_is_one_line_that_says_run_as_yourself(tmp_path, monkeypatch, capsys):
    from hwcompat import entrypoint

    out = tmp_path / "output"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out) else real(p, mode))
    monkeypatch.setenv("HWCOMPAT_OUTPUT_ROOT", str(out))
    monkeypatch.setenv("HWCOMPAT_IMAGE_FAMILY", "cpu")
    monkeypatch.setattr(os, "execvp", lambda *a: pytest.fail("must not run the command"))
    assert entrypoint.main(["train", "/data/config.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} is not writable" in err and '--user "$(id -u):$(id -g)"' in err


def test_an_engine_without_a_registry_gets_the_offline_build_commands():
    from hwcompat.images import OFFLINE_BASE, REPO, _build_failure, specs

    msg = _build_failure(specs()["cpu"], {}, "failed to resolve source metadata for docker.io/library/python:3.11-"
                                             "slim-bookworm: dial tcp: lookup registry-1.docker.io: no such host")
    commands = [ln.split("#")[0].strip() for ln in msg.splitlines()[1:]]
    assert commands[0] == "bash ci/docker_env.sh base" and commands[1] == "bash ci/docker_env.sh wheels"
    assert f"BASE_IMAGE={OFFLINE_BASE}" in shlex.split(commands[2]) and "--network" in shlex.split(commands[2])
    script = (REPO / "ci" / "docker_env.sh").read_text()
    assert "\nbase() {" in script and "\nwheels() {" in script  # the functions the commands call exist
    other = _build_failure(specs()["ada"], {}, "lookup registry-1.docker.io: no such host")
    assert "docker save" in other and "docker load -i base.tar" in other
    assert _build_failure(specs()["cpu"], {}, "COPY failed: file not found") == (
        "building hwcompat:cpu failed: COPY failed: file not found")
