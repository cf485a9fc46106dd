"""``hwcompat merge RUN_DIR|ADAPTER --base MODEL_DIR --out DIR``: stream-merge LoRA into the base."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hwcompat.profiles import Dtype


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model, one tensor at a time",
                       description="Peak memory is the largest tensor plus the adapter, not the model. "
                                   "The output loads with plain transformers.")
    p.add_argument("adapter", help="a run folder (uses its adapter/) or an adapter folder")
    p.add_argument("--base", help="the unquantised base model folder (default: the run's model)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=[d.value for d in Dtype], help="default: the base's dtype")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda to compute the deltas on a GPU")
    p.add_argument("--force", action="store_true", help="merge even if the adapter names another base model, or "
                                                         "its run's regression guard flagged it")
    p.set_defaults(func=run)


def base_from_run(adapter: str) -> str | None:
    from hwcompat.train.rundir import recorded_config

    if (Path(adapter) / "run.json").exists():
        model = recorded_config(Path(adapter), "merge").get("model")
        return model if isinstance(model, str) and model else None
    return None


def run(args: argparse.Namespace) -> int:
    from hwcompat.errors import InputError
    from hwcompat.merge import merge

    base = args.base or base_from_run(args.adapter)
    if not base:
        raise InputError("--base: required unless the first argument is a hwcompat run folder")
    out = merge(args.adapter, base, args.out, args.dtype, args.device, args.force,
                log=lambda m: print(m, file=sys.stderr))
    print(f"merged model: {out}")
    return 0
