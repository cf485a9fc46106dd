"""The launcher: resolve the device profile, preflight (preflight.py: the data, the plan, the model), write the
run folder, then exec the trainer (processes.py).

Runs in the CLI process and never imports torch: the profile environment (allocator, TORCHDYNAMO_DISABLE,
HSA_OVERRIDE_GFX_VERSION …) must exist before torch is first imported, so the trainer runs in a fresh process
(``exec``, so signals such as ``docker stop`` reach it directly) with that environment. Several identical
devices: the same worker under torchrun.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hwcompat import __version__
from hwcompat.choices import Export, Finetune, Offload, Vendor
from hwcompat.errors import HwcompatError, InputError
from hwcompat.fsutil import atomic_write_json
from hwcompat.pipeline.fit import apply_plan, check_memory_limit, planned_profile
from hwcompat.pipeline.preflight import check_optimizer, is_hub_id, preflight
from hwcompat.pipeline.processes import Nodes, child_env, cpu_allocator, exec_worker, process_count
from hwcompat.resolve import HostPlan, Overrides, ResolvedDevice, ResolvedProfile, resolve_device
from hwcompat.train.config import ORIGIN_DEFAULT, ORIGIN_PROFILE, LoadedConfig, save_yaml
from hwcompat.train.rundir import EXPORTS, RECORDS, RESULTS, RunDir, open_run_dir, record_written
from hwcompat.train.spec import RunSpec, TrainDevice
from hwcompat.train import trackers

HARDWARE_KEYS = ("dtype", "attention", "compile_backend")


def training_device(plan: HostPlan, spec: str | None) -> tuple[int, ResolvedDevice]:
    """--device, else the first supported GPU, else the CPU."""
    if spec is not None:
        return plan.select(spec)
    for pos, d in enumerate(plan.devices):
        if d.reading.vendor != Vendor.cpu and d.supported:
            return pos, d
    return len(plan.devices) - 1, plan.devices[-1]


def apply_profile(loaded: LoadedConfig, device: ResolvedDevice, profiles, software, forced_profile: str | None
                  ) -> tuple[ResolvedProfile, dict[str, str], list[str]]:
    """The profile merged into the config; user hardware settings validated against the card.

    Returns (resolved profile, origins of the hardware keys, warnings).
    """
    cfg = loaded.config
    sets = {k: getattr(cfg, k) for k in HARDWARE_KEYS if getattr(cfg, k) is not None}
    warnings: list[str] = []
    try:
        resolved = resolve_device(device.reading, profiles, software, Overrides(forced_profile, sets))
    except InputError as exc:
        if not cfg.force:
            raise InputError(f"{exc}\n(this contradicts the hardware; set force=true to try anyway)") from None
        warnings.append(f"force=true: running despite: {exc}")
        resolved = resolve_device(device.reading, profiles, software, Overrides(forced_profile, {}))
        p = resolved.profile
        resolved = replace(resolved, profile=replace(p, **sets, reasons={**p.reasons, **{
            k: f"forced by the user despite the hardware ({exc})" for k in sets}}))
    if resolved.profile is None:
        raise HwcompatError(f"{device.reading.name} cannot train: {'; '.join(resolved.problems)}")
    if not resolved.supported and not cfg.force:
        raise HwcompatError(f"{device.reading.name} is not supported: {'; '.join(resolved.problems)} "
                            "(set force=true to try anyway)")
    if cfg.qlora and "nf4" not in resolved.profile.quantization:
        raise InputError(f"qlora=true: {device.reading.name} ({resolved.arch}) cannot run 4-bit NF4: "
                         f"{resolved.profile.reasons.get('quantization.nf4', '')}; train with plain LoRA (qlora=false)")
    check_optimizer(cfg.optimizer, resolved.profile, software.bitsandbytes)
    origins = {k: (loaded.origins[k] if k in sets else ORIGIN_PROFILE) for k in HARDWARE_KEYS}
    return resolved.profile, origins, warnings + [p for p in resolved.problems if p.startswith("warning")]


def render_config(loaded: LoadedConfig, profile: ResolvedProfile, hw_origins: dict[str, str],
                  device: ResolvedDevice) -> str:
    """--print-config: every value with where it came from."""
    cfg = loaded.config.to_dict()
    lines = [f"# device: {device.reading.name} ({device.reading.vendor}:{device.reading.index})"
             f"{' (emulated)' if device.reading.emulated else ''}, profile {profile.name}"]
    width = max(len(k) for k in cfg)
    for key, value in cfg.items():
        origin = loaded.origins.get(key, ORIGIN_DEFAULT)
        if key in HARDWARE_KEYS:
            value, origin = getattr(profile, key), hw_origins[key]
        lines.append(f"{key.ljust(width)} : {json.dumps(value)}  # {origin}")
    lines.append("# profile environment (set in the training process before torch is imported):")
    for k, v in profile.env.items():
        lines.append(f"{('env.' + k).ljust(width)} : {json.dumps(v)}  # profile")
    return "\n".join(lines)


def prepare_run_dir(loaded: LoadedConfig, profile: ResolvedProfile, device: ResolvedDevice, plan: HostPlan,
                    resume: bool, overwrite: bool, cpu_emulation: bool = False, world_size: int = 1) -> RunDir:
    """Lock the run folder, apply its rules (``rundir``), then write the run's records and its spec."""
    from hwcompat.fingerprint import run_inputs

    cfg = loaded.config.to_dict()
    from hwcompat.train.trackers import run_folders

    outputs = (RECORDS + RESULTS + (("model",) if loaded.config.finetune == Finetune.full else ())
               + (EXPORTS if loaded.config.export == Export.gguf else ())
               + run_folders(loaded.config.report_to, Path(os.path.abspath(loaded.config.output_dir)),
                             os.environ))
    run = open_run_dir(loaded.config.output_dir, cfg, resume, overwrite, outputs)
    cfg["output_dir"] = str(run.path)
    inputs = run_inputs(loaded.config, world_size)
    resumes = []
    if run.resume:
        try:
            resumes, inputs = _resume_record(run, inputs, loaded.config.force)
        except BaseException:
            run.lock.release()
            raise
    # config.yaml holds the user's settings (not the profile's), so a resume re-resolves the same way.
    save_yaml({k: v for k, v in cfg.items()
               if loaded.origins.get(k, ORIGIN_DEFAULT) != ORIGIN_DEFAULT or k in ("model", "output_dir")},
              run.path / "config.yaml")
    atomic_write_json(run.path / "profile.json", asdict(profile))
    atomic_write_json(run.path / "devices.json", plan.to_dict())
    spec = RunSpec(config=replace(loaded.config, output_dir=str(run.path)), profile=profile,
                   device=TrainDevice.choose(device, profile, cpu_emulation), origins=dict(loaded.origins),
                   cpu_emulation=cpu_emulation, resumes=resumes, hwcompat=__version__, inputs=inputs,
                   planned_peak_bytes=loaded.planned_peak_bytes,
                   planned_allocated_bytes=loaded.planned_allocated_bytes)
    atomic_write_json(run.path / "run.json", spec.to_dict())
    record_written(run.path, *RECORDS)
    return run


