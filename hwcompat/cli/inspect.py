"""``hwcompat generate RUN_DIR "prompt"`` and ``hwcompat eval RUN_DIR --data FILE``: look at a finished run.

Both run in a fresh process with the run's profile environment (as training did), so the adapter is
used on the same dtype, attention kernel and chat template it was trained with. Never imports torch here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hwcompat.errors import InputError
from hwcompat.choices import Finetune


def add_parsers(sub) -> None:
    g = sub.add_parser("generate", help="answer prompts with a finished run's adapter (greedy or sampled)",
                       description="Example: hwcompat generate runs/demo \"Extract: Ada Lovelace met Babbage\"")
    g.add_argument("run_dir", help="a run folder with adapter/ and run.json")
    g.add_argument("prompt", nargs="?", help="one prompt (a user message)")
    g.add_argument("--file", help="JSONL with \"prompt\" or \"messages\" per line; prints JSONL {prompt, output}")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run_generate)
    e = sub.add_parser("eval", help="a finished run's metrics on any data file, adapter vs base, without training",
                       description="Task metrics (and eval loss / DPO reward accuracy) of the run's adapter and of "
                                   "its base on --data, side by side.")
    e.add_argument("run_dir", help="a run folder with adapter/ and run.json")
    e.add_argument("--data", help="JSONL in the run's data format (SFT rows or preference pairs)")
    e.add_argument("--general", action="store_true",
                   help="forgetting: KL of the adapted model from its base on 100 bundled general prompts, and the "
                        "base's own answers' likelihood under both (kept in summary.json)")
    e.add_argument("--predictions", metavar="OUT.jsonl",
                   help="write each --data row's prompt, reference, the model's answer and its metrics")
    e.add_argument("--pairs", metavar="OUT.jsonl",
                   help="write DPO preference pairs from --data: chosen = the reference, rejected = the model's "
                        "wrong answer, or for a row it gets right its likeliest wrong sample (diverse pairs)")
    e.add_argument("--samples", type=int, default=4, help="--pairs: answers sampled per right row (default 4)")
    e.add_argument("--seed", type=int, default=0, help="--pairs: the sampling seed")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --predictions / --pairs file")
    e.set_defaults(func=run_eval)


def _exec(request) -> int:
    """Start the inspecting process with the run's profile environment and the checked request (one JSON value)."""
    from hwcompat.train.spec import load_spec

    run = Path(request.run_dir)
    if not (run / "run.json").exists():
        raise InputError(f"{run}: not a run folder (no run.json); give the output_dir of a `hwcompat train` run")
    spec = load_spec(run / "run.json")
    full = spec.config.finetune == Finetune.full
    if not ((run / "model" / "config.json").exists() if full else (run / "adapter" / "adapter_model.safetensors"
                                                                   ).exists()):
        raise InputError(f"{run}: no {'model' if full else 'adapter'}/ yet (the run has not finished); train it to "
                         "the end first")
    env = {**os.environ, **spec.profile.env, "HF_HUB_OFFLINE": "1"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "hwcompat.train.inspect_run", request.to_json()], env)
    return 0  # not reached


def run_generate(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.file is None):
        raise InputError("generate: give one prompt, or --file prompts.jsonl (not both)")
    if args.file and not Path(args.file).exists():  # a file or a save_to_disk folder; the reader checks which
        raise InputError(f"--file {args.file}: not found")
    from hwcompat.sampling import check_temperature
    from hwcompat.textcheck import text_problem

    check_temperature(args.temperature)
    if args.prompt is not None and text_problem(args.prompt):
        raise InputError(f"generate: the prompt: {text_problem(args.prompt)}")
    if args.max_new_tokens < 1 or not 0 < args.top_p <= 1:
        raise InputError("generate: --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    from hwcompat.train.inspect_run import Request

    return _exec(Request("generate", args.run_dir, prompt=args.prompt, file=args.file,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed))


def run_eval(args: argparse.Namespace) -> int:
    if not args.data and not args.general:
        raise InputError("eval: give --data FILE (task metrics), --general (forgetting), or both")
    if args.data and not Path(args.data).exists():
        raise InputError(f"--data {args.data}: not found")
    from hwcompat.train.inspect_run import Request

    return _exec(Request("eval", args.run_dir, data=args.data, general=args.general, seed=args.seed,
                         samples=args.samples, **_outputs(args)))


def _outputs(args: argparse.Namespace) -> dict[str, str]:
    """--predictions / --pairs: need --data, two different files, none replaced without --overwrite."""
    named = [(flag, getattr(args, flag)) for flag in ("predictions", "pairs") if getattr(args, flag)]
    if not named:
        return {}
    if not args.data:
        raise InputError(f"eval --{named[0][0]}: give --data FILE, the rows to answer")
    if args.samples < 1:
        raise InputError("eval --samples: at least 1")
    paths = [Path(p).resolve() for _, p in named]
    if len(set(paths)) < len(paths) or Path(args.data).resolve() in paths:
        raise InputError("eval: --predictions, --pairs and --data must be three different files")
    for flag, path in named:
        if os.path.lexists(path) and not args.overwrite:
            raise InputError(f"eval --{flag} {path}: the file exists; pass --overwrite to replace it, or another name")
        if not Path(path).resolve().parent.is_dir():
            raise InputError(f"eval --{flag} {path}: its folder does not exist")
    return {flag: str(Path(p).resolve()) for flag, p in named}
