"""``hwcompat env``: the environment a device's profile needs, for ``eval``.

Prints assignments; changes nothing in its own process.
"""

from __future__ import annotations

import argparse
import re
import shlex

from hwcompat.choices import Vendor
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
    p.add_argument("--install-torch", nargs="?", const="", metavar="VERSION",
                   help="print instead the pip command that installs the torch build this machine's card needs "
                        "(its wheel index; PyPI's wheel when that index cannot be reached), e.g. "
                        'eval "$(hwcompat env --install-torch 2.13.0)"')
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


def install_torch(plan, device_spec: str | None, version: str) -> str:
    """The card's torch install, for ``eval``: its profile's wheel index (a CPU machine: the CPU build, under 200 MB,
    not PyPI's CUDA build; then PyPI's wheel where that index is unreachable)."""
    if device_spec is None:  # the first card with a profile, else the CPU
        gpu = next((d for d in plan.devices if d.reading.vendor != Vendor.cpu and d.profile is not None), None)
        d = gpu or plan.devices[-1]
    else:
        _, d = select_device(plan, device_spec)
    p = d.profile
    if p is None:
        raise HwcompatError(f"{d.reading.name}: no profile, so no torch build to name: {'; '.join(d.problems)}")
    req = p.torch_install.split("'")[1]  # the profile's PEP 508 requirement (its release window, its extra)
    if version:
        if not re.fullmatch(r"\d+\.\d+(\.\d+)?", version):
            raise InputError(f"--install-torch {version}: not a release version; e.g. 2.13.0")
        if not _in_window(version, p.torch_min_version, p.torch_max_version):
            raise InputError(f"--install-torch {version}: the {p.name} profile needs {req}; give a version in that "
                             "window, or none for the newest")
        req = req.split(">")[0].split("<")[0] + f"=={version}"
    quoted = shlex.quote(req)
    line = f"python3 -m pip install {quoted} --index-url {p.torch_index_url}"
    # PyPI's wheel runs on any CPU (a CUDA build, several GB, but it runs): the CPU's fallback. A card's own build
    # has no stand-in there (PyPI's lacks pre-Turing kernels, ROCm, XPU): without its index, say so and stop
    return f"{line} || python3 -m pip install {quoted}" if d.reading.vendor == Vendor.cpu else line


def _mm(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split(".")[:2])


def _in_window(version: str, low: str | None, high: str | None) -> bool:
    return not (low and _mm(version) < _mm(low)) and not (high and _mm(version) > _mm(high))


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    if args.install_torch is not None:
        print(install_torch(plan, args.device, args.install_torch))
        return 0
    text = format_env(profile_env(plan, args.device), args.shell)
    if text:
        print(text)
    return 0
