"""GPU evidence in one command: what one card can prove about the shipped trainer, in ten minutes on an H100.

    bash bench/gpu_evidence.sh [--out DIR] [--budget-s 570]     # on a machine with a CUDA or ROCm GPU
    bash bench/gpu_evidence.sh --smoke [--out DIR]              # the same steps on the CPU (CI)

The steps run in the order of what they prove (STEPS below), each under its own time limit and all under one
budget; a step that fails or runs out of time does not stop the others (evidence of a failure is evidence too),
and a step the budget has no room left for is recorded as skipped. Every step writes JSON under ``--out``
(default ``bench/results/``; with ``--smoke`` ``bench/results/smoke/``, which git ignores):

  detect / doctor    what the probes and the stack checks say about this real card
  selftest           `hwcompat selftest`: the shipped LoRA recipe through `hwcompat train` with the card's profile
                     (turns that profile's evidence to `verified`)
  recipe             bench/recipe_gpu.py: SFT stopped by SIGTERM and resumed, then DPO from its adapter
  path-<profile>     `hwcompat selftest --profile P --memory-limit GIB`: another family's code path (its dtype,
                     attention, compile backend and environment) on this card, under that family's usual card's
                     memory (M40/P40 24 GB, V100/T4 16 GB, RTX 4090 24 GB): evidence `path-verified` for it
  stream             bench/stream_gpu.py: 8B fp32 under 24 GB and 14B bf16 under 16 GB, streamed and QLoRA
  train              bench/train.py --gpu: hwcompat vs TRL's SFTTrainer, bf16 and fp16, tokens/s, memory, MFU
  plan               bench/plan_gpu.py: the planner against torch.cuda.max_memory_allocated
  gpu-tests          the `gpu`-marked tests

``--smoke`` runs every step on the CPU with tiny shapes, the emulated H100's profile (``--emulate h100
--cpu-emulation``) and no memory caps (nothing enforces them there): a check that the script works and writes
every file the real run writes (``expected_files``), not a measurement. Its results say ``emulated``/``smoke``
and never count as evidence.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 570  # ten minutes on the card, less the start: the whole run fits one device call
SMOKE_CARD = "h100"  # the catalog card whose profile the smoke run emulates on the CPU

#: Other families' code paths on the card at hand, under the memory of the family's usual card.
#: (profile, GiB, the card that memory stands for)
PATHS = (("maxwell", 24, "Tesla M40 24GB"), ("pascal", 24, "Tesla P40"), ("volta", 16, "Tesla V100 16GB"),
         ("turing", 16, "Tesla T4"), ("ada", 24, "RTX 4090"))
BF16_PATHS = ("ada",)  # paths whose profile dtype is bfloat16 (tests/test_gpu_evidence.py checks the profiles)
PATH_STEPS = 10  # selftest steps per path run (3 warm-up + 7 timed): compiling, not stepping, is their cost


@dataclass(frozen=True)
class Ctx:
    """What a step's command depends on: the interpreter, the output folder, the card and the mode."""

    py: str
    out: Path
    card: str  # the card's name as a file-name slug
    profile: str  # the profile `hwcompat detect` resolved for it
    memory_gib: float
    smoke: bool
    vendor: str = "nvidia"
    bf16: bool = True  # the card's profile says its silicon has bf16

    def device(self) -> list[str]:
        return ["--emulate", SMOKE_CARD, "--cpu-emulation"] if self.smoke else []

    def file(self, template: str) -> Path:
        return self.out / template.format(card=self.card, profile=self.profile)


@dataclass(frozen=True)
class Step:
    """One piece of evidence: its command, the files it writes, its time limit and its place in the budget."""

    name: str
    files: tuple[str, ...]  # templates over {card} and {profile}, relative to --out
    limit_s: int  # its own limit on the card
    h100_s: int  # budget table: expected seconds on an H100 (detect, doctor, plan and gpu-tests from the last real
    #              run; the rest estimated from it until a card runs them: replace with the measured times)
    smoke_s: int  # budget table: measured with --smoke on the 2-core machine, inductor's cache cold (277 s in all)
    argv: Callable[[Ctx], list[str]]
    stdout_file: str = ""  # the step's stdout is this file (detect, doctor)
    needs: Callable[[Ctx], str] = lambda ctx: ""  # a reason the step cannot run on this card, or ""


def _hw(ctx: Ctx, *args: str) -> list[str]:
    return [ctx.py, "-m", "hwcompat", *args]


def _bench(ctx: Ctx, script: str, out: str, *args: str) -> list[str]:
    return [ctx.py, f"bench/{script}", "--out", str(ctx.file(out)), *args, *(["--smoke"] if ctx.smoke else [])]


def _selftest(ctx: Ctx, out: str, *args: str) -> list[str]:
    return _hw(ctx, "selftest", "--json", "--out", str(ctx.file(out)), *args, *ctx.device())


