"""The container contract: where an image reads and writes, as whom, and the exact ``docker run`` for a card.

    /data    your config's folder, mounted read-only: the config's relative paths (data, model) resolve there
    /output  where runs go, writable: a relative ``output_dir`` lands here (HWCOMPAT_OUTPUT_ROOT, set by the image)
    /cache   caches (the demo model, Hugging Face's), writable by any user

The process runs as the user who started it (``--user UID:GID``, so a run's files on the host are theirs; the
image's own uid 1000 otherwise). ``hwcompat images run`` prints the whole command for the detected card, so a
user never assembles devices, groups, mounts and shared memory by hand; every way it can fail inside the image
(an unwritable output mount, an output_dir outside it) is one line that says what to change.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hwcompat import envvars
from hwcompat.choices import Vendor
from hwcompat.errors import InputError

DATA, OUTPUT, CACHE = "/data", "/output", "/cache"
#: A named volume for /cache: the demo model is prepared once, not in every container
CACHE_VOLUME = "hwcompat-cache"
#: Config keys that name a file or folder to read: mounted read-only at the same path when outside /data.
READ_KEYS = ("model", "tokenizer", "init_adapter", "train_data", "eval_data")
#: Commands that write a run (the entrypoint checks the output mount before them).
WRITERS = ("train", "demo", "merge", "export")


def output_root() -> str | None:
    """The image's output mount (HWCOMPAT_OUTPUT_ROOT), or None outside an image."""
    return envvars.get("HWCOMPAT_OUTPUT_ROOT") or None


def output_dir(value: str, config_dir: Path, root: str | None) -> str:
    """A config file's ``output_dir``: relative to the config's folder on a host; in an image relative to the output
    mount (the config's folder is the read-only /data there), and an absolute one must be inside it."""
    if root is None:
        return value if os.path.isabs(value) else os.path.abspath(config_dir / value)
    if not os.path.isabs(value):
        return os.path.abspath(os.path.join(root, value))
    inside = PurePosixPath(os.path.normpath(value)).is_relative_to(root)
    if not inside:
        raise InputError(f"output_dir {value}: in the image a run is written under {root} (your mounted output "
                         f"folder); give a relative output_dir (it lands in {root}/...) or one under {root}")
    return value


def unwritable(root: str) -> str | None:
    """Why the process cannot write the output mount, in one line with the fix; None when it can."""
    if os.access(root, os.W_OK):
        return None
    try:
        st = os.stat(root)
        owner = f"owned by uid {st.st_uid}:{st.st_gid}"
    except OSError:
        owner = "missing"
    return (f"{root} is not writable by this container's user (uid {os.getuid()}:{os.getgid()}; the mount is {owner}): "
            "run with --user \"$(id -u):$(id -g)\" so the run's files are yours (`hwcompat images run` prints the "
            f"whole command), or make the host folder writable by uid {os.getuid()}")


@dataclass(frozen=True)
class Devices:
    """What a vendor's card needs inside a container (the host's device nodes and their groups)."""

    flags: tuple[str, ...]

    @staticmethod
    def for_vendor(vendor: str) -> "Devices":
        if vendor == Vendor.nvidia:
            return Devices(("--gpus", "all"))
        if vendor == Vendor.amd:  # ROCm: the compute node and the render nodes, with the groups that may open them
            return Devices(("--device=/dev/kfd", "--device=/dev/dri", *_groups("/dev/kfd", "/dev/dri/renderD128",
                                                                              default="video")))
        if vendor == Vendor.intel:
            return Devices(("--device=/dev/dri", *_groups("/dev/dri/renderD128", default="render")))
        return Devices(())


def _groups(*nodes: str, default: str) -> tuple[str, ...]:
    """``--group-add`` for each node's group on this host (numeric: the image has no such names), else ``default``."""
    gids = []
    for node in nodes:
        try:
            gid = os.stat(node).st_gid
        except OSError:
            continue
        if gid and str(gid) not in gids:
            gids.append(str(gid))
    out: list[str] = []
    for g in gids or [default]:
        out += ["--group-add", g]
    return tuple(out)


def docker_run(tag: str, vendor: str, command: list[str], config: Path | None, output: Path,
               reads: list[str] = (), uid: int | None = None, gid: int | None = None,
               name: str | None = None) -> list[str]:
    """The ``docker run`` argv: the card's devices, this user, /data (the config's folder, read-only), /output,
    every file the config reads from outside its folder at the same path (read-only), a named volume for /cache,
    IPC for the data loaders' shared memory, no network (the trainer is offline by design), and the command."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    detached = ["--detach", "--name", name] if name else []  # `docker stop NAME` checkpoints the run
    argv = ["docker", "run", "--rm", *detached, "--network", "none", "--ipc=host", "--user", f"{uid}:{gid}",
            *Devices.for_vendor(vendor).flags]
    if config is not None:
        argv += ["-v", f"{config.parent}:{DATA}:ro"]
    argv += ["-v", f"{output}:{OUTPUT}", "-v", f"{CACHE_VOLUME}:{CACHE}"]
    for path in sorted(set(reads)):
        argv += ["-v", f"{path}:{path}:ro"]
    return argv + [tag, *command]


def outside_reads(cfg, config: Path) -> list[str]:
    """The config's absolute read paths outside its own folder (existing): they are mounted where they are."""
    out = []
    for key in READ_KEYS:
        values = getattr(cfg, key)
        for v in values if isinstance(values, list) else [values]:
            if v and os.path.isabs(v) and os.path.exists(v) and not Path(v).is_relative_to(config.parent):
                out.append(str(Path(v) if os.path.isdir(v) else Path(v).parent))
    return out


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
