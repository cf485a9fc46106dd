"""The launcher: resolve the device profile, check the data, then exec the trainer.

Runs in the CLI process and never imports torch: the profile environment
(allocator, TORCHDYNAMO_DISABLE, HSA_OVERRIDE_GFX_VERSION …) must exist
before torch is first imported, so the trainer runs in a fresh process
(``exec``, so signals such as ``docker stop`` reach it directly) with that
environment. Several identical devices: the same worker under torchrun.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from hwcompat import __version__
from hwcompat.choices import Attention, Vendor
from hwcompat.envvars import VISIBILITY  # noqa: F401 (one table for the launcher, env and selftest)
from hwcompat.readings import VENDOR_FACTS
from hwcompat.errors import HwcompatError, InputError
from hwcompat.fsutil import atomic_write_json
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


def check_optimizer(name: str, profile: ResolvedProfile, have_bitsandbytes: bool) -> None:
    """An 8-bit optimizer needs the card's bitsandbytes kernels and the package itself; said before any load."""
    from hwcompat.train.optim import EIGHT_BIT, check_supported

    check_supported(name, profile)
    if name in EIGHT_BIT and not have_bitsandbytes:
        raise InputError(f"optimizer={name} needs bitsandbytes, which is not installed here: pip install bitsandbytes")


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


def check_data(loaded: LoadedConfig) -> tuple[str, float]:
    """The objective's text-level data checks (no tokenizer, no torch): report text, worst logit share."""
    from hwcompat.train.objectives import objective_class

    return objective_class(loaded.config.method).check(loaded.config)


def prepare_run_dir(loaded: LoadedConfig, profile: ResolvedProfile, device: ResolvedDevice, plan: HostPlan,
                    resume: bool, overwrite: bool, cpu_emulation: bool = False, world_size: int = 1) -> RunDir:
    """Lock the run folder, apply its rules (``rundir``), then write the run's records and its spec."""
    from hwcompat.fingerprint import run_inputs

    cfg = loaded.config.to_dict()
    from hwcompat.train.trackers import run_folders

    outputs = (RECORDS + RESULTS + (("model",) if loaded.config.finetune == "full" else ())
               + (EXPORTS if loaded.config.export == "gguf" else ())
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


def is_hub_id(model: str) -> bool:
    """"org/name" that is not a path on this machine."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)) and not Path(model).exists()


def check_model(model: str, allow_network: bool, what: str = "model") -> None:
    """A local folder with config.json and safetensors weights, or a hub id the user allowed; before any load."""
    path = Path(model)
    if not path.exists():
        if is_hub_id(model) and allow_network:
            return
        hint = (" It looks like a Hugging Face Hub id: hwcompat downloads only with allow_network: true "
                "(or download it once and point model= at the folder)") if is_hub_id(model) else ""
        raise InputError(f"{what} {model}: cannot load it: no such folder.{hint}")
    if not path.is_dir():
        raise InputError(f"{what} {model}: not a folder; point {what}= at a model folder (config.json + weights)")
    if what == "model" and not (path / "config.json").exists():
        raise InputError(f"model {model}: no config.json here; point model= at the folder that holds it")
    if what == "model" and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise InputError(
                f"model {model}: only {', '.join(pickles[:3])} (pickle) weights, and hwcompat loads safetensors only "
                "(unpickling can run code). Convert once, if you trust the file: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{model}').save_pretrained('{model}-safetensors')\"")
        raise InputError(f"model {model}: no *.safetensors weights in this folder")
    if what == "model":
        from hwcompat.weights import read_header

        for f in sorted(path.glob("*.safetensors")):
            read_header(f)  # a truncated download is an error naming the file, not a crash in the loader


def check_export(cfg) -> None:
    """A k-quant export needs llama.cpp's quantizer: found missing now, not after the training it follows."""
    import importlib.util

    from hwcompat.choices import LLAMA_TYPES
    from hwcompat.export.quantize import missing

    if cfg.export == "gguf" and cfg.export_type in LLAMA_TYPES and importlib.util.find_spec("llama_cpp") is None:
        raise missing(cfg.export_type)
    if cfg.export_imatrix and cfg.export == "gguf" and cfg.export_type not in LLAMA_TYPES:
        raise InputError(f"export_imatrix: true weights llama.cpp's quantizer (export_type {', '.join(LLAMA_TYPES)}); "
                         f"export_type {cfg.export_type} rounds every weight alike: set export_type or drop it")
    if cfg.export_imatrix and cfg.method != "sft":
        raise InputError(f"export_imatrix: true measures on SFT training rows; this run is {cfg.method}: export "
                         "afterwards with `hwcompat export MERGED --imatrix --imatrix-data ROWS.jsonl`")


def check_init_adapter(cfg) -> None:
    """init_adapter: a PEFT LoRA folder (safetensors) whose shape is the config's, checked before any load."""
    if not cfg.init_adapter:
        return
    folder = Path(cfg.init_adapter)
    meta = folder / "adapter_config.json"
    if not meta.exists() or not (folder / "adapter_model.safetensors").exists():
        raise InputError(f"init_adapter {folder}: expected a PEFT adapter folder (adapter_config.json and "
                         "adapter_model.safetensors), e.g. an earlier run's adapter/")
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"init_adapter {meta}: cannot read it ({str(exc)[:100]})") from None
    if not isinstance(saved, dict):
        raise InputError(f"init_adapter {meta}: expected a JSON object (PEFT's adapter config), got "
                         f"{type(saved).__name__}; use an adapter folder that PEFT wrote")
    for key in ("r", "lora_alpha"):
        value = saved.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"init_adapter {meta}: {key}: expected a number, got {json.dumps(value)[:40]}; the file "
                             "was edited by hand or not written by PEFT")
    targets = saved.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets
    ours = "all-linear" if cfg.lora_target_modules == ["all-linear"] else sorted(cfg.lora_target_modules)
    differ = {k: v for k, v, mine in (("lora_r", saved.get("r"), cfg.lora_r), ("lora_alpha", saved.get("lora_alpha"),
                                                                              cfg.lora_alpha))
              if v != mine}
    if differ:
        raise InputError(f"init_adapter {folder} was trained with {', '.join(f'{k}={v}' for k, v in differ.items())}; "
                         "set the same in this config (the adapter keeps its shape)")
    if ours != "all-linear" and targets != ours:
        raise InputError(f"init_adapter {folder} targets {targets}; set lora_target_modules to the same")
    from hwcompat.weights import read_header

    read_header(folder / "adapter_model.safetensors")  # truncated: an error naming the file, not a crash
    _same_base_as(folder, cfg.model)


