"""``hwcompat images list | render | build``: the per-architecture Docker images."""

from __future__ import annotations

import argparse
import sys

from hwcompat.choices import Vendor
from hwcompat.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("images", help="list, render and build the per-architecture Docker images")
    isub = p.add_subparsers(dest="images_command", metavar="list|render|build|run")
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
    rn = isub.add_parser("run", help="print the exact `docker run` for this machine's card (devices, user, mounts)",
                         description="Print the docker run command that trains CONFIG in the image for the detected "
                                     "card (or FAMILY): the card's devices and groups, your uid:gid, the config's "
                                     "folder read-only at /data, the output folder at /output, IPC, no network. "
                                     "Without a config: the demo.")
    rn.add_argument("family", nargs="?", metavar="FAMILY", help="image family (default: the detected card's)")
    rn.add_argument("--config", metavar="CONFIG.yaml", help="a `hwcompat train` config (default: run the demo)")
    rn.add_argument("--output", metavar="DIR", help="host folder mounted at /output (default: the config's folder, "
                                                    "so a relative output_dir lands where a host run puts it; the "
                                                    "demo: this folder)")
    rn.add_argument("--name", metavar="NAME", help="run detached as container NAME (`docker stop NAME` checkpoints "
                                                  "the run; `docker logs -f NAME` follows it)")
    rn.add_argument("args", nargs="*", metavar="ARG", help="more arguments for the command in the image, after --")
    from hwcompat.cli.common import add_device_options

    add_device_options(rn)
    rn.set_defaults(func=run_run, passthrough=True)


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


def run_run(args: argparse.Namespace) -> int:
    """The exact command, one line on stdout (what it mounts and why on stderr)."""
    from pathlib import Path

    from hwcompat import container
    from hwcompat.images import specs

    all_specs = specs()
    if args.family and ("=" in args.family or args.family.startswith("-")):  # `images run -- key=value` / `--resume`:
        args.args, args.family = [args.family, *args.args], None  # the command's first argument, not a family
    family = args.family or _detected_family(args)
    if family not in all_specs:
        raise InputError(f"unknown image family {family!r}; known: {', '.join(all_specs)}")
    spec = all_specs[family]
    reads: list[str] = []
    if args.config:
        from hwcompat.train.config import load_config

        config = Path(args.config).resolve()
        if not config.is_file():
            raise InputError(f"--config {args.config}: no such file")
        reads = container.outside_reads(load_config(config, require_data=False).config, config)
        command = ["train", f"{container.DATA}/{config.name}", *args.args]
        output = Path(args.output).resolve() if args.output else config.parent
    else:
        config, command = None, ["demo", *args.args]
        output = Path(args.output or ".").resolve()  # the demo's runs/demo lands where `hwcompat demo` puts it
    argv = container.docker_run(spec.tag, spec.profiles[0].vendor, command, config, output, reads, name=args.name)
    print(container.shell_line(argv))
    print(f"# {spec.tag}: {output} is /output (relative output_dir lands there)"
          + (f", {config.parent} is /data (read-only)" if config else "")
          + (f"; also read-only at the same path: {', '.join(sorted(set(reads)))}" if reads else "")
          + (f"; build it first: hwcompat images build {family}" if not _image_present(spec.tag) else ""),
          file=sys.stderr)
    return 0


def _detected_family(args: argparse.Namespace) -> str:
    """The image family of the first card with a profile, else the CPU image."""
    from hwcompat.cli.common import plan_from_args

    plan = plan_from_args(args)
    gpu = next((d for d in plan.devices if d.reading.vendor != Vendor.cpu and d.profile is not None), None)
    return gpu.profile.image_family if gpu else "cpu"


def _image_present(tag: str) -> bool:
    import shutil
    import subprocess

    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
