"""Does this torch build run this card? One answer, for detect and for doctor.

``detect`` must not import torch (seconds, and CUDA side effects), so it reads ``torch/version.py`` as
text (``__version__``, ``cuda``, ``hip``) and looks the (release, CUDA/ROCm version) up in
``catalog/wheels.yaml``, the sourced compiled-target lists of every wheel family. A plain PyPI wheel has
no ``+cu130`` tag; ``cuda = '13.0'`` in its version.py still names the family. ``doctor`` asks torch
itself (``torch.cuda.get_arch_list()``) and passes that list in. Either way the verdict comes from
:func:`kernel_problem`, so the two can never disagree about the same list.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from hwcompat.datafiles import data_dir
from hwcompat.yamlfile import load_packaged_yaml

AMD_DEVICE_PACKAGE = "amd-torch-device-"  # TheRock: one distribution per compiled gfx target


@dataclass(frozen=True)
class InstalledTorch:
    """A torch build as its files describe it (never by importing it)."""

    version: str  # "2.13.0", "2.13.0+cu126", "2.12.0+rocm7.14.0"
    cuda: str | None = None  # torch.version.cuda, "13.0"; None on CPU and ROCm builds
    hip: str | None = None  # torch.version.hip, "7.2.26015"
    targets: tuple[str, ...] | None = None  # sm_XY / compute_XY / gfxNNNN compiled in; None = unknown
    targets_from: str = ""  # where the targets came from (wheel table row, torch itself, device packages)

    @property
    def release(self) -> tuple[int, int] | None:
        m = re.match(r"^(\d+)\.(\d+)", self.version)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @property
    def kind(self) -> str:
        return "cuda" if self.cuda else "rocm" if self.hip else "cpu"

    @property
    def family(self) -> str:
        """Wheel family: "cu130", "rocm7.2", "cpu" (from the runtime, not the optional +tag)."""
        if self.cuda:
            return "cu" + "".join(self.cuda.split(".")[:2])
        if self.hip:
            return "rocm" + ".".join(self.hip.split(".")[:2])
        return "cpu"

    def describe(self) -> str:
        build = {"cuda": f"CUDA {self.cuda}", "rocm": f"ROCm {'.'.join((self.hip or '').split('.')[:2])}",
                 "cpu": "CPU"}[self.kind]
        return f"torch {self.version} ({build} build)"

    @classmethod
    def from_version(cls, version: str, cuda: str | None = None, hip: str | None = None,
                     device_packages: Iterable[str] = ()) -> "InstalledTorch":
        """From the version facts alone; the runtime is taken from the +tag when not given."""
        tag = version.partition("+")[2]
        if cuda is None and hip is None and re.fullmatch(r"cu\d{3}", tag):
            cuda = f"{tag[2:-1]}.{tag[-1]}"
        if cuda is None and hip is None and tag.startswith("rocm"):
            hip = tag[4:]
        targets, source = lookup(version, cuda, hip, tuple(device_packages))
        return cls(version, cuda, hip, targets, source)

    @classmethod
    def from_arch_list(cls, version: str, cuda: str | None, hip: str | None,
                       arch_list: Iterable[str]) -> "InstalledTorch":
        """From torch itself (doctor); an empty list (CPU builds) falls back to the table."""
        arch = tuple(arch_list)
        if not arch:
            return cls.from_version(version, cuda, hip)
        return cls(version, cuda, hip, arch, "torch.cuda.get_arch_list()")


# --- reading the installed torch without importing it -------------------------------------------------

def parse_version_file(text: str) -> dict[str, str | None]:
    """The literal assignments of ``torch/version.py`` (``__version__``, ``cuda``, ``hip``)."""
    import ast
    out: dict[str, str | None] = {}
    for node in ast.parse(text).body:
        target, value = None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and (
                value.value is None or isinstance(value.value, str)):
            out[target.id] = value.value
    return out


def _device_packages(torch_dir: Path) -> tuple[str, ...]:
    """gfx targets of TheRock's ``amd-torch-device-*`` distributions installed beside torch."""
    found = []
    for meta in torch_dir.parent.glob("amd_torch_device_*.dist-info"):
        name = meta.name[len("amd_torch_device_"):].split("-", 1)[0]
        if re.fullmatch(r"gfx[0-9a-f]{3,4}", name):
            found.append(name)
    return tuple(sorted(found))


