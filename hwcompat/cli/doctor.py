"""``hwcompat doctor``: is the installed stack right for each card? Exit 1 when something blocks training."""

from __future__ import annotations

import argparse
import os

from hwcompat.choices import Vendor
from hwcompat.cli.common import add_device_options, plan_from_args, print_json

MARK = {"error": "ERROR", "warning": "warn ", "info": "info ", "ok": "ok   "}


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check torch, drivers, kernels and environment against each device",
                       description="Reads torch's version, build and compiled arch list (never allocates on a "
                                   "device) and checks them against each device's profile. Exit 0 when nothing "
                                   "blocks training, 1 when something does.")
    add_device_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--numerics", action="store_true",
                   help="run the numerics check alone: a matmul, the attention kernel, a norm and one decoder layer "
                        "forward and backward on the training device, in its profile's dtype, against float64 on "
                        "the CPU (what `hwcompat train` runs before the first step on a GPU)")
    p.add_argument("--model", metavar="DIR", help="--numerics: check a layer of this model's shape (its config.json)")
    p.add_argument("--device", metavar="N", help="--numerics: the device (detect's #); default: the first GPU")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwcompat import doctor

    plan = plan_from_args(args)
    if args.numerics:
        return run_numerics(args, plan)
    stack = doctor.gather_stack()
    shm, container = doctor.host_facts()
    intel = doctor.intel_facts() if any(d.reading.vendor == Vendor.intel for d in plan.devices) else None
    findings = doctor.diagnose(plan, stack, dict(os.environ), shm, container, intel)
    if args.json:
        print_json(doctor.to_dict(findings, stack))
    else:
        for f in findings:
            print(f"{MARK[f.severity]}  {f.message}")
            if f.fix and f.severity != "ok":
                print(f"       fix: {f.fix}")
        errors = sum(f.severity == "error" for f in findings)
        print(f"\n{errors} blocking problem(s)" if errors else "\nnothing blocks training")
    return 1 if any(f.severity == "error" for f in findings) else 0


def run_numerics(args: argparse.Namespace, plan) -> int:
    """The check in a fresh process with the device's profile environment (as training runs), so the kernels
    checked are the ones training would use."""
    import subprocess
    import sys

    from hwcompat.errors import InputError
    from hwcompat.pipeline.launch import training_device
    from hwcompat.pipeline.processes import child_env

    pos, device = training_device(plan, args.device)
    if device.profile is None:
        raise InputError(f"--numerics: {device.reading.name} has no profile ({'; '.join(device.problems)})")
    if device.reading.emulated and device.reading.vendor != Vendor.cpu:
        raise InputError(f"--numerics: {device.reading.name} is emulated: there is no card to compute on")
    p = device.profile
    kind = device.reading.facts.torch_device
    print(f"numerics: device {pos} {device.reading.name}, profile {p.name} ({p.dtype}, attention {p.attention})")
    cmd = [sys.executable, "-m", "hwcompat.train.numerics", kind, p.dtype, p.attention]
    if args.model:
        cmd.append(args.model)
    return subprocess.run(cmd, env=child_env(p, device, None)).returncode
