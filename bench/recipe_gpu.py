"""The shipped recipe on the card at hand: `hwcompat train` SFT, interrupted by SIGTERM and resumed, then DPO.

    python bench/recipe_gpu.py [--out bench/results/recipe-gpu-<card>.json] [--smoke]

What a user's run does, on the real card, with the profile `hwcompat detect` resolves for it:

1. SFT of a small Llama built from a config (selftest's model and repeated-pattern task, no hub), started as a
   user starts it (`hwcompat train CONFIG`), stopped with SIGTERM after a few steps (what `docker stop` sends):
   exit 143 and a checkpoint;
2. `hwcompat train RUN/config.yaml --resume` finishes it: the step history continues without a gap or a
   duplicate, the loss goes down, the adapter and summary.json are written;
3. DPO from that adapter (`method: dpo`, `init_adapter`) on pairs of the same task (chosen = the pattern,
   rejected = the pattern with words swapped): DPO's 4-D prefix mask through SDPA on the card.

Recorded: exit codes, the step the signal stopped, losses, gradient norms, tokens/s, the first step's measured
peak beside the plan's (GPU), DPO reward accuracy and margin. ``--smoke`` runs the same on the CPU with the
emulated H100's profile (``--emulate h100 --cpu-emulation``), tiny shapes: the script works, nothing measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIGNAL_AFTER = 4  # train steps logged before SIGTERM
RESUME_MORE = 8  # steps the resumed run adds after the interrupted one
DPO_STEPS = 8
TIMEOUT_S = 240


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWCOMPAT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _train(args: list[str], device_args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hwcompat", "train", *args, *device_args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {TIMEOUT_S} s: {exc.stderr!r:.500}")


def _records(run: Path, kind: str = "train") -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _summary(run: Path) -> dict:
    try:
        return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def sft_interrupted(config: Path, run: Path, device_args: list[str]) -> dict:
    """Start SFT as a user does, SIGTERM it after SIGNAL_AFTER logged steps; what it left behind."""
    cmd = [sys.executable, "-m", "hwcompat", "train", str(config), "--overwrite", "max_steps=1000000", *device_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None and len(_records(run)) < SIGNAL_AFTER:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    step = int(checkpoints[-1].split("-")[1]) if checkpoints else 0
    return {"exit_code": proc.returncode, "checkpoint_step": step, "checkpoints": checkpoints,
            "said_how_to_resume": "resume with: hwcompat train" in err, "stderr_tail": err[-1200:]}


def sft_resumed(run: Path, until: int, device_args: list[str]) -> dict:
    res = _train([str(run / "config.yaml"), "--resume", f"max_steps={until}"], device_args)
    records, summary = _records(run), _summary(run)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    norms = [r.get("grad_norm", 0.0) for r in records]
    return {"exit_code": res.returncode, "steps": summary.get("steps"), "history_continuous": steps == list(
        range(1, until + 1)), "losses": losses, "grad_norms": norms, "finite": _finite(losses + norms),
        "learns": _learns(losses), "tokens_per_s": summary.get("tokens_per_s"),
        "first_step_peak_bytes": summary.get("first_step_peak_bytes"),
        "planned_allocated_bytes": summary.get("planned_allocated_bytes"),
        "planned_peak_bytes": summary.get("planned_peak_bytes"), "dtype": summary.get("dtype"),
        "attention": summary.get("attention"), "compile_backend": summary.get("compile_backend"),
        "profile": summary.get("profile"), "adapter": (run / "adapter" / "adapter_model.safetensors").is_file(),
        "stderr_tail": res.stderr[-1200:] if res.returncode else ""}


def write_pairs(work: Path, train_rows: Path) -> tuple[Path, Path]:
    """The SFT task as preference pairs: the pattern is chosen, the pattern with eight words swapped rejected."""
    rows = [json.loads(x) for x in train_rows.read_text().splitlines()]
    gen = random.Random(2)
    pairs = []
    for r in rows:
        words = r["completion"].split()
        bad = list(words)
        for _ in range(8):
            i, j = gen.randrange(len(bad)), gen.randrange(len(bad))
            bad[i], bad[j] = bad[j], bad[i]
        if bad == words:
            bad[0] = "wrong"
        pairs.append({"prompt": r["prompt"], "chosen": " " + " ".join(words), "rejected": " " + " ".join(bad)})
    train, evals = work / "pairs.jsonl", work / "pairs-eval.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in pairs[:56]))
    evals.write_text("".join(json.dumps(p) + "\n" for p in pairs[56:]))
    return train, evals


def dpo(work: Path, sft_run: Path, device_args: list[str]) -> dict:
    config = json.loads((work / "selftest.yaml").read_text())
    train, evals = write_pairs(work, work / "train.jsonl")
    run = work / "dpo"
    config.update(method="dpo", init_adapter=str(sft_run / "adapter"), train_data=[str(train)],
                  eval_data=[str(evals)], output_dir=str(run), max_steps=DPO_STEPS, learning_rate=5e-4,
                  micro_batch_size=2, beta=0.1)
    path = work / "dpo.yaml"
    path.write_text(json.dumps(config, indent=2))
    res = _train([str(path), "--overwrite"], device_args)
    records, summary = _records(run), _summary(run)
    losses = [r["loss"] for r in records]
    after = summary.get("eval_after", {})
    return {"exit_code": res.returncode, "steps": summary.get("steps"), "losses": losses, "finite": _finite(losses),
            "reward_accuracy": after.get("reward_accuracy"), "reward_margin": after.get("reward_margin"),
            "eval_loss": after.get("eval_loss"), "tokens_per_s": summary.get("tokens_per_s"),
            "first_step_peak_bytes": summary.get("first_step_peak_bytes"),
            "planned_allocated_bytes": summary.get("planned_allocated_bytes"),
            "stderr_tail": res.stderr[-1200:] if res.returncode else ""}


def _finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def _learns(losses: list[float]) -> bool:
    n = max(1, min(3, len(losses) // 3))
    return len(losses) >= 2 and sum(losses[-n:]) / n < 0.7 * sum(losses[:n]) / n


def verdict(sft_stop: dict, sft: dict, pref: dict) -> bool:
    return (sft_stop["exit_code"] == 143 and sft_stop["checkpoint_step"] >= SIGNAL_AFTER - 1
            and sft["exit_code"] == 0 and sft["history_continuous"] and sft["finite"] and sft["learns"]
            and sft["adapter"] and pref["exit_code"] == 0 and pref["finite"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="the emulated H100's profile on the CPU, tiny shapes")
    args = ap.parse_args()
    import torch

    from hwcompat.selftest import SelftestOptions, write_inputs

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        print("recipe_gpu: no GPU (use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    device_args = [] if on_gpu else ["--emulate", "h100", "--cpu-emulation"]
    name = torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke, emulated h100 profile)"
    with tempfile.TemporaryDirectory(prefix="hwcompat-recipe-") as tmp:
        work = Path(tmp)
        config = write_inputs(work, on_gpu, SelftestOptions(steps=SIGNAL_AFTER + RESUME_MORE))
        run = work / "run"
        stop = sft_interrupted(config, run, device_args)
        sft = sft_resumed(run, stop["checkpoint_step"] + RESUME_MORE, device_args) if stop["checkpoint_step"] else {
            "exit_code": None, "history_continuous": False, "finite": False, "learns": False, "adapter": False}
        pref = dpo(work, run, device_args) if sft.get("adapter") else {"exit_code": None, "finite": False}
    report = {"benchmark": "recipe_gpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": name, "smoke": args.smoke, "torch": torch.__version__, "sft_sigterm": stop,
              "sft_resume": sft, "dpo": pref, "passed": verdict(stop, sft, pref)}
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = Path(args.out or ROOT / "bench" / "results" / f"recipe-gpu-{'smoke' if args.smoke else slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"SFT: SIGTERM -> exit {stop['exit_code']}, checkpoint at step {stop['checkpoint_step']}; "
          f"resume -> exit {sft['exit_code']}, steps {sft.get('steps')}, continuous {sft['history_continuous']}, "
          f"loss {(sft.get('losses') or [0])[0]:.3f} -> {(sft.get('losses') or [0])[-1]:.3f}")
    print(f"DPO: exit {pref['exit_code']}, reward accuracy {pref.get('reward_accuracy')}, "
          f"margin {pref.get('reward_margin')}")
    print(f"{'PASS' if report['passed'] else 'FAIL'}  wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
