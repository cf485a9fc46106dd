"""``hwcompat selftest [--device N] [--json]``: train a small model on the real card with its profile."""

from __future__ import annotations

import argparse
import os
import sys

from hwcompat.cli.common import plan_from_args, print_json

MARKER = "HWCOMPAT_SELFTEST_CHILD"


def add_parser(sub) -> None:
    p = sub.add_parser("selftest", help="a short real training run on this card with its profile: PASS/FAIL, "
                                        "tokens/s, TFLOP/s, MFU")
    p.add_argument("--device", metavar="N", help="device position from `hwcompat detect` (default: first GPU)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result here (CI artifacts)")
    g = p.add_argument_group("devices")
    g.add_argument("--profile", metavar="NAME", help="force a profile family")
    p.set_defaults(func=run, emulate=None, emulate_file=None, set=[])


def run(args: argparse.Namespace) -> int:
    from hwcompat.doctor import pip_fix
    from hwcompat.errors import HwcompatError
    from hwcompat.pipeline.launch import VISIBILITY, training_device

    plan = plan_from_args(args)
    _, device = training_device(plan, args.device)
    if device.profile is None:
        raise HwcompatError(f"{device.reading.name}: no profile to test ({'; '.join(device.problems)})")
    env = dict(device.profile.env)
    var = VISIBILITY.get(device.reading.vendor)
    if var:
        env[var] = str(device.reading.index)
    if os.environ.get(MARKER) != "1" and any(os.environ.get(k) != v for k, v in env.items()):
        # The profile environment must exist before torch is imported: re-exec with it.
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "hwcompat", *sys.argv[1:]],
                  {**os.environ, **env, MARKER: "1"})
    from hwcompat.selftest import render, run_selftest

    res = run_selftest(device, steps=args.steps, fix_hint=pip_fix(device))
    data = res.to_dict()
    data["profile_env"] = env
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
