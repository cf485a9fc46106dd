"""``hwcompat images list | render | build``: the per-architecture Docker images."""

from __future__ import annotations

import argparse
import sys

from hwcompat.errors import HwcompatError, InputError


def add_parser(sub) -> None:
    p = sub.add_parser("images", help="list, render and build the per-architecture Docker images")
    isub = p.add_subparsers(dest="images_command", metavar="list|render|build")
    isub.required = True
    ls = isub.add_parser("list", help="image families, tags, bases and the profiles each serves")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    r = isub.add_parser("render", help="write images/<family>/Dockerfile from the profiles")
    r.add_argument("--check", action="store_true", help="exit 1 if a committed Dockerfile differs from the render")
    r.set_defaults(func=run_render)
    b = isub.add_parser("build", help="build images through the Docker engine")
    b.add_argument("families", nargs="*", metavar="FAMILY", help="default: all")
    b.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. BASE_IMAGE=debian:bookworm, TORCH_SPEC=torch==2.13.0")
    b.add_argument("--network", default="default", help="build network (CI uses none)")
    b.set_defaults(func=run_build)


def run_list(args: argparse.Namespace) -> int:
    from hwcompat.images import specs

    rows = [{"family": s.family, "tag": s.tag, "base": s.base, "torch": s.torch_spec,
             "profiles": [p.name for p in s.profiles]} for s in specs().values()]
    if args.json:
        from hwcompat.cli.common import print_json
        print_json(rows)
        return 0
    w = max(len(r["tag"]) for r in rows)
    for r in rows:
        print(f"{r['tag'].ljust(w)}  {r['base']:45} {r['torch']:22} {','.join(r['profiles'])}")
    return 0


def run_render(args: argparse.Namespace) -> int:
    from hwcompat.images import render_all

    stale = render_all(check=args.check)
    if args.check:
        for s in stale:
            print(f"stale: {s} (run `hwcompat images render`)", file=sys.stderr)
        return 1 if stale else 0
    for s in stale:
        print(f"wrote {s}")
    if not stale:
        print("all Dockerfiles up to date")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from hwcompat.images import build

    build_args = {}
    for item in args.build_arg:
        k, sep, v = item.partition("=")
        if not sep:
            raise InputError(f"--build-arg {item!r}: expected KEY=VALUE, e.g. --build-arg BASE_IMAGE=debian:bookworm")
        build_args[k] = v
    for tag in build(args.families, build_args, network=args.network):
        print(f"built {tag}")
    return 0
