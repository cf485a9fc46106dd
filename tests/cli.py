"""The one way tests run the hwcompat command line: a real `python -m hwcompat` subprocess, as a user runs it, with
the HWCOMPAT_* variables of the test process left out (a test sets what it means to set)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def clean_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment without HWCOMPAT_* (and ``drop``'s prefixes), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HWCOMPAT_", *drop))}
    env.update(extra or {})
    return env


def argv(*args: Any) -> list[str]:
    return [sys.executable, "-m", "hwcompat", *(a if isinstance(a, bytes) else str(a) for a in args)]


def run(*args: Any, env: dict[str, str] | None = None, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    """`hwcompat ARGS`, waited for; stdout and stderr captured as text. ``env`` adds to the clean environment."""
    kw.setdefault("text", True)
    return subprocess.run(argv(*args), capture_output=True, env=clean_env(env), timeout=timeout, **kw)


def popen(*args: Any, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
    """`hwcompat ARGS`, started (a test that signals it or reads it as it runs); pipes unless ``kw`` says."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    return subprocess.Popen(argv(*args), env=kw.pop("full_env", None) or clean_env(env), **kw)


def train(*args: Any, **kw: Any) -> subprocess.CompletedProcess:
    """`hwcompat train ARGS` (run's keywords)."""
    return run("train", *args, **kw)


def run_patched(*args: Any, code: str, env: dict[str, str] | None = None, timeout: float = 300
                ) -> subprocess.CompletedProcess:
    """`hwcompat ARGS` in a process that first runs ``code`` (a patch: e.g. a SIGTERM in the middle of a write)."""
    import textwrap

    cmd = [sys.executable, "-c", textwrap.dedent(code) + "\nimport sys\nfrom hwcompat.cli import main\n"
                                                         f"sys.exit(main({[str(a) for a in args]!r}))"]
    return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(env), timeout=timeout)


def assert_clean_error(res: subprocess.CompletedProcess, code: int = 2, *texts: str) -> None:
    """The user's mistake ended as one clear message: the exit code, no traceback, and each of ``texts``."""
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    for t in texts:
        assert t in res.stderr, (t, res.stderr[-2000:])