def _path_step(profile: str, gib: int, card: str) -> Step:
    def argv(ctx: Ctx) -> list[str]:
        limit = [] if ctx.smoke else ["--memory-limit", str(gib)]
        return _selftest(ctx, f"path-{profile}-{{card}}.json", "--profile", profile, "--steps",
                         str(5 if ctx.smoke else PATH_STEPS), *limit)

    def needs(ctx: Ctx) -> str:
        if ctx.smoke:
            return ""
        if ctx.vendor != "nvidia":
            return f"the {profile} path is an NVIDIA family's; this card is {ctx.vendor}"
        if ctx.memory_gib < gib:
            return f"this card has {ctx.memory_gib:.0f} GiB, under the {gib} GiB of a {card}"
        if profile in BF16_PATHS and not ctx.bf16:
            return f"the {profile} path trains in bf16, which this card's silicon lacks"
        return ""

    compiled = profile in ("volta", "turing", "ada")  # inductor: the first run of a dtype compiles
    smoke_s = {"volta": 33, "turing": 17, "ada": 15}.get(profile, 11)  # volta compiles fp16 first; cache after
    return Step(f"path-{profile}", (f"path-{profile}-{{card}}.json",), 120, 45 if compiled else 25, smoke_s, argv,
                needs=needs)


STEPS: tuple[Step, ...] = (
    Step("detect", ("detect-{card}.json",), 30, 1, 1,
         lambda c: _hw(c, "detect", "--json", *(["--emulate", SMOKE_CARD] if c.smoke else [])),
         stdout_file="detect-{card}.json"),
    Step("doctor", ("doctor-{card}.json",), 60, 10, 3,
         lambda c: _hw(c, "doctor", "--json", *(["--emulate", SMOKE_CARD] if c.smoke else [])),
         stdout_file="doctor-{card}.json"),
    Step("selftest", ("selftest-{profile}-{card}.json",), 150, 50, 49,
         lambda c: _selftest(c, "selftest-{profile}-{card}.json", "--steps", "5" if c.smoke else "30")),
    Step("recipe", ("recipe-gpu-{card}.json",), 180, 75, 96, lambda c: _bench(c, "recipe_gpu.py", "recipe-gpu-{card}.json")),
    *(_path_step(*p) for p in PATHS),
    Step("stream", ("stream-gpu-{card}.json",), 180, 90, 17,
         lambda c: _bench(c, "stream_gpu.py", "stream-gpu-{card}.json",
                          *([] if c.smoke else ["--cases", "8b-fp32,14b-bf16", "--engines", "streamed,qlora"]))),
    # 6 steps (was 12, 80 s; then 8, 53 s): the QLoRA, GRPO and full-offload gpu tests below needed the time
    Step("train", ("train-gpu-{card}.json",), 150, 39, 20,
         lambda c: _bench(c, "train.py", "train-gpu-{card}.json", "--gpu", "--steps", "6")),
    Step("plan", ("plan-gpu-{card}.json",), 120, 30, 2, lambda c: _bench(c, "plan_gpu.py", "plan-gpu-{card}.json")),
    # the selftest ran above: not again; tests/train/test_gpu_loop.py is five `hwcompat train` runs (+14 s each,
    # estimated): the numerics check before the first step (#36), bf16 autocast and memory_limit_gib; QLoRA through
    # the shipped trainer; GRPO's rollouts and loss (#37); a full fine-tune resident and host-offloaded (#38).
    # Every train above runs the check too
    Step("gpu-tests", ("gpu-tests-{card}.json",), 120, 90, 5,
         lambda c: [c.py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                    "--deselect", "tests/test_selftest.py::test_selftest_gpu",
                    f"--junitxml={c.out / f'.gpu-tests-{c.card}.xml'}"]),
)


def expected_files(card: str, profile: str) -> list[str]:
    """Every file a run writes (the real one and --smoke alike), the summary and its table included."""
    names = [t.format(card=card, profile=profile) for s in STEPS for t in s.files]
    return names + [f"gpu-evidence-{card}.json", f"gpu-evidence-{card}.md"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_step(step: Step, ctx: Ctx, left_s: float) -> dict:
    """One step under min(its limit, what the budget has left): exit code, seconds and the tail of its output."""
    record = {"step": step.name, "files": [ctx.file(t).name for t in step.files], "limit_s": step.limit_s,
              "h100_s": step.h100_s, "smoke_s": step.smoke_s}
    reason = step.needs(ctx) or ("" if left_s >= 15 else f"the budget had {left_s:.0f} s left")
    if reason:
        print(f"== {step.name}: skipped ({reason})", flush=True)
        return record | {"skipped": reason, "exit_code": None, "seconds": 0.0}
    cmd, timeout = step.argv(ctx), int(min(step.limit_s, left_s))
    print(f"== {step.name} (limit {timeout} s): {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")) + \
            f"\ntimed out after {timeout} s"
    seconds = round(time.monotonic() - start, 1)
    if step.stdout_file:
        ctx.file(step.stdout_file).write_text(out)
    else:
        print(out[-3000:], end="")
    if rc and err.strip():
        print(err[-3000:], file=sys.stderr, end="")
    print(f"== {step.name}: exit {rc} in {seconds} s", flush=True)
    return record | {"command": cmd, "exit_code": rc, "seconds": seconds, "stderr_tail": err[-1500:] if rc else ""}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _first_gpu(ctx_py: str, smoke: bool) -> dict | None:
    cmd = [ctx_py, "-m", "hwcompat", "detect", "--json", *(["--emulate", SMOKE_CARD] if smoke else [])]
    try:
        data = json.loads(subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                         timeout=60).stdout)
    except (ValueError, subprocess.TimeoutExpired):
        return None
    return next((d for d in data["devices"] if d["vendor"] != "cpu"), None)


