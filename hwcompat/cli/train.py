"""``hwcompat train CONFIG [key=value …]``: LoRA-tune with the device profile applied."""

from __future__ import annotations

import argparse
import json
import sys

from hwcompat.cli.common import plan_from_args
from hwcompat.cli.plan import host_ram
from hwcompat.errors import InputError
from hwcompat.choices import EXPORT_TYPES


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="LoRA fine-tune a model with the device's profile applied",
                       description="Resolve the device profile, check the data, then train in a fresh process "
                                   "with the profile's environment. Example: hwcompat train config.yaml "
                                   "learning_rate=1e-4 max_steps=200")
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
    p.add_argument("--export", choices=("gguf",), help="after training: merge and write model.gguf + Modelfile "
                                                        "in the run folder (same as export=gguf)")
    p.add_argument("--type", dest="export_type", choices=EXPORT_TYPES,
                   help="with --export: the GGUF type (export_type=…; k-quants need hwcompat[gguf])")
    p.add_argument("--devices", metavar="all|N", help="train on all identical devices (DDP via torchrun); "
                                                      "on a CPU-only host N processes (gloo)")
    p.add_argument("--device", metavar="N", help="device position from `hwcompat detect` (default: first GPU)")
    m = p.add_argument_group("several machines (torchrun c10d rendezvous; see the README's home lab)")
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


def _nproc(args, plan, pos, device) -> tuple[int, list[int] | None]:
    if not args.devices:
        return 1, None
    group = next((g for g in plan.groups if pos in g["devices"]), None)
    members = group["devices"] if group else [pos]
    if args.devices == "all":
        n = len(members)
    elif args.devices.isdigit() and int(args.devices) > 0:
        n = int(args.devices)
        if device.reading.vendor != "cpu" and n > len(members):
            raise InputError(f"--devices {n}: only {len(members)} identical {device.arch} device(s) here")
    else:
        raise InputError(f"--devices {args.devices}: use 'all' or a positive number")
    if device.reading.vendor == "cpu":
        return n, None
    return n, [plan.devices[i].reading.index for i in members[:n]]


def _decide_offload(L, loaded, device, profile, plan, logit_fraction: float, strict: bool = False) -> str | None:
    """The plan's verdict; ``offload: auto`` becomes none or layers here, so the run's spec carries the decision."""
    from hwcompat.errors import HwcompatError

    try:
        note, offload = L.check_plan(loaded, device, profile, logit_fraction, host_ram(plan))
    except HwcompatError as exc:
        if strict:
            raise
        return str(exc)
    if offload != loaded.config.offload:
        loaded.config.offload = offload
        loaded.origins["offload"] = "plan (offload: auto)"
    return note


def launch(args, loaded) -> int:
    from hwcompat.profiles import load_profiles
    from hwcompat.software import installed
    from hwcompat.train import launch as L

    for key in ("export", "export_type"):
        if getattr(args, key, None):
            setattr(loaded.config, key, getattr(args, key))
            loaded.origins[key] = "command line"
    if getattr(args, "force", False):
        loaded.config.force = True
        loaded.origins["force"] = "command line"
    plan = plan_from_args(args)
    pos, device = L.training_device(plan, args.device)
    profile, hw_origins, warnings = L.apply_profile(loaded, device, load_profiles(), installed(), args.profile)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.print_config:
        verdict = _decide_offload(L, loaded, device, profile, plan, 1.0)  # worst case: no data read
        print(L.render_config(loaded, profile, hw_origins, device) + (f"\n# {verdict}" if verdict else ""))
        return 0
    cpu_emulation = bool(getattr(args, "cpu_emulation", False))
    if device.reading.emulated and device.reading.vendor != "cpu" and not cpu_emulation:
        raise InputError(f"{device.reading.name} is emulated: there is no such card to train on. "
                         "Use --print-config to see the resolved run, --cpu-emulation to run its profile on the "
                         "CPU, or drop --emulate")
    cfg = loaded.config
    report, logit_fraction = L.check_data(loaded)
    print(report, file=sys.stderr)
    note = _decide_offload(L, loaded, device, profile, plan, logit_fraction, strict=True)  # config.json only
    if note:
        print(note, file=sys.stderr)
    L.check_model(cfg.model, cfg.allow_network)
    L.check_init_adapter(cfg)
    L.check_export(cfg)
    if cfg.tokenizer:
        L.check_model(cfg.tokenizer, cfg.allow_network, what="tokenizer")
    nproc, group = _nproc(args, plan, pos, device)
    if cfg.offload == "layers" and (nproc > 1 or (getattr(args, "nnodes", None) or 1) > 1):
        raise InputError("offload=layers streams the base to one card; several processes would each pin their own "
                         "host copy. Train on one device (drop --devices/--nnodes) or set offload=none")
    nodes = L.Nodes.parse(getattr(args, "nnodes", None), getattr(args, "node_rank", None),
                          getattr(args, "rdzv_endpoint", None))
    run = L.prepare_run_dir(loaded, profile, device, plan, args.resume, args.overwrite, cpu_emulation,
                            world_size=nproc * nodes.nnodes)
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)
    for key, change in run.changes.items():
        print(f"resume: {key} {json.dumps(change['from'])} -> {json.dumps(change['to'])} from step {run.from_step}",
              file=sys.stderr)
    print(f"training on {device.reading.name} with profile {profile.name} ({profile.dtype}, "
          f"{profile.attention}, compile {profile.compile_backend})"
          f"{f' x{nproc} processes' if nproc > 1 else ''}"
          f"{f' on machine {nodes.node_rank} of {nodes.nnodes}' if nodes.nnodes > 1 else ''} → {run.path}",
          file=sys.stderr)
    online = cfg.allow_network and L.is_hub_id(cfg.model)
    L.exec_worker(run, L.child_env(profile, device, group, online), nproc, nodes)
    return 0  # not reached: exec replaced this process


def run(args: argparse.Namespace) -> int:
    from hwcompat.train.config import load_config

    if not args.config:
        raise InputError("train: give a config file (hwcompat train config.yaml), or run `hwcompat demo`")
    loaded = load_config(args.config, args.overrides)
    return launch(args, loaded)
