"""``hwcompat env``: the environment a device's profile needs, for ``eval``.

Prints assignments; changes nothing in its own process.
"""

from __future__ import annotations

import argparse
import re
import shlex

from hwcompat.cli.common import add_device_options, plan_from_args, select_device
from hwcompat.errors import HwcompatError, InputError


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print the environment a device's profile needs",
                       description='Print the profile environment, e.g. eval "$(hwcompat env)". '
                                   "With --device, the process is also pinned to that device.")
    add_device_options(p)
    p.add_argument("--device", metavar="N", help="device position from `hwcompat detect` (or VENDOR:INDEX); "
                                                 "default: the first device")
    p.add_argument("--shell", choices=("bash", "fish", "dotenv"), default="bash")
    p.set_defaults(func=run)


def profile_env(plan, device_spec: str | None) -> dict[str, str]:
    _, d = select_device(plan, device_spec)
    if d.profile is None:
        raise HwcompatError(f"{d.reading.name}: no profile to apply: {'; '.join(d.problems)}")
    env = dict(d.profile.env)
    if device_spec is not None:
        env.update(d.reading.facts.pin([d.reading.index]))
    return env


#: Values every reader takes literally without quotes (the set shlex.quote leaves alone).
_PLAIN = re.compile(r"[\w@%+=:,./-]+")


def _fish_quote(value: str) -> str:
    """fish single quotes: only \\ and \' are escapes inside them (POSIX shlex quoting is not fish's)."""
    if _PLAIN.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dotenv_quote(name: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise InputError(f"{name}: a value with a line break cannot be written as dotenv; use --shell bash")
    if _PLAIN.fullmatch(value):
        return value
    # inside POSIX double quotes \, ", $ and ` keep a meaning (` runs a command): each is escaped
    return '"' + re.sub(r'([\\"$`])', r"\\\1", value) + '"'


def format_env(env: dict[str, str], shell: str) -> str:
    """Assignments for ``eval`` (bash), fish's ``source`` or a dotenv file, each quoted for that reader."""
    if shell == "fish":
        return "\n".join(f"set -gx {k} {_fish_quote(v)};" for k, v in env.items())
    if shell == "dotenv":
        return "\n".join(f"{k}={_dotenv_quote(k, v)}" for k, v in env.items())
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    text = format_env(profile_env(plan, args.device), args.shell)
    if text:
        print(text)
    return 0
