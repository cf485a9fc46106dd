"""Images built and run on a real Docker engine, offline (`--network none` everywhere).

CI (`.ci/run`) starts dockerd, imports a debootstrapped base and fills wheelhouse/ first
(ci/docker_env.sh) and sets HWCOMPAT_REQUIRE_DOCKER=1, so a missing engine fails there
instead of skipping.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests import cli

from hwcompat.images import OFFLINE_BASE, REPO, specs

pytestmark = [pytest.mark.docker, pytest.mark.slow]
BASE = os.environ.get("HWCOMPAT_CI_BASE", OFFLINE_BASE)  # ci/docker_env.sh's BASE_TAG
# docs/images.md's build line's arguments (its test below then reuses this build's cache). The wheelhouse makes the
# torch index unused, so every family gets the CPU image's: one builder venv for all three images, stored once
# (tests/test_images.py checks the Dockerfiles allow it; three venvs filled CI's disk).
BUILD_ARGS = [f"BASE_IMAGE={BASE}", "TORCH_SPEC=torch==2.13.0", f"TORCH_INDEX_URL={specs()['cpu'].profiles[0].torch.index_url}"]


def _unavailable(reason):
    if os.environ.get("HWCOMPAT_REQUIRE_DOCKER") == "1":
        pytest.fail(f"HWCOMPAT_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def images():
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        _unavailable("no Docker engine reachable (ci/docker_env.sh start)")
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode != 0:
        _unavailable(f"base image {BASE} missing (ci/docker_env.sh base)")
    if not list((REPO / "wheelhouse").glob("*.whl")):
        _unavailable("wheelhouse/ is empty (ci/docker_env.sh wheels)")
    # One NVIDIA family, one AMD family and the CPU image, from the committed Dockerfiles.
    args = [a for kv in BUILD_ARGS for a in ("--build-arg", kv)]
    res = cli.run("images", "build", "maxwell", "rdna2", "cpu", "--network", "none", *args, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "built hwcompat:maxwell" in res.stdout and "built hwcompat:rdna2" in res.stdout
    return ["hwcompat:maxwell", "hwcompat:rdna2", "hwcompat:cpu"]


def _run(image, *args, env=(), volumes=(), timeout=600):
    cmd = ["docker", "run", "--rm", "--network", "none"]
    for e in env:
        cmd += ["-e", e]
    for v in volumes:
        cmd += ["-v", v]
    return subprocess.run(cmd + [image, *args], capture_output=True, text=True, timeout=timeout)


def test_matching_device_is_accepted(images):
    res = _run("hwcompat:maxwell", "detect", "--json", "--emulate", "m40")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["devices"][0]["profile"]["image"] == "hwcompat:maxwell"
    res = _run("hwcompat:rdna2", "env", env=["HWCOMPAT_EMULATE=rx6600"])
    assert res.returncode == 0 and "HSA_OVERRIDE_GFX_VERSION=10.3.0" in res.stdout


def test_mismatched_device_is_refused_with_the_right_tag(images):
    res = _run("hwcompat:maxwell", "detect", "--emulate", "p40")
    assert res.returncode == 2 and "Tesla P40 (pascal) needs hwcompat:pascal" in res.stderr
    res = _run("hwcompat:rdna2", "detect", env=["HWCOMPAT_EMULATE=rtx4090"])
    assert res.returncode == 2 and "needs hwcompat:ada" in res.stderr
    res = _run("hwcompat:rdna2", "detect", env=["HWCOMPAT_EMULATE=rtx4090", "HWCOMPAT_ALLOW_MISMATCH=1"])
    assert res.returncode == 0 and "running anyway" in res.stderr


def test_gpu_image_without_gpu_says_how_to_pass_one(images):
    res = _run("hwcompat:maxwell", "train", "/data/config.yaml")
    assert res.returncode == 2 and "--gpus all" in res.stderr


def test_image_labels_and_user(images):
    info = json.loads(subprocess.run(["docker", "image", "inspect", "hwcompat:rdna2"], capture_output=True,
                                     text=True).stdout)[0]
    labels = info["Config"]["Labels"]
    from hwcompat.profiles import load_profiles

    build = load_profiles()["rdna2"].torch.build  # the profile is the one place that says it
    assert labels["io.hwcompat.family"] == "rdna2" and labels["io.hwcompat.torch-build"] == build
    assert info["Config"]["User"] == "1000:1000"
    assert set(info["Config"]["Volumes"]) == {"/data", "/output", "/cache"}


def _train_dir(tmp_path, tiny_model, **extra):
    import shutil

    import yaml

    from tests.train.conftest import task_rows, write_jsonl

    data = tmp_path / "data"
    shutil.copytree(tiny_model, data / "model")
    write_jsonl(data / "train.jsonl", task_rows(64, 1))
    write_jsonl(data / "eval.jsonl", task_rows(8, 2))
    cfg = {"model": "/data/model", "train_data": ["/data/train.jsonl"], "eval_data": ["/data/eval.jsonl"],
           "max_steps": 4, "micro_batch_size": 8, "eval_max_rows": 4, "output_dir": "/output/run", **extra}
    (data / "config.yaml").write_text(yaml.safe_dump(cfg))
    for p in [data, *data.rglob("*")]:  # readable by the container's uid 1000 (pytest makes 0700 folders)
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = tmp_path / "output"
    out.mkdir()
    out.chmod(0o777)  # the container user (uid 1000) writes here
    return data, out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from hwcompat.train.tiny import write_tiny
    from tests.train.conftest import COLORS

    path = tmp_path_factory.mktemp("tiny") / "model"
    texts = [f"What color is the {k}? {v}" for k, v in COLORS.items()] * 5
    return write_tiny(path, texts, chat_template=False, hidden=64, layers=2)


def test_train_in_image_writes_adapter_as_non_root(images, tmp_path, tiny_model, host_cpu_dtype):
    data, out = _train_dir(tmp_path, tiny_model)
    res = _run("hwcompat:cpu", "train", "/data/config.yaml", volumes=[f"{data}:/data:ro", f"{out}:/output"])
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = out / "run" / "adapter" / "adapter_model.safetensors"
    assert adapter.exists()
    assert adapter.stat().st_uid == 1000  # written by the image's non-root user
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["profile_env_applied"] is True
    assert summary["dtype"] == host_cpu_dtype  # #41: the image reads the same CPU flags the host's run does


def test_image_trains_from_parquet_with_tensorboard(images, tmp_path, tiny_model):
    """#35: the images carry what the docs say a run can use (hwcompat.images.IMAGE_EXTRAS): Parquet data (the
    data extra) and report_to (the track extra) train in the CPU image instead of ending at an install line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.train.conftest import task_rows

    data, out = _train_dir(tmp_path, tiny_model, report_to=["tensorboard"], train_data=["/data/train.parquet"],
                           eval_data=["/data/eval.parquet"])
    for name, seed in (("train", 1), ("eval", 2)):
        pq.write_table(pa.Table.from_pylist(task_rows(64 if name == "train" else 8, seed)), data / f"{name}.parquet")
        (data / f"{name}.parquet").chmod(0o644)
    res = _run("hwcompat:cpu", "train", "/data/config.yaml", volumes=[f"{data}:/data:ro", f"{out}:/output"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(Parquet, prompt/completion)" in res.stderr and "tensorboard: /output/run/tensorboard" in res.stderr
    assert list((out / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_image_carries_llama_cpp_for_k_quants_and_verify(images, tmp_path, tiny_model):
    """hwcompat[gguf] is in the images (the wheelhouse's portable build): llama.cpp's quantizer makes a q4_k_m, and
    --verify runs the GGUF in llama.cpp, inside the CPU image as its non-root user."""
    data, out = _train_dir(tmp_path, tiny_model)
    vols = [f"{data}:/data:ro", f"{out}:/output"]
    res = _run("hwcompat:cpu", "export", "/data/model", "--gguf", "/output/m-q4_k_m.gguf", "--type", "q4_k_m",
               "--no-verify", volumes=vols)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "q4_k_m" in res.stdout and (out / "m-q4_k_m.gguf").stat().st_uid == 1000
    res = _run("hwcompat:cpu", "export", "/data/model", "--gguf", "/output/m.gguf", "--type", "f32", "--verify",
               volumes=vols)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "verified in llama.cpp" in res.stdout
    assert json.loads((out / "m.export.json").read_text())["passed"] is True


def test_docker_stop_checkpoints(images, tmp_path, tiny_model):
    data, out = _train_dir(tmp_path, tiny_model, max_steps=1_000_000, eval_at_start=False, learning_rate=1e-5)
    name = f"hwcompat-stop-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--network", "none", "-v", f"{data}:/data:ro", "-v",
                    f"{out}:/output", "hwcompat:cpu", "train", "/data/config.yaml"], check=True, capture_output=True)
    try:
        metrics = out / "run" / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.5)
        subprocess.run(["docker", "stop", "-t", "60", name], check=True, capture_output=True)
        code = int(subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True,
                                  text=True).stdout.strip())
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert code == 143, logs[-2000:]
    assert "interrupted at step" in logs
    assert list((out / "run" / "checkpoints").glob("step-*/state.json"))


