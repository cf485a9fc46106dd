"""The trainer's processes: how many, on which devices, with what environment and allocator, and the exec that
replaces the CLI with them (torchrun for several devices or machines).

The profile environment (allocator, TORCHDYNAMO_DISABLE, HSA_OVERRIDE_GFX_VERSION …) must exist before torch is
first imported, so the trainer runs in a fresh process; ``exec``, so signals such as ``docker stop`` reach it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hwcompat.choices import Vendor
from hwcompat.errors import InputError
from hwcompat.readings import VENDOR_FACTS
from hwcompat.resolve import HostPlan, ResolvedDevice, ResolvedProfile
from hwcompat.train.rundir import RunDir


def process_count(devices: str | None, plan: HostPlan, pos: int, device: ResolvedDevice
                  ) -> tuple[int, list[int] | None]:
    """--devices: how many processes, and which device indices they see (None on the CPU)."""
    if not devices:
        return 1, None
    group = next((g for g in plan.groups if pos in g["devices"]), None)
    members = group["devices"] if group else [pos]
    if devices == "all":
        n = len(members)
    elif devices.isdigit() and int(devices) > 0:
        n = int(devices)
        if device.reading.vendor != Vendor.cpu and n > len(members):
            raise InputError(f"--devices {n}: only {len(members)} identical {device.arch} device(s) here")
    else:
        raise InputError(f"--devices {devices}: use 'all' or a positive number")
    if device.reading.vendor == Vendor.cpu:
        return n, None
    return n, [plan.devices[i].reading.index for i in members[:n]]


def cpu_allocator(setting: str, on_cpu: bool, environ: dict[str, str] | None = None,
                  dirs: list[Path] | None = None) -> tuple[dict[str, str], str]:
    """The worker's malloc on a CPU run: (variables to set, a line for the log). tcmalloc where installed halves
    the trainer's peak memory (probe/malloc.py says why); a preload the user set is kept."""
    from hwcompat.probe import malloc

    if not on_cpu:
        return {}, ""
    env = os.environ if environ is None else environ
    preload = env.get("LD_PRELOAD", "")
    theirs = [x for x in preload.replace(" ", ":").split(":") if "malloc" in Path(x).name]
    if setting == "system":
        if not theirs:
            return {}, ""
        rest = ":".join(x for x in preload.replace(" ", ":").split(":") if x and x not in theirs)
        return {"LD_PRELOAD": rest}, (f"allocator: the system malloc, as cpu_allocator=system asks (the trainer "
                                      f"runs without {', '.join(theirs)} from your LD_PRELOAD)")
    if theirs:  # tcmalloc, jemalloc, mimalloc: the user chose one
        return {}, f"allocator: the user's LD_PRELOAD ({preload})"
    lib = malloc.find_tcmalloc(dirs)
    if lib is not None and not malloc.loads(lib):
        hint = malloc.install_hint()
        if setting == "tcmalloc":
            raise InputError(f"cpu_allocator=tcmalloc: {lib} cannot be preloaded (damaged, or built for another "
                             f"machine); reinstall it ({hint}) or set cpu_allocator=auto")
        return {}, (f"allocator: the system malloc; {lib} is there but cannot be preloaded (damaged, or built for "
                    f"another machine): reinstall it ({hint})")
    if lib is None:
        hint = malloc.install_hint()
        if setting == "tcmalloc":
            raise InputError(f"cpu_allocator=tcmalloc: no tcmalloc library on this host; install it ({hint}) or set "
                             "cpu_allocator=auto")
        return {}, (f"allocator: the system malloc; with tcmalloc this CPU run needs about half the memory and runs "
                    f"~10 % faster: {hint}")
    return {"LD_PRELOAD": ":".join(x for x in (str(lib), preload) if x), **malloc.QUIET}, f"allocator: tcmalloc ({lib})"


def child_env(profile: ResolvedProfile, device: ResolvedDevice, group: list[int] | None,
              online: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(profile.env)
    env["HF_HUB_OFFLINE"] = "0" if online else "1"  # nothing reaches the network unless the user asked for a hub id
    if not device.reading.emulated:
        env.update(VENDOR_FACTS[device.reading.vendor].pin(group or [device.reading.index]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass(frozen=True)
class Nodes:
    """Several machines in one run (torchrun's c10d rendezvous at node 0's address)."""

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str = ""  # HOST:PORT of node 0, reachable from every machine

    @classmethod
    def parse(cls, nnodes: int | None, node_rank: int | None, endpoint: str | None) -> "Nodes":
        if nnodes is None or nnodes == 1:
            if node_rank or endpoint:
                raise InputError("--node-rank / --rdzv-endpoint need --nnodes N (N > 1 machines)")
            return cls()
        if nnodes < 1:
            raise InputError(f"--nnodes {nnodes}: must be a positive number of machines")
        if node_rank is None or not 0 <= node_rank < nnodes:
            raise InputError(f"--node-rank: give each of the {nnodes} machines its number, 0 to {nnodes - 1} "
                             "(0 on the machine whose address is --rdzv-endpoint)")
        host, _, port = (endpoint or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT of machine 0, e.g. 192.168.1.10:29400")
        return cls(nnodes, node_rank, endpoint)

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1:
            return ["--standalone"]
        # The rendezvous store lives on node 0; the others are its clients (explicit, never guessed from names).
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.endpoint}", "--rdzv-id=hwcompat",
                f"--rdzv-conf=is_host={'true' if self.node_rank == 0 else 'false'}"]


def exec_worker(run: RunDir, env: dict[str, str], nproc: int, nodes: Nodes = Nodes()) -> None:
    """Replace this process with the trainer (or torchrun), so signals go straight to it.

    The run folder's lock descriptor is inherited, so the trainer holds the lock until it exits."""
    run_dir, resume = run.path, run.resume
    run.lock.keep_across_exec()
    tail = [str(run_dir)] + (["--resume"] if resume else [])
    if nproc > 1 or nodes.nnodes > 1:
        argv = [sys.executable, "-m", "hwcompat.pipeline.elastic", *nodes.torchrun_args(), f"--nproc-per-node={nproc}",
                "-m", "hwcompat.pipeline.worker", *tail]
    else:
        argv = [sys.executable, "-m", "hwcompat.pipeline.worker", *tail]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