def installed(find_spec: Callable = importlib.util.find_spec) -> InstalledTorch | None:
    """The torch build in this environment, from its files; None when torch is not installed."""
    try:
        spec = find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "version.py"
        try:
            facts = parse_version_file(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        version = facts.get("__version__")
        if version:
            return InstalledTorch.from_version(version, facts.get("cuda"), facts.get("hip"),
                                               _device_packages(Path(location)))
    return None


# --- the wheel table ----------------------------------------------------------------------------------

def _mm(text: str) -> tuple[int, int]:
    major, minor = str(text).split(".")[:2]
    return int(major), int(minor)


@lru_cache(maxsize=1)
def wheel_table() -> dict:
    return load_packaged_yaml(data_dir("catalog") / "wheels.yaml", "wheel table")


def lookup(version: str, cuda: str | None, hip: str | None,
           device_packages: tuple[str, ...] = ()) -> tuple[tuple[str, ...] | None, str]:
    """Compiled targets of this (release, runtime) per the wheel table: (targets or None, source)."""
    if device_packages:
        return device_packages, f"installed {AMD_DEVICE_PACKAGE}* packages (AMD multi-arch wheels)"
    m = re.match(r"^(\d+)\.(\d+)", version)
    if not m or not (cuda or hip):
        return None, ""
    release = (int(m.group(1)), int(m.group(2)))
    runtime = _mm(cuda or hip)
    for row in wheel_table()["cuda" if cuda else "rocm"]:
        rng = row["torch"]
        if _mm(row["runtime"]) == runtime and _mm(rng["min"]) <= release <= _mm(rng["max"]):
            return tuple(row["targets"]), f"wheel table: {row['build']} for torch {rng['min']}-{rng['max']} " \
                                          f"({row['source']})"
    return None, ""


def pypi_family(release: tuple[int, int]) -> str | None:
    """The family a plain ``pip install torch==X.Y`` gets from PyPI."""
    for row in wheel_table()["cuda"]:
        rng = row.get("pypi_releases")
        if rng and _mm(rng["min"]) <= release <= _mm(rng["max"]):
            return row["build"]
    return None


def family_targets(build: str, release: tuple[int, int]) -> tuple[str, ...] | None:
    """Targets of wheel family ``build`` (e.g. "cu126") at ``release``; None when the table has no row."""
    for kind in ("cuda", "rocm"):
        for row in wheel_table()[kind]:
            rng = row["torch"]
            if row["build"] == build and _mm(rng["min"]) <= release <= _mm(rng["max"]):
                return tuple(row["targets"])
    return None


# --- the verdict --------------------------------------------------------------------------------------

def covers_nvidia(targets: Iterable[str], cc: str) -> bool:
    """A cubin of the same major and a minor <= the card's, or PTX at or below the card (JIT)."""
    major, minor = (int(x) for x in cc.split("."))
    for a in targets:
        kind, _, num = a.partition("_")
        num = num.rstrip("af")  # sm_90a / sm_100f are arch-specific variants of sm_90 / sm_100
        if not num.isdigit() or len(num) < 2:
            continue
        m, n = int(num[:-1]), int(num[-1])
        if kind == "sm" and m == major and n <= minor:
            return True
        if kind == "compute" and (m, n) <= (major, minor):
            return True
    return False


def _span(targets: tuple[str, ...], prefix: str) -> str:
    hits = [t for t in targets if t.startswith(prefix)]
    if not hits:
        return "none"
    return " ".join(hits) if len(hits) <= 8 else f"{hits[0]} … {hits[-1]}"


def kernel_problem(torch: InstalledTorch, vendor: str, cc: str | None, gfx: str | None) -> str | None:
    """Why this torch build cannot run this card, or None when it can (or the targets are unknown).

    ``gfx`` is the target the ROCm runtime will use (after any HSA_OVERRIDE_GFX_VERSION).
    """
    if vendor == "nvidia" and torch.kind != "cuda":
        return f"{torch.describe()} cannot use an NVIDIA GPU"
    if vendor == "amd" and torch.kind != "rocm":
        return f"{torch.describe()} cannot use an AMD GPU"
    if torch.targets is None:
        return None
    if vendor == "nvidia" and cc and not covers_nvidia(torch.targets, cc):
        return (f"{torch.describe()} has no kernels for sm_{cc.replace('.', '')} (it has "
                f"{_span(torch.targets, 'sm_')}): training fails with 'no kernel image is available for "
                "execution on the device'")
    if vendor == "amd" and gfx and gfx not in torch.targets:
        return (f"{torch.describe()} has no kernels for {gfx} (it has {_span(torch.targets, 'gfx')}): "
                "'HIP error: invalid device function'")
    return None


# --- advice -------------------------------------------------------------------------------------------

def torch_requirement(min_version: str | None, max_version: str | None, extra: str | None = None) -> str:
    """A PEP 508 requirement for a profile's release window: max "2.14" -> "torch<2.15" (never "<=2.14.*")."""
    spec = []
    if min_version:
        spec.append(f">={min_version}")
    if max_version:
        major, minor = _mm(max_version)
        spec.append(f"<{major}.{minor + 1}")
    return f"torch{f'[{extra}]' if extra else ''}{','.join(spec)}"


def install_command(min_version: str | None, max_version: str | None, index_url: str,
                    extra: str | None = None) -> str:
    """The pip command that installs a wheel family; its requirement parses as PEP 508 (tested)."""
    return f"pip install '{torch_requirement(min_version, max_version, extra)}' --index-url {index_url}"
