"""Image entrypoint: detect, check the device belongs to this image, apply its profile, exec hwcompat.

    docker run --gpus all -v $PWD:/data hwcompat:maxwell train /data/config.yaml

The image carries one torch build; a card of another family would fail
later with "no kernel image is available", so a mismatch is refused here
with the tag to use (HWCOMPAT_ALLOW_MISMATCH=1 runs anyway). The profile
environment goes into this process before exec, so `hwcompat train` and
the trainer it execs (and `docker stop`'s SIGTERM) see it directly.
"""

from __future__ import annotations

import os
import sys

from hwcompat import container, envvars
from hwcompat.choices import Vendor

NEEDS_GPU = {"train", "selftest", "demo"}
SHELLS = {"shell", "bash", "sh"}
GPU_HINT = ("no GPU is visible in this container: NVIDIA needs `docker run --gpus all`, AMD needs "
            "`--device=/dev/kfd --device=/dev/dri --group-add video`, Intel needs `--device=/dev/dri --group-add "
            "\"$(stat -c %g /dev/dri/renderD128)\"`")


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in the command the image was given."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _emulate_arg(args: list[str]) -> list[str] | None:
    value = _option(args, "--emulate")
    return [n.strip() for n in value.split(",") if n.strip()] if value is not None else None


def decide(plan, family: str | None, command: str, allow_mismatch: bool) -> tuple[int, str, dict[str, str]]:
    """(exit code or 0, message, environment to apply). Pure, for tests."""
    gpus = [d for d in plan.devices if d.reading.vendor != Vendor.cpu]
    cpu = plan.devices[-1]
    if family is None:
        return 0, "not in a hwcompat image (HWCOMPAT_IMAGE_FAMILY unset): no family check", {}
    if family != "cpu" and not gpus:
        if command in NEEDS_GPU and not allow_mismatch:
            return 2, f"hwcompat:{family}: {GPU_HINT}", {}
        return 0, f"warning: hwcompat:{family}: {GPU_HINT}", dict(cpu.profile.env) if cpu.profile else {}
    wrong = [d for d in gpus if d.profile is None or d.profile.image_family != family]
    if family == "cpu" and gpus:
        wrong = gpus
    if wrong:
        lines = []
        for d in wrong:
            if d.profile is None:
                lines.append(f"{d.reading.name}: no hwcompat image supports it ({'; '.join(d.problems)})")
            else:
                lines.append(f"{d.reading.name} ({d.arch}) needs {d.profile.image}")
        msg = f"this is the hwcompat:{family} image, but " + "; ".join(lines)
        if not allow_mismatch:
            return 2, msg + ". Run that image instead (HWCOMPAT_ALLOW_MISMATCH=1 runs this one anyway)", {}
        msg = "warning: " + msg + " (HWCOMPAT_ALLOW_MISMATCH=1: running anyway)"
    else:
        msg = ""
    chosen = next((d for d in gpus if d.profile and d.profile.image_family == family), None)
    if chosen is None:
        chosen = gpus[0] if gpus and gpus[0].profile else cpu
    return 0, msg, dict(chosen.profile.env) if chosen.profile else {}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or ["detect"]
    if args[0] in SHELLS:
        os.execvp("/bin/bash", ["/bin/bash", *args[1:]])
    from hwcompat.errors import HwcompatError
    from hwcompat.probe import probe_host
    from hwcompat.profiles import load_profiles
    from hwcompat.resolve import resolve_host
    from hwcompat.software import installed

    try:
        host = probe_host(emulate=_emulate_arg(args), emulate_file=_option(args, "--emulate-file"))
        plan = resolve_host(host, load_profiles(), installed())
    except HwcompatError as exc:
        print(f"hwcompat: error: {exc}", file=sys.stderr)
        return exc.exit_code
    family = envvars.get("HWCOMPAT_IMAGE_FAMILY") or None
    code, msg, env = decide(plan, family, args[0], envvars.get("HWCOMPAT_ALLOW_MISMATCH") == "1")
    if not code and args[0] in container.WRITERS and container.output_root():
        why = container.unwritable(container.output_root())
        if why:
            code, msg = 2, why
    if msg:
        print(msg if msg.startswith("warning") else f"hwcompat: error: {msg}" if code else msg, file=sys.stderr)
    if code:
        return code
    os.environ.update(env)
    sys.stdout.flush()
    os.execvp(sys.executable, [sys.executable, "-m", "hwcompat", *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
