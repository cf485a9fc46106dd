import os
import subprocess
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    """gpu tests skip cleanly unless a CUDA/ROCm device is really there."""
    has_gpu = False
    if any("gpu" in item.keywords for item in items):
        try:
            import torch  # noqa: WPS433 (only when gpu tests were collected)

            has_gpu = torch.cuda.is_available()
        except Exception:
            has_gpu = False
    skip = pytest.mark.skip(reason="needs a GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture
def run_cli():
    """Run `python -m hwcompat ARGS` as a real subprocess; returns CompletedProcess."""

    def _run(*args, env=None, timeout=120, **kw):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "hwcompat", *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout, **kw)

    return _run


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("HWCOMPAT_") or k == "HSA_OVERRIDE_GFX_VERSION":
            monkeypatch.delenv(k, raising=False)
