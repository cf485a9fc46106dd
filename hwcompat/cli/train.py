"""``hwcompat train CONFIG [key=value …]``: LoRA-tune with the device profile applied."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from hwcompat.cli.common import plan_from_args
from hwcompat.errors import InputError
from hwcompat.choices import EXPORT_TYPES, EXPORTS
from hwcompat.train.config import keys_help

if TYPE_CHECKING:  # imported when called, so `hwcompat detect` stays light
    from hwcompat.pipeline.launch import LaunchOptions


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="LoRA fine-tune a model with the device's profile applied",
                       description="Resolve the device profile, check the data, then train in a fresh process "
                                   "with the profile's environment. Example: hwcompat train config.yaml "
                                   "learning_rate=1e-4 max_steps=200",
                       epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="training config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    add_train_options(p)
    p.set_defaults(func=run)


def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config with each value's origin and exit (loads no model)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    p.add_argument("--force", action="store_true", help="run even when the plan says it will not fit or a setting "
                                                        "contradicts the hardware (same as force=true)")
    p.add_argument("--export", choices=EXPORTS[1:], help="after training: merge and write model.gguf + Modelfile "
                                                        "in the run folder (same as export=gguf)")
    p.add_argument("--type", dest="export_type", choices=EXPORT_TYPES,
                   help="with --export: the GGUF type (export_type=…; k-quants need hwcompat[gguf])")
    p.add_argument("--devices", metavar="all|N", help="train on all identical devices (DDP via torchrun); "
                                                      "on a CPU-only host N processes (gloo)")
    p.add_argument("--device", metavar="N", help="device position from `hwcompat detect` (default: first GPU)")
    m = p.add_argument_group("several machines (torchrun c10d rendezvous; see docs/multi-gpu.md)")
    m.add_argument("--nnodes", type=int, metavar="N", help="machines in this run; start the same command on each")
    m.add_argument("--node-rank", type=int, metavar="R", help="this machine's number, 0 … N-1 (0 hosts the rendezvous)")
    m.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="machine 0's address and a free port, e.g. "
                                                               "192.168.1.10:29400")
    g = p.add_argument_group("devices")
    g.add_argument("--emulate", metavar="NAME[,NAME…]", help="resolve for an emulated device (with --print-config)")
    g.add_argument("--emulate-file", metavar="FILE")
    g.add_argument("--profile", metavar="NAME", help="force a profile family")
    g.add_argument("--cpu-emulation", action="store_true",
                   help="with --emulate: run the emulated card's profile (dtype, attention, compile, env) on the "
                        "CPU, as the CI matrix does; proves the plumbing, not the card")
    p.set_defaults(set=[])


def options(args: argparse.Namespace) -> LaunchOptions:
    """The typed form of the train flags the launcher reads (the demo's parser has the same ones)."""
    from hwcompat.pipeline.launch import LaunchOptions

    return LaunchOptions(print_config=args.print_config, resume=args.resume, overwrite=args.overwrite,
                         force=bool(getattr(args, "force", False)), export=getattr(args, "export", None),
                         export_type=getattr(args, "export_type", None), devices=args.devices, device=args.device,
                         profile=args.profile, cpu_emulation=bool(getattr(args, "cpu_emulation", False)),
                         nnodes=getattr(args, "nnodes", None), node_rank=getattr(args, "node_rank", None),
                         rdzv_endpoint=getattr(args, "rdzv_endpoint", None))


def launch(args: argparse.Namespace, loaded) -> int:
    from hwcompat.pipeline.launch import launch as launch_run

    return launch_run(options(args), loaded, plan_from_args(args))


def run(args: argparse.Namespace) -> int:
    from hwcompat.train.config import load_config

    if not args.config:
        raise InputError("train: give a config file (hwcompat train config.yaml), or run `hwcompat demo`")
    from hwcompat.cli.demo import named_model

    loaded = named_model(load_config(args.config, args.overrides))
    return launch(args, loaded)
