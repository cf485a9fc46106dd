"""GPU evidence in one command: everything a real card can prove, written as JSON under bench/results/.

    bash bench/gpu_evidence.sh [OUT_DIR]        # or: python bench/gpu_evidence.py [--out OUT_DIR]

On a machine with a CUDA or ROCm GPU it runs, in order: `hwcompat detect --json` and `doctor --json` (what
the probes and the stack checks say about this real card), the gpu-marked tests, `hwcompat selftest` (its
result, `selftest-<profile>-<card>.json`, is what turns a profile's evidence to "verified"), the planner
accuracy benchmark (`bench/plan_gpu.py`) and every other `bench/*_gpu.py`. Each step's exit code and
time go into `gpu-evidence-<card>.json`. A step that fails does not stop the others: evidence of a
failure is evidence too. Budget: well under 20 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 600  # no single step may eat the 20-minute budget


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(name: str, cmd: list[str], stdout_to: Path | None = None) -> dict:
    """One step: its command, exit code, seconds and the tail of its output."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", f"timed out after {STEP_TIMEOUT_S} s"
        out = out.decode() if isinstance(out, bytes) else out
    seconds = round(time.monotonic() - start, 1)
    if stdout_to is not None:
        stdout_to.write_text(out)
    else:
        print(out[-4000:], end="")
    if err.strip():
        print(err[-3000:], file=sys.stderr, end="")
    print(f"== {name}: exit {rc} in {seconds} s", flush=True)
    return {"step": name, "command": cmd, "exit_code": rc, "seconds": seconds, "stderr_tail": err[-1500:]}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _first_gpu(detect_json: Path) -> dict | None:
    try:
        data = json.loads(detect_json.read_text())
    except (OSError, ValueError):
        return None
    return next((d for d in data["devices"] if d["vendor"] != "cpu"), None)


def _pytest_summary(xml_path: Path) -> dict:
    try:
        suite = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    steps = []
    scratch = out / ".detect.json"
    steps.append(_run("detect", [py, "-m", "hwcompat", "detect", "--json"], stdout_to=scratch))
    gpu = _first_gpu(scratch)
    if gpu is None:
        scratch.unlink(missing_ok=True)
        print("gpu_evidence: no GPU found by `hwcompat detect`; run this on a machine with a CUDA or ROCm card",
              file=sys.stderr)
        return 2
    card = _slug(gpu["name"])
    profile = (gpu.get("profile") or {}).get("name", "none")
    scratch.rename(out / f"detect-{card}.json")
    steps.append(_run("doctor", [py, "-m", "hwcompat", "doctor", "--json"], stdout_to=out / f"doctor-{card}.json"))
    xml = out / f".gpu-tests-{card}.xml"
    steps.append(_run("gpu-tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                    f"--junitxml={xml}"]))
    tests = _pytest_summary(xml)
    xml.unlink(missing_ok=True)
    (out / f"gpu-tests-{card}.json").write_text(json.dumps(tests, indent=2) + "\n")
    steps.append(_run("selftest", [py, "-m", "hwcompat", "selftest", "--json",
                                   "--out", str(out / f"selftest-{profile}-{card}.json")]))
    steps.append(_run("plan_gpu", [py, "bench/plan_gpu.py", "--out", str(out / f"plan-gpu-{card}.json")]))
    for bench in sorted((ROOT / "bench").glob("*_gpu.py")):
        if bench.name != "plan_gpu.py":
            steps.append(_run(bench.stem, [py, str(bench.relative_to(ROOT)), "--out",
                                           str(out / f"{bench.stem.replace('_', '-')}-{card}.json")]))
    report = {"benchmark": "gpu_evidence", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": gpu["name"], "profile": profile, "driver": gpu["reading"].get("driver_version"),
              "steps": steps, "passed": all(s["exit_code"] == 0 for s in steps if s["step"] != "doctor")}
    (out / f"gpu-evidence-{card}.json").write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(s["step"]) for s in steps)
    print("\n".join(f"{s['step']:<{width}}  exit {s['exit_code']:>3}  {s['seconds']:>7.1f} s" for s in steps))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
