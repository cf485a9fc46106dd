"""#40 §3: the README's demo figures and its report screenshot come from one run (docs/report-demo.json says
which); the README quoted 284 tokens/s while the screenshot showed 89."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_demo_block_is_the_screenshots_run():
    fig = json.loads((ROOT / "docs" / "report-demo.json").read_text())
    readme = (ROOT / "README.md").read_text()
    done = re.search(r"^done: (\d+) steps in ([\d.]+)s, ([\d,]+) tokens/s, peak memory ([\d.]+) GiB$", readme, re.M)
    assert done, "the README's demo block has no done: line"
    steps, seconds, tps, gib = done.groups()
    assert (int(steps), float(seconds), int(tps.replace(",", "")), float(gib)) == (
        fig["steps"], fig["train_seconds"], fig["tokens_per_s"], fig["peak_memory_gib"])
    after = re.search(r"^field_f1\s+([\d.]+)\s+([\d.]+)$", readme, re.M)
    assert float(after.group(2)) == round(fig["eval_after"]["field_f1"], 3)
    assert (ROOT / "docs" / "report-demo.png").stat().st_size > 10_000
