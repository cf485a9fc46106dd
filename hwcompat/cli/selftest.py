"""``hwcompat selftest``: a short real `hwcompat train` run on this card with its profile: PASS/FAIL and speed."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from hwcompat.choices import Vendor
from hwcompat.cli.common import plan_from_args, print_json
from hwcompat.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("selftest", help="a short real `hwcompat train` run on this card with its profile: "
                                        "PASS/FAIL, tokens/s, TFLOP/s, MFU")
    p.add_argument("--device", metavar="N", help="device position from `hwcompat detect` (default: first GPU)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result here (CI artifacts)")
    p.add_argument("--keep", metavar="DIR", help="build the model, data and run in DIR (a new folder) and keep them")
    p.add_argument("--memory-limit", type=float, default=0.0, metavar="GIB",
                   help="use at most GIB of the card, as a smaller card of the family would have "
                        "(train's memory_limit_gib)")
    g = p.add_argument_group("devices")
    g.add_argument("--profile", metavar="NAME", help="force a profile family (its code path on this card)")
    g.add_argument("--emulate", metavar="NAME", help="an emulated card; with --cpu-emulation its profile runs on "
                                                     "the CPU (the plumbing, not the card)")
    g.add_argument("--cpu-emulation", action="store_true")
    p.set_defaults(func=run, emulate_file=None, set=[])


def _train_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags `hwcompat train` gets, so it picks the same device and profile as this command did."""
    out: list[str] = []
    for flag, value in (("--device", args.device), ("--profile", args.profile), ("--emulate", args.emulate)):
        if value:
            out += [flag, str(value)]
    if args.cpu_emulation:
        if not args.emulate:
            raise InputError("selftest --cpu-emulation: name the card to emulate with --emulate NAME")
        out.append("--cpu-emulation")
    return tuple(out)


def _keep(path: str | None) -> Path | None:
    if path is None:
        return None
    keep = Path(path)
    if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        raise InputError(f"selftest --keep {path}: not an empty folder; give a new folder (nothing in it is replaced)")
    keep.mkdir(parents=True, exist_ok=True)
    return keep


def run(args: argparse.Namespace) -> int:
    from hwcompat.doctor import pip_fix
    from hwcompat.errors import HwcompatError
    from hwcompat.pipeline.launch import training_device
    from hwcompat.selftest import SelftestOptions, render, run_selftest

    if args.steps < 5:
        raise InputError(f"selftest --steps {args.steps}: give at least 5 (3 warm-up steps are not timed)")
    plan = plan_from_args(args)
    _, device = training_device(plan, args.device)
    if device.profile is None:
        raise HwcompatError(f"{device.reading.name}: no profile to test ({'; '.join(device.problems)})")
    if device.reading.emulated and device.reading.vendor != Vendor.cpu and not args.cpu_emulation:
        raise InputError(f"{device.reading.name} is emulated: add --cpu-emulation to run its profile on the CPU")
    opts = SelftestOptions(steps=args.steps, keep=_keep(args.keep), train_args=_train_args(args),
                           memory_limit_gib=args.memory_limit)
    res = run_selftest(device, opts, fix_hint=pip_fix(device))
    data = res.to_dict()
    data["emulated"] = bool(device.reading.emulated)
    data["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data["host"] = {"driver": device.reading.driver_version, "runtime": device.reading.runtime_version,
                    "memory_bytes": device.reading.memory_bytes, "compute_capability": device.reading.compute_capability,
                    "gfx_target": device.reading.gfx_target}
    if args.out:
        from hwcompat.fsutil import atomic_write_json
        atomic_write_json(args.out, data)
    if args.json:
        print_json(data)
    else:
        print(render(res))
    return 0 if res.passed else 1
