"""The README's demo figures and screenshot, from real runs: `hwcompat demo` at this machine's defaults (the
screenshot's run) and the same demo with dtype=float32 (the README's fp32 line).

    python bench/report_demo.py [--work /tmp/report-demo]   # runs both demos (~4 minutes on 2 cores)

Writes docs/report-demo.json and docs/report-demo.png (headless Chromium, 1280x1340); prints the demo block for the
README. tests/test_readme_figures.py checks the README against the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(folder: Path, *overrides: str) -> tuple[dict, str]:
    """`hwcompat demo` in ``folder`` (its run lands in runs/demo there); its summary and what it printed."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    res = subprocess.run([sys.executable, "-m", "hwcompat", "demo", *overrides], cwd=folder, capture_output=True,
                         text=True, env=env)
    if res.returncode:
        raise SystemExit(f"demo {' '.join(overrides)} failed:\n{res.stderr[-3000:]}")
    return json.loads((folder / "runs" / "demo" / "summary.json").read_text()), res.stdout + res.stderr


def figures(summary: dict) -> dict:
    return {"dtype": summary["dtype"], "steps": summary["steps"], "train_seconds": round(summary["train_seconds"], 1),
            "tokens_per_s": round(summary["tokens_per_s"]),
            "peak_memory_gib": round(summary["peak_memory_bytes"] / 2**30, 2),
            "eval_before": summary["eval_before"], "eval_after": summary["eval_after"]}


def screenshot(page: Path, out: Path) -> None:
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                    None)
    if chromium is None:
        raise SystemExit("no chromium (apt-get install chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,1340", f"--screenshot={out}", page.as_uri()], check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/report-demo", help="where the two demo runs go")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    default, printed = run_demo(work / "default")
    fp32, _ = run_demo(work / "fp32", "dtype=float32")
    fig = {"source": f"runs/demo of `hwcompat demo` on the 2-core CPU machine, {date.today().isoformat()} "
                     "(bench/report_demo.py): docs/report-demo.png is its report.html and the README's demo block is "
                     "its output; float32 is the same demo with dtype=float32",
           **figures(default), "float32": figures(fp32)}
    (ROOT / "docs" / "report-demo.json").write_text(json.dumps(fig, indent=2) + "\n")
    screenshot(work / "default" / "runs" / "demo" / "report.html", ROOT / "docs" / "report-demo.png")
    print(printed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