def _same_base_as(adapter: Path, model: str) -> None:
    """An adapter continues only on the model it was trained on (its run's recorded digest, else PEFT's name)."""
    from hwcompat.fingerprint import weights_digest

    try:
        recorded = (json.loads((adapter.parent / "run.json").read_text(encoding="utf-8")).get("inputs") or {}).get("base")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded:
        if weights_digest(model) != recorded:
            raise InputError(f"init_adapter {adapter} was trained on another base model than model={model} (its "
                             "run's run.json records the base's config + weights digest, and this model differs); "
                             "train from the adapter's own base model")
        return
    try:
        named = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named and Path(named).name != Path(model).name and \
            os.path.abspath(named) != os.path.abspath(model):
        raise InputError(f"init_adapter {adapter} was trained on {named!r}, not model={model}; train from that base "
                         "model (if it is the same model under another name, copy the adapter and fix "
                         "base_model_name_or_path in its adapter_config.json)")


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


def _host_limit(inp, result, run) -> str:
    """When streaming would fit the card but not the host's RAM, the error says so (the fix is RAM, not the card)."""
    streamed = result if result.stream is not None else run(replace(inp, offload="layers"))
    st = streamed.stream
    if st is not None and not st.host_fits and streamed.peak_bytes <= streamed.device_bytes:
        return streamed.notes[-1] + "."
    return ""


def device_memory(cfg, device: ResolvedDevice) -> int:
    """The memory this run may use on its card: the whole card, or ``memory_limit_gib`` of it (GPU only)."""
    card = device.reading.memory_bytes
    if not cfg.memory_limit_gib or device.reading.vendor == Vendor.cpu:
        return card
    limit = int(cfg.memory_limit_gib * 2**30)
    if card and limit > card:
        raise InputError(f"memory_limit_gib={cfg.memory_limit_gib:g}: {device.reading.name} has only "
                         f"{card / 2**30:.1f} GiB; give a smaller limit, or 0 for the whole card")
    return limit


def check_memory_limit(cfg, device: ResolvedDevice, cpu_emulation: bool) -> None:
    """A limit is enforced by the GPU's allocator; on the CPU nothing would hold the run to it, so say so."""
    if cfg.memory_limit_gib and (device.reading.vendor == Vendor.cpu or cpu_emulation):
        raise InputError(f"memory_limit_gib={cfg.memory_limit_gib:g} caps a GPU's memory, but this run trains on "
                         "the CPU, where nothing enforces it; set memory_limit_gib=0")
    device_memory(cfg, device)


