"""Options shared by every command that looks at devices."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hwcompat import envvars


def add_device_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument("--emulate", metavar="NAME[,NAME…]",
                   help="pretend these catalog devices are installed (e.g. m40,rx6600); env HWCOMPAT_EMULATE")
    g.add_argument("--emulate-file", metavar="FILE",
                   help="pretend the devices in this YAML list of readings are installed; env HWCOMPAT_EMULATE_FILE")
    g.add_argument("--profile", metavar="NAME", help="force this profile family for the GPUs; env HWCOMPAT_PROFILE")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one choice: dtype=, attention=, compile_backend=, env.NAME= (repeatable)")
    g.add_argument("--allow-env", action="append", default=[], metavar="NAME",
                   help="allow --set env.NAME for a variable that changes which code runs (LD_PRELOAD, PYTHONPATH …)")


def plan_from_args(args: argparse.Namespace):
    """Probe (or emulate), load profiles and resolve: the one path every command takes."""
    from hwcompat.probe import probe_host
    from hwcompat.profiles import load_profiles
    from hwcompat.resolve import Overrides, resolve_host
    from hwcompat.software import installed

    names = [n.strip().lower() for n in args.emulate.split(",") if n.strip()] if args.emulate else None
    host = probe_host(emulate=names, emulate_file=args.emulate_file)
    overrides = Overrides.parse(args.profile or envvars.get("HWCOMPAT_PROFILE"), args.set,
                                getattr(args, "allow_env", []))
    return resolve_host(host, load_profiles(), installed(), overrides)


def select_device(plan, spec: str | None):
    """--device N (position in the detect table) or VENDOR:INDEX; default: the first device."""
    return plan.select(spec)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
