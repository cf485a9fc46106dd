"""Cold-process time of `hwcompat detect --json` vs what users run today.

    python bench/detect.py [--runs 7] [--out bench/results/detect.json]

Compares, side by side in one run, the median wall time of a fresh process for:
  hwcompat detect --json, python -m torch.utils.collect_env, accelerate env,
  and `python -c pass` (the interpreter's own start, site and .pth files included: the floor).
Timed warm, as a user's second run is: bytecode compiled, hwcompat's plan memo filled (hwcompat.cli.plancache).
`--before DIR` adds the same command run from another checkout (e.g. a `git worktree` of the previous
commit), for before/after figures in one run. Goal: detect <= 60 ms median, >= 10x faster than both.
"""

from __future__ import annotations

import argparse
import compileall
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

COMMANDS = {
    "hwcompat detect --json": [sys.executable, "-m", "hwcompat", "detect", "--json"],
    "python -m torch.utils.collect_env": [sys.executable, "-m", "torch.utils.collect_env"],
    "accelerate env": [shutil.which("accelerate") or "accelerate", "env"],
}


def time_cmd(cmd: list[str], runs: int) -> dict:
    cwd, env = None, None
    if cmd and cmd[0].startswith("cwd="):  # a checkout's own `python -m hwcompat` runs from its folder
        cwd, cmd = cmd[0][4:], cmd[1:]
    if cmd and cmd[0].startswith("env="):  # NAME=VALUE for this command only
        name, value = cmd[0][4:].split("=", 1)
        env, cmd = {**__import__("os").environ, name: value}, cmd[1:]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
        times.append(time.perf_counter() - t0)
        if res.returncode != 0:
            return {"error": (res.stderr or res.stdout)[-500:], "runs": len(times)}
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "detect.json"))
    ap.add_argument("--before", metavar="DIR", help="also time `detect --json` from this checkout")
    args = ap.parse_args()
    COMMANDS["python -c pass (interpreter floor)"] = [sys.executable, "-c", "pass"]
    # A cache folder that cannot exist (its parent is a file): every run parses the YAML and resolves, as a
    # first run after install does.
    COMMANDS["hwcompat detect --json (first run: no memo)"] = [f"env=HWCOMPAT_CACHE_DIR={__file__}/no-cache",
                                                              sys.executable, "-m", "hwcompat", "detect", "--json"]
    if args.before:
        COMMANDS["hwcompat detect --json (before)"] = [f"cwd={Path(args.before).resolve()}", sys.executable, "-m",
                                                      "hwcompat", "detect", "--json"]
    # Bytecode as an installed package has it (pip compiles on install): with PYTHONDONTWRITEBYTECODE set, a
    # checkout would otherwise recompile every edited module on every run and time the compiler.
    for checkout in filter(None, [Path(__file__).resolve().parents[1], args.before]):
        compileall.compile_dir(str(Path(checkout) / "hwcompat"), quiet=1)
    # One warm-up each so the page cache (and hwcompat's memo, as on any second run) is equally warm for all.
    for cmd in COMMANDS.values():
        time_cmd(cmd, 1)
    results = {name: time_cmd(cmd, args.runs) for name, cmd in COMMANDS.items()}
    results["before_dir"] = args.before
    base = results["hwcompat detect --json"].get("median_s")
    for name, r in results.items():
        if base and isinstance(r, dict) and "median_s" in r:
            r["ratio_vs_hwcompat"] = r["median_s"] / base
    report = {"benchmark": "detect", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "python": platform.python_version(), "cpus": __import__("os").cpu_count(),
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'command':44} {'median':>9} {'min':>9} {'x hwcompat':>11}")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        if "median_s" in r:
            print(f"{name:44} {r['median_s']:8.3f}s {r['min_s']:8.3f}s {r.get('ratio_vs_hwcompat', 0):10.1f}x")
        else:
            print(f"{name:44} failed: {r['error'][:60]!r}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