def memory_choice(loaded: LoadedConfig, shape, inp, run, vendor: str, unified: bool = False):
    """`offload: auto` as train and plan both decide it; a ``gradient_checkpointing`` the user wrote is kept."""
    from hwcompat import plan as planner

    cfg = loaded.config
    if vendor == Vendor.cpu and cfg.offload != "layers":  # the host's RAM is the device's: nothing to stream to
        hosted = "host" if cfg.optimizer_offload == "host" else "none"  # written: plumbing a CPU test can run
        return planner.MemoryChoice("none", cfg.gradient_checkpointing, run(replace(inp, optimizer_offload=hosted)),
                                    optimizer_offload=hosted)
    if unified and cfg.offload == "layers":
        raise InputError("offload=layers: this device's memory is the host's RAM (unified memory), so streaming "
                         "layers from one to the other saves nothing; set offload=none (or auto)")
    written = loaded.origins.get("gradient_checkpointing", ORIGIN_DEFAULT) != ORIGIN_DEFAULT
    return planner.decide_offload(shape, inp, cfg.offload, run, may_checkpoint=not written, may_stream=not unified,
                                  optimizer_offload=cfg.optimizer_offload)


def _without_kept_scores(loaded: LoadedConfig, profile: ResolvedProfile, choice, with_sdpa):
    """attention=cpu_bf16 keeps each layer's S^2 probabilities: where the run does not fit with them but does with
    SDPA's flash kernel, it trains with sdpa and the config says why. An attention the user chose is kept."""
    cfg = loaded.config
    if choice.plan.fits or profile.attention != Attention.cpu_bf16 or cfg.attention is not None:
        return choice
    flash = with_sdpa()
    if not flash.plan.fits:
        return choice
    cfg.attention = "sdpa"
    loaded.origins["attention"] = ("plan (cpu_bf16's kept S^2 probabilities do not fit; with sdpa the peak is "
                                   f"{flash.plan.peak_bytes / 2**30:.1f} GiB)")
    return flash


def check_plan(loaded: LoadedConfig, device: ResolvedDevice, profile: ResolvedProfile,
               logit_fraction: float = 1.0, host_ram: int | None = None) -> tuple[str | None, str]:
    """Refuse early, before any model load, when the planner says the run will not fit; decide ``offload``.

    Returns (a one-line note for the log or None when the model type is unknown to the planner,
    the offload the run uses: none | layers).
    """
    from hwcompat import plan as planner

    cfg = loaded.config
    try:
        shape = planner.load_shape(cfg.model)
    except InputError as exc:
        return f"plan: skipped ({exc})", "layers" if cfg.offload == "layers" else "none"
    quant_ok = "nf4" in profile.quantization
    vendor = device.reading.vendor
    host = planner.host_for(device, host_ram, profile.dtype)
    memory = device_memory(cfg, device)

    def run(inp, attention=profile.attention):
        return planner.estimate(shape, inp, profile.dtype, planner.planned_attention(attention, profile.hardware),
                                vendor, memory, quant_ok, host, planner.max_allocation(profile.hardware))

    inp = planner.plan_input(cfg, logit_fraction=logit_fraction)
    choice = _without_kept_scores(loaded, profile, memory_choice(loaded, shape, inp, run, vendor,
                                  device.reading.unified_memory),
                                  lambda: memory_choice(loaded, shape, inp, partial(run, attention="sdpa"), vendor))
    offload, result = choice.offload, choice.plan
    loaded.planned_peak_bytes = result.peak_bytes
    loaded.planned_allocated_bytes = result.peak_bytes - result.breakdown["runtime_overhead"]
    if choice.gradient_checkpointing != cfg.gradient_checkpointing:
        cfg.gradient_checkpointing = choice.gradient_checkpointing
        loaded.origins["gradient_checkpointing"] = "plan (offload: auto)"
    if cfg.finetune == "full" and choice.optimizer_offload != cfg.optimizer_offload:
        cfg.optimizer_offload = choice.optimizer_offload  # the run's spec carries the decision, never "auto"
        loaded.origins["optimizer_offload"] = "plan (optimizer_offload: auto)"
    note = (f"plan: peak {result.peak_bytes / planner.GIB:.2f} GiB of {result.device_bytes / planner.GIB:.1f} GiB "
            f"(worst case: every micro-batch {cfg.max_seq_len} tokens long)")
    if choice.changed:
        note += f"; changed: {choice.changed}"
    if result.host_optimizer is not None:
        ho = result.host_optimizer
        note += (f"; optimizer_offload=host: {ho.host_bytes / planner.GIB:.1f} GiB host RAM, "
                 f"{ho.bytes_per_step / planner.GIB:.1f} GiB copied per step over {ho.link}")
    if offload == "layers" and result.stream is not None:
        st = result.stream
        note += (f"; offload=layers: {st.host_bytes / planner.GIB:.1f} GiB pinned host RAM, "
                 f"{st.bytes_per_micro_step / planner.GIB:.1f} GiB "
                 f"copied per micro-step over {st.link}")
    if result.fits or cfg.force:
        return note + ("" if result.fits else "; does not fit, trying anyway (force)"), offload
    fits = [s for s in planner.suggest(shape, result, vendor, quant_ok, "optim8bit" in profile.quantization, host)
            if s.fits]
    hint = "; ".join(s.change for s in fits[:3]) or "a smaller model"
    limit = _host_limit(inp, result, run) if vendor != Vendor.cpu and not cfg.qlora else ""
    raise HwcompatError(f"this run will not fit on {device.reading.name}: {note}. {limit + ' ' if limit else ''}"
                        f"Change: {hint} (`hwcompat plan --suggest` shows the breakdown; --force tries anyway)")


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


