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


def _read_host(args: argparse.Namespace):
    """Probe (or emulate) and gather the software facts: the resolver's inputs, with the raw overrides."""
    from hwcompat.probe import probe_host
    from hwcompat.software import installed

    names = [n.strip().lower() for n in args.emulate.split(",") if n.strip()] if args.emulate else None
    host = probe_host(emulate=names, emulate_file=args.emulate_file)
    overrides = {"profile": args.profile or envvars.get("HWCOMPAT_PROFILE"), "set": list(args.set),
                 "allow_env": list(getattr(args, "allow_env", []))}
    return host, installed(), overrides


def _resolve(host, software, overrides: dict[str, Any]):
    from hwcompat.profiles import load_profiles
    from hwcompat.resolve import Overrides, resolve_host

    parsed = Overrides.parse(overrides["profile"], overrides["set"], overrides["allow_env"])
    return resolve_host(host, load_profiles(), software, parsed)


def plan_from_args(args: argparse.Namespace):
    """Probe (or emulate), load profiles and resolve: the one path every command takes."""
    return _resolve(*_read_host(args))


def plan_dict_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``plan_from_args(args).to_dict()``, memoised by all its inputs (``hwcompat.cli.plancache``)."""
    from hwcompat.cli import plancache

    host, software, overrides = _read_host(args)
    return plancache.plan_dict(host, software, overrides, lambda: _resolve(host, software, overrides).to_dict())


def select_device(plan, spec: str | None):
    """--device N (position in the detect table) or VENDOR:INDEX; default: the first device."""
    return plan.select(spec)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")  # one write, not one per token


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