def _resume_record(run: RunDir, inputs: dict[str, Any], force: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The resumes so far plus this one; a resume whose inputs differ from what the run trained on is refused
    (with force=true it goes on, and the difference is recorded)."""
    from hwcompat.fingerprint import changed_inputs

    recorded = json.loads((run.path / "run.json").read_text())
    resumes = recorded.get("resumes", [])
    changed = changed_inputs(recorded.get("inputs") or {}, inputs)
    if changed and not force:
        raise InputError(f"--resume: the run in {run.path} trained on other inputs than this start has: "
                         f"{'; '.join(changed)}. A resume must continue the same training; restore them, or "
                         "start a new run in another output_dir (force=true resumes anyway, and records it)")
    entry: dict[str, Any] = {"at_step": run.from_step}
    if run.changes:
        entry["changed"] = run.changes
    if changed:
        entry["inputs_changed"] = changed
    if len(entry) > 1:
        resumes.append(entry)
    return resumes, inputs


@dataclass(frozen=True)
class LaunchOptions:
    """The train command's flags, typed: what the launcher reads besides the config and the host's plan."""

    print_config: bool = False
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    export: str | None = None
    export_type: str | None = None
    devices: str | None = None  # all | N
    device: str | None = None  # a detect position or VENDOR:INDEX
    profile: str | None = None
    cpu_emulation: bool = False
    nnodes: int | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None


def _apply_flags(opts: LaunchOptions, loaded: LoadedConfig) -> None:
    """--export / --type / --force are config keys given as flags; their origin says so."""
    for key in ("export", "export_type", "force"):
        value = getattr(opts, key)
        if value:
            setattr(loaded.config, key, value)
            loaded.origins[key] = "command line"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def launch(opts: LaunchOptions, loaded: LoadedConfig, plan: HostPlan) -> int:
    """resolve -> preflight -> run spec -> exec: everything before the first torch import, in the CLI process."""
    from hwcompat.profiles import load_profiles
    from hwcompat.software import installed

    _apply_flags(opts, loaded)
    pos, device = training_device(plan, opts.device)
    profile, hw_origins, warnings = apply_profile(loaded, device, load_profiles(), installed(), opts.profile)
    for w in warnings:
        _say(f"warning: {w}")
    if opts.print_config:
        verdict = apply_plan(loaded, device, profile, plan, 1.0)  # worst case: no data read
        planned = planned_profile(loaded, profile)
        if planned is not profile:
            profile, hw_origins = planned, {**hw_origins, "attention": loaded.origins["attention"]}
        print(render_config(loaded, profile, hw_origins, device) + (f"\n# {verdict}" if verdict else ""))
        return 0
    if device.reading.emulated and device.reading.vendor != Vendor.cpu and not opts.cpu_emulation:
        raise InputError(f"{device.reading.name} is emulated: there is no such card to train on. "
                         "Use --print-config to see the resolved run, --cpu-emulation to run its profile on the "
                         "CPU, or drop --emulate")
    check_memory_limit(loaded.config, device, opts.cpu_emulation)
    trackers.check_installed(loaded.config.report_to)
    trackers.check_settings(loaded.config.report_to, Path(os.path.abspath(loaded.config.output_dir)), os.environ,
                            opts.resume)
    preflight(loaded, device, profile, plan)
    profile = planned_profile(loaded, profile)
    nproc, group = process_count(opts.devices, plan, pos, device)
    if loaded.config.offload == Offload.layers and (nproc > 1 or (opts.nnodes or 1) > 1):
        raise InputError("offload=layers streams the base to one card; several processes would each pin their own "
                         "host copy. Train on one device (drop --devices/--nnodes) or set offload=none")
    nodes = Nodes.parse(opts.nnodes, opts.node_rank, opts.rdzv_endpoint)
    malloc_env, note = cpu_allocator(loaded.config.cpu_allocator, device.reading.vendor == Vendor.cpu or opts.cpu_emulation)
    run = prepare_run_dir(loaded, profile, device, plan, opts.resume, opts.overwrite, opts.cpu_emulation,
                          world_size=nproc * nodes.nnodes)
    _announce(run, device, profile, nproc, nodes)
    cfg = loaded.config
    env = child_env(profile, device, group, cfg.allow_network and is_hub_id(cfg.model))
    env |= trackers.child_env(cfg.report_to, run.path, env)
    if note:
        _say(note)
    exec_worker(run, env | malloc_env, nproc, nodes)
    return 0  # not reached: exec replaced this process


def _announce(run: RunDir, device: ResolvedDevice, profile: ResolvedProfile, nproc: int, nodes: Nodes) -> None:
    for note in run.notes:
        _say(f"note: {note}")
    for key, change in run.changes.items():
        _say(f"resume: {key} {json.dumps(change['from'])} -> {json.dumps(change['to'])} from step {run.from_step}")
    _say(f"training on {device.reading.name} with profile {profile.name} ({profile.dtype}, "
         f"{profile.attention}, compile {profile.compile_backend})"
         f"{f' x{nproc} processes' if nproc > 1 else ''}"
         f"{f' on machine {nodes.node_rank} of {nodes.nnodes}' if nodes.nnodes > 1 else ''} → {run.path}")