def process_count(opts: LaunchOptions, plan: HostPlan, pos: int, device: ResolvedDevice
                  ) -> tuple[int, list[int] | None]:
    """--devices: how many processes, and which device indices they see (None on the CPU)."""
    if not opts.devices:
        return 1, None
    group = next((g for g in plan.groups if pos in g["devices"]), None)
    members = group["devices"] if group else [pos]
    if opts.devices == "all":
        n = len(members)
    elif opts.devices.isdigit() and int(opts.devices) > 0:
        n = int(opts.devices)
        if device.reading.vendor != Vendor.cpu and n > len(members):
            raise InputError(f"--devices {n}: only {len(members)} identical {device.arch} device(s) here")
    else:
        raise InputError(f"--devices {opts.devices}: use 'all' or a positive number")
    if device.reading.vendor == Vendor.cpu:
        return n, None
    return n, [plan.devices[i].reading.index for i in members[:n]]


def decide_offload(loaded: LoadedConfig, device: ResolvedDevice, profile: ResolvedProfile, plan: HostPlan,
                   logit_fraction: float, strict: bool = False) -> str | None:
    """The plan's verdict; ``offload: auto`` becomes none or layers here, so the run's spec carries the decision."""
    try:
        note, offload = check_plan(loaded, device, profile, logit_fraction, plan.host_ram_bytes)
    except HwcompatError as exc:
        if strict:
            raise
        return str(exc)
    if offload != loaded.config.offload:
        loaded.config.offload = offload
        loaded.origins["offload"] = "plan (offload: auto)"
    return note


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
        verdict = decide_offload(loaded, device, profile, plan, 1.0)  # worst case: no data read
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
    nproc, group = process_count(opts, plan, pos, device)
    if loaded.config.offload == "layers" and (nproc > 1 or (opts.nnodes or 1) > 1):
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


def planned_profile(loaded: LoadedConfig, profile: ResolvedProfile) -> ResolvedProfile:
    """The profile with the plan's attention where the plan changed it (cpu_bf16's S^2 term did not fit)."""
    cfg = loaded.config
    if cfg.attention is None or cfg.attention == profile.attention:
        return profile
    return replace(profile, attention=cfg.attention,
                   reasons={**profile.reasons, "attention": loaded.origins.get("attention", "set")})


def preflight(loaded: LoadedConfig, device: ResolvedDevice, profile: ResolvedProfile, plan: HostPlan) -> None:
    """The data, the plan, the model, the adapter to start from and the export: each checked before any load."""
    cfg = loaded.config
    report, logit_fraction = check_data(loaded)
    _say(report)
    note = decide_offload(loaded, device, profile, plan, logit_fraction, strict=True)  # config.json only
    if note:
        _say(note)
    check_model(cfg.model, cfg.allow_network)
    check_init_adapter(cfg)
    check_export(cfg)
    if cfg.tokenizer:
        check_model(cfg.tokenizer, cfg.allow_network, what="tokenizer")


def _announce(run: RunDir, device: ResolvedDevice, profile: ResolvedProfile, nproc: int, nodes: Nodes) -> None:
    for note in run.notes:
        _say(f"note: {note}")
    for key, change in run.changes.items():
        _say(f"resume: {key} {json.dumps(change['from'])} -> {json.dumps(change['to'])} from step {run.from_step}")
    _say(f"training on {device.reading.name} with profile {profile.name} ({profile.dtype}, "
         f"{profile.attention}, compile {profile.compile_backend})"
         f"{f' x{nproc} processes' if nproc > 1 else ''}"
         f"{f' on machine {nodes.node_rank} of {nodes.nnodes}' if nodes.nnodes > 1 else ''} → {run.path}")
