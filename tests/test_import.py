"""Nothing heavy at import; detect/env never load torch."""

import json
import subprocess
import sys

CHECK = """
import sys, json
{stmt}
print(json.dumps(sorted(m for m in ("torch", "pynvml", "amdsmi", "transformers") if m in sys.modules)))
"""


def _loaded(stmt):
    res = subprocess.run([sys.executable, "-c", CHECK.format(stmt=stmt)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_hwcompat_loads_nothing_heavy():
    assert _loaded("import hwcompat, hwcompat.cli, hwcompat.resolve, hwcompat.profiles, hwcompat.probe") == []


def test_detect_and_env_never_import_torch():
    stmt = ("import io, contextlib\nfrom hwcompat.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['detect', '--json']); main(['detect', '--emulate', 'm40,rx6600']); main(['env', '--emulate', 't4'])")
    assert "torch" not in _loaded(stmt)


def test_import_does_not_touch_environment():
    code = "import os; before = dict(os.environ); import hwcompat.cli, hwcompat.resolve; print(before == dict(os.environ))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "True"


def test_the_trainer_never_imports_from_the_cli():
    """Layers run one way: cli -> train, never back (the launcher used to reach into cli.common)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "hwcompat" / "train"
    for f in root.glob("*.py"):
        assert not re.search(r"^\s*(from|import) hwcompat\.cli", f.read_text(), re.M), f.name
