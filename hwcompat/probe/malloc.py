"""Which malloc the CPU trainer runs on: gperftools' tcmalloc where the host has it, else the C library's.

Why: glibc's malloc keeps what a training step frees (its mmap threshold grows to the largest freed block, so
later activations land on a heap that fragments): measured on SmolLM2-135M LoRA, 8 x 419 tokens, the process
peaked at 8.4-9.0 GiB RSS for 4.6 GiB of saved activations. tcmalloc reuses that memory: 5.1 GiB peak and 1.2x
the tokens/s (bench/profile_step.py, bench/results/profile-step-cpu.json; jemalloc: the same memory, 0.8x speed). PyTorch's own CPU launcher preloads it the same way
(``python -m torch.backends.xeon.run_cpu --enable-tcmalloc``, torch/backends/xeon/run_cpu.py), as Intel's
PyTorch CPU tuning guide recommends. The worker is a fresh process (exec), so LD_PRELOAD takes effect there.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from hwcompat import envvars

#: The library files, best first (the minimal build has no heap profiler: nothing else differs for us).
TCMALLOC_FILES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
#: How to install it, by the package manager the host has (Debian/Ubuntu, Fedora/RHEL, Arch, conda).
INSTALL = {"apt-get": "sudo apt-get install libtcmalloc-minimal4", "dnf": "sudo dnf install gperftools-libs",
           "pacman": "sudo pacman -S gperftools", "conda": "conda install -c conda-forge gperftools"}
#: tcmalloc prints every allocation over 1 GiB to stderr unless told otherwise; model loads make several.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def library_dirs(environ=None) -> list[Path]:
    """Where the dynamic loader's usual search path and an active conda or venv keep shared libraries."""
    env = os.environ if environ is None else environ
    triple = f"{platform.machine()}-linux-gnu"
    dirs = [f"/usr/lib/{triple}", f"/lib/{triple}", "/usr/lib64", "/usr/lib", "/usr/local/lib",
            os.path.join(sys.prefix, "lib")]
    if env.get("CONDA_PREFIX"):
        dirs.insert(0, os.path.join(env["CONDA_PREFIX"], "lib"))
    return [Path(d) for d in dirs]


def find_tcmalloc(dirs: list[Path] | None = None) -> Path | None:
    """The first tcmalloc shared library in ``dirs`` (default: ``library_dirs()``), or None."""
    for d in library_dirs() if dirs is None else dirs:
        for name in TCMALLOC_FILES:
            if (d / name).is_file():
                return d / name
    return None


def loads(lib: Path) -> bool:
    """Whether the dynamic loader can preload ``lib``: it runs ``true`` with it in LD_PRELOAD. A file that is
    there but cannot be loaded (truncated, another architecture) is skipped by ld.so with one stderr line, and
    the trainer would run on the system malloc while the log said tcmalloc. A few milliseconds."""
    import shutil
    import subprocess

    true = shutil.which("true")
    if true is None:
        return True  # nothing to test with: the worker's own summary records what it ran on
    try:
        res = subprocess.run([true], env={"LD_PRELOAD": str(lib), "PATH": envvars.get("PATH", default="")},
                             capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and b"cannot be preloaded" not in res.stderr and not res.stderr.strip()


def install_hint() -> str:
    """The install command for this host's package manager (apt-get where none is recognised)."""
    import shutil

    if envvars.get("CONDA_PREFIX"):
        return INSTALL["conda"]
    return next((cmd for tool, cmd in INSTALL.items() if tool != "conda" and shutil.which(tool)), INSTALL["apt-get"])


def in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """Which malloc this process runs on, read from its own mappings: tcmalloc, jemalloc or system."""
    try:
        text = maps.read_text(errors="replace")
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in text), "system")
