"""``hwcompat doctor``: is the installed stack right for each card? Exit 1 when something blocks training."""

from __future__ import annotations

import argparse
import os

from hwcompat.cli.common import add_device_options, plan_from_args, print_json

MARK = {"error": "ERROR", "warning": "warn ", "info": "info ", "ok": "ok   "}


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check torch, drivers, kernels and environment against each device",
                       description="Reads torch's version, build and compiled arch list (never allocates on a "
                                   "device) and checks them against each device's profile. Exit 0 when nothing "
                                   "blocks training, 1 when something does.")
    add_device_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwcompat import doctor

    plan = plan_from_args(args)
    stack = doctor.gather_stack()
    shm, container = doctor.host_facts()
    intel = doctor.intel_facts() if any(d.reading.vendor == "intel" for d in plan.devices) else None
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