def all_skipped(summary: dict, smoke: bool) -> str:
    """On a card, gpu tests that all skipped prove nothing (torch did not see the GPU): a failure, said so. With
    --smoke on the CPU they skip by design."""
    ran = summary.get("tests", 0) - summary.get("skipped", 0)
    if smoke or ran > 0:
        return ""
    return f"every gpu test skipped ({summary.get('skipped', 0)} of {summary.get('tests', 0)}): torch saw no GPU"


def pytest_summary(xml_path: Path) -> dict:
    """The junit XML of the gpu-marked tests as {tests, failures, errors, skipped, cases}."""
    try:
        suite = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return {"tests": 0, "failures": 0, "errors": 1, "skipped": 0, "cases": [], "note": "no junit XML written"}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def _verdict(name: str, path: Path) -> str:
    """One word per result file, from what it says (not from the exit code alone)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return "missing"
    if isinstance(data, dict) and "passed" in data:
        return "PASS" if data["passed"] else "FAIL"
    if name == "gpu-tests":
        return f"{data.get('tests', 0) - data.get('skipped', 0)} ran, {data.get('failures', 0)} failed"
    return "written"


def summary_table(report: dict, out: Path) -> str:
    """The one-page summary: each step's verdict, time against its budget, and the file to open."""
    lines = [f"# GPU evidence: {report['device']} ({report['profile']}){' — smoke, CPU' if report['smoke'] else ''}",
             "", f"{report['date']}, budget {report['budget_s']} s, used {report['seconds']:.0f} s", "",
             "| step | result | seconds | limit | H100 budget | file |", "|---|---|---|---|---|---|"]
    for s in report["steps"]:
        result = f"skipped: {s['skipped']}" if s.get("skipped") else (
            f"exit {s['exit_code']}" + "".join(f", {_verdict(s['step'], out / f)}" for f in s["files"]))
        lines.append(f"| {s['step']} | {result} | {s['seconds']:.0f} | {s['limit_s']} | {s['h100_s']} | "
                     f"{', '.join(s['files'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the JSON results (default bench/results/, smoke: bench/results/smoke/)")
    ap.add_argument("--smoke", action="store_true", help="every step on the CPU, tiny shapes: the script works")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's seconds")
    ap.add_argument("--only", default="", help="comma-separated step names (default: all, in order)")
    args = ap.parse_args()
    out = Path(args.out or ROOT / "bench" / "results" / ("smoke" if args.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    gpu = _first_gpu(sys.executable, args.smoke)
    if gpu is None:
        print("gpu_evidence: no GPU found by `hwcompat detect`; run this on a machine with a CUDA or ROCm card, "
              "or add --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    prof = gpu.get("profile") or {}
    ctx = Ctx(py=sys.executable, out=out, card=_slug(gpu["name"]), profile=prof.get("name", "none"),
              memory_gib=gpu["memory_bytes"] / 2**30, smoke=args.smoke, vendor=gpu["vendor"],
              bf16=bool((prof.get("hardware") or {}).get("bf16", True)))
    only = {s for s in args.only.split(",") if s}
    start, steps = time.monotonic(), []
    for step in STEPS:
        if only and step.name not in only:
            continue
        steps.append(run_step(step, ctx, args.budget_s - (time.monotonic() - start)))
        if step.name == "gpu-tests":
            xml = out / f".gpu-tests-{ctx.card}.xml"
            summary = pytest_summary(xml)
            ctx.file("gpu-tests-{card}.json").write_text(json.dumps(summary, indent=2) + "\n")
            xml.unlink(missing_ok=True)
            why = all_skipped(summary, ctx.smoke)
            if why and steps[-1].get("exit_code") == 0:
                steps[-1] |= {"exit_code": 1, "note": why}
    report = {"benchmark": "gpu_evidence", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": gpu["name"], "profile": ctx.profile, "driver": gpu["reading"].get("driver_version"),
              "smoke": args.smoke, "budget_s": args.budget_s, "seconds": round(time.monotonic() - start, 1),
              "steps": steps, "passed": all(s["exit_code"] == 0 for s in steps if s["step"] != "doctor"
                                            and not s.get("skipped"))}
    (out / f"gpu-evidence-{ctx.card}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = summary_table(report, out)
    (out / f"gpu-evidence-{ctx.card}.md").write_text(table)
    print(table)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