def _readme_docker_lines():
    text = (REPO / "docs" / "images.md").read_text(encoding="utf-8")
    block = text.split("<!-- docker-contract:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln for ln in block.splitlines() if ln.strip()]


def test_the_documented_docker_commands_run_as_written(images, tmp_path, tiny_model):
    """#40 §1: the documented container path (docs/images.md), line for line, on the local engine: build, the
    printed docker run, a detached training run, `docker stop` (a checkpoint, exit 143), `--resume` in a new container, the demo."""
    import shutil

    import yaml

    from tests.train.conftest import task_rows, write_jsonl

    lines = _readme_docker_lines()
    assert lines[0].startswith("bash ci/docker_env.sh base && bash ci/docker_env.sh wheels")
    ci = (REPO / ".ci" / "run").read_text()
    assert "docker_env.sh base" in ci and "docker_env.sh wheels" in ci  # CI ran the first line before the tests
    task = tmp_path / "task"
    shutil.copytree(tiny_model, task / "model")
    write_jsonl(task / "train.jsonl", task_rows(64, 1))
    write_jsonl(task / "eval.jsonl", task_rows(8, 2))
    (task / "config.yaml").write_text(yaml.safe_dump({
        "model": "model", "train_data": ["train.jsonl"], "eval_data": ["eval.jsonl"], "output_dir": "runs/tickets",
        "max_steps": 400, "micro_batch_size": 8, "eval_at_start": False, "eval_metrics": "none",
        "learning_rate": 1e-4, "num_threads": 1}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"

    def sh(line, timeout=1800):
        res = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, env=env,
                             timeout=timeout)
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        return res

    build, show, start, stop, resume, demo = lines[1:]
    sh(build)
    printed = sh(show).stdout
    assert printed.startswith("docker run ") and "hwcompat:cpu train /data/config.yaml" in printed
    try:
        sh(start)
        metrics = task / "runs" / "tickets" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.5)
        sh(stop, timeout=120)
    finally:
        subprocess.run(["docker", "rm", "-f", "tickets"], capture_output=True)
    checkpoints = list((task / "runs" / "tickets" / "checkpoints").glob("step-*/state.json"))
    assert checkpoints and not (task / "runs" / "tickets" / "adapter").exists()
    out = sh(resume)
    assert "resumed from" in out.stderr
    summary = json.loads((task / "runs" / "tickets" / "summary.json").read_text())
    assert summary["steps"] == 400 and summary["resumes"] == 1
    assert (task / "runs" / "tickets" / "adapter" / "adapter_model.safetensors").stat().st_uid == os.getuid()
    out = sh(demo)
    assert "allocator: tcmalloc" in out.stderr  # the CPU image carries it: no host install hint
    assert "apt-get install" not in out.stderr and "pip install" not in out.stderr
    assert (tmp_path / "runs" / "demo" / "adapter" / "adapter_model.safetensors").exists()
