"""``hwcompat plan``: will this fine-tune fit on this card? Reads config.json only; no torch."""

from __future__ import annotations

import argparse

from hwcompat.cli.common import add_device_options, gib, plan_from_args, print_json
from hwcompat.choices import OPTIMIZERS, PLAN_METHODS, PlanMethod


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate peak memory of a fine-tune on a device (no torch, no weights)",
                       description="Estimate peak device memory with a per-term breakdown and say whether it fits.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                   help="a `hwcompat train` config: plans exactly what `hwcompat train CONFIG.yaml` runs (its "
                        "defaults, its data's response share, the same offload decision)")
    p.add_argument("--model", help="model folder, config.json path, or a cached hub id (= model; required "
                                    "without a config that names one)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="`hwcompat train` config keys, e.g. max_seq_len=2048 micro_batch_size=4 optimizer=adamw_8bit")
    p.add_argument("--method", choices=PLAN_METHODS,
                   help="dpo: LoRA preference tuning (= method=dpo; with qlora=true for an NF4 base)")
    p.add_argument("--seq-len", "--max-seq-len", dest="seq_len", type=int, help="= max_seq_len (train's default)")
    p.add_argument("--batch-size", "--micro-batch-size", dest="batch_size", type=int,
                   help="= micro_batch_size (train's default)")
    p.add_argument("--lora-rank", "--lora-r", dest="lora_rank", type=int, help="= lora_r")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gradient-checkpointing", dest="gc", action="store_true", default=None)
    g.add_argument("--no-gradient-checkpointing", dest="gc", action="store_false")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="= optimizer")
    p.add_argument("--response-fraction", type=float, metavar="F",
                   help="share of tokens that are response (hwcompat's trainer computes logits only there); "
                        "default: the config's data's largest share, else 1.0 = the worst case")
    p.add_argument("--host-ram-gib", type=float, metavar="GIB",
                   help="plan for a host with this much RAM (offload=layers, optimizer_offload=host); default: "
                        "this host's")
    p.add_argument("--device", metavar="N", help="device position from `hwcompat detect` (default: first GPU)")
    p.add_argument("--suggest", action="store_true", help="say what does fit (or the cheapest change that fits)")
    p.add_argument("--json", action="store_true")
    add_device_options(p)
    p.set_defaults(func=run)


FLAG_KEYS = {"model": "model", "seq_len": "max_seq_len", "batch_size": "micro_batch_size", "lora_rank": "lora_r",
             "gc": "gradient_checkpointing", "optimizer": "optimizer"}


def train_config(args: argparse.Namespace):
    """The config `hwcompat train` would run (LoadedConfig): its defaults, the file, then flags and KEY=VALUE
    settings as command-line overrides, validated the same way."""
    from hwcompat.errors import InputError
    from hwcompat.train.config import load_config

    items = list(args.overrides or [])
    path = args.config
    if path and "=" in path:  # `plan --model M key=value`: the first override landed in the config slot
        items.insert(0, path)
        path = None
    flags = [f"{key}={str(v).lower() if isinstance(v, bool) else v}" for attr, key in FLAG_KEYS.items()
             if (v := getattr(args, attr)) is not None]
    method = args.method
    if method in ("dpo", "grpo", "qlora", "full"):
        flags.append({"qlora": "qlora=true", "full": "finetune=full"}.get(method, f"method={method}"))
    if not path and not args.model and not any(i.startswith("model=") for i in items):
        raise InputError("plan: which model? Give --model PATH (a folder with config.json) or a train config")
    from hwcompat.cli.demo import named_model

    loaded = named_model(load_config(path, flags + items, require_data=False), prepare=False)
    return loaded, None  # the method is a config setting now (finetune, qlora, method)


def make_plan(shape, device, loaded, inp, with_suggestions: bool, host_ram: int | None = None):
    """The plan on ``device``; ``offload: auto`` decided here exactly as `hwcompat train` decides it."""
    from hwcompat import plan as planner
    from hwcompat.pipeline.fit import device_memory, memory_choice

    prof = device.profile
    quant_ok = "nf4" in prof.quantization
    host = planner.host_for(device, host_ram, prof.dtype)
    memory = device_memory(loaded.config, device)

    def run(i):
        return planner.estimate(shape, i, prof.dtype, planner.planned_attention(prof.attention, prof.hardware),
                                device.reading.vendor, memory, quant_ok, host, planner.max_allocation(prof.hardware))

    choice = memory_choice(loaded, shape, inp, run, device.reading.vendor, device.reading.unified_memory)
    result = choice.plan
    if choice.changed:
        result.notes.append(f"`hwcompat train` changes: {choice.changed}")
    if inp.method == PlanMethod.qlora and not quant_ok:
        result.notes.append(f"{prof.name}: {prof.reasons.get('quantization.nf4', 'no NF4 support')}")
    if with_suggestions:
        from dataclasses import replace

        result = replace(result, suggestions=planner.suggest(shape, result, device.reading.vendor, quant_ok,
                                                       "optim8bit" in prof.quantization, host))
    return result


def render_stream(st) -> list[str]:
    """The streamed terms: host RAM, bytes moved and the estimated step time."""
    overlap = ("the training's copies overlap compute; the rollout's, "
               f"{gib(st.rollout_bytes)} (every layer per new token), add to it" if st.rollout_bytes else
               "copies overlap compute")
    step = (f"compute {st.compute_seconds:.1f} s, copies {st.copy_seconds:.1f} s -> ~{st.step_seconds:.1f} s per "
            f"micro-step ({overlap})" if st.step_seconds is not None else
            f"copies {st.copy_seconds:.1f} s per micro-step (no peak throughput for this card in the catalog)")
    ram = (f" of {gib(st.host_ram_bytes)}" + ("" if st.host_fits else " -> host RAM is the limit")
           if st.host_ram_bytes else "")
    return [f"offload=layers: {gib(st.layer_bytes)} per decoder layer, host RAM {gib(st.host_bytes)} (pinned){ram}",
            f"  moves {gib(st.bytes_per_micro_step)} per micro-step over {st.link} "
            f"(~{st.link_bytes_per_s / 1e9:.1f} GB/s): {step}"]


def render_host_optimizer(ho) -> list[str]:
    """optimizer_offload=host's host side: RAM (and whether this host has it), the copies of one step."""
    ram = (f" of {gib(ho.host_ram_bytes)}" + ("" if ho.host_fits else
                                                f" -> host RAM is the limit (about {ho.largest_params / 1e9:.1f}B "
                                                "parameters fit)") if ho.host_ram_bytes else "")
    return [f"optimizer_offload=host: host RAM {gib(ho.host_bytes)}{ram} (fp32 masters, gradients, AdamW moments)",
            f"  moves {gib(ho.bytes_per_step)} per step over {ho.link} (~{ho.copy_seconds:.1f} s of copies)"]


def render(result, shape, device, model: str) -> str:
    prof = device.profile
    inp = result.inputs
    lines = [f"{model}: {shape.model_type}, {result.params / 1e9:.2f}B parameters; {inp.method.upper()}"
             f"{f' r={inp.lora_rank}' if inp.method != PlanMethod.full else ''} trains {result.trainable_params:,}",
             f"on {device.reading.name} ({prof.name}: {prof.dtype}, attention {prof.attention}), "
             f"seq_len {inp.seq_len} x micro-batch {inp.batch_size}, gradient checkpointing "
             f"{'on' if inp.gradient_checkpointing else 'off'}, optimizer {inp.optimizer}, offload {inp.offload}"
             f"{', optimizer_offload ' + inp.optimizer_offload if inp.method == PlanMethod.full else ''}", ""]
    for k, v in result.breakdown.items():
        lines.append(f"  {k:20} {gib(v):>11}")
    verdict = "fits" if result.fits else f"does NOT fit (short by {gib(-result.headroom_bytes)})"
    lines.append(f"  {'peak':20} {gib(result.peak_bytes):>11} of {gib(result.device_bytes)} -> {verdict}"
                 + (f", headroom {gib(result.headroom_bytes)}" if result.fits else ""))
    lines.append("")
    if result.stream is not None:
        lines += render_stream(result.stream)
    if result.host_optimizer is not None:
        lines += render_host_optimizer(result.host_optimizer)
    lines.append(f"dtype {prof.dtype}: {prof.reasons['dtype']}")
    lines += [f"note: {n}" for n in result.notes]
    if result.suggestions:
        lines.append("suggestions:")
        for s in result.suggestions:
            lines.append(f"  {'fits ' if s.fits else 'still too big'}  {s.change}  (peak {gib(s.peak_bytes)})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hwcompat import plan as planner
    from hwcompat.errors import HwcompatError, InputError
    from hwcompat.pipeline.launch import training_device

    loaded, method = train_config(args)
    cfg = loaded.config
    shape = planner.load_shape(cfg.model)
    host = plan_from_args(args)
    _, device = training_device(host, args.device)
    if device.profile is None:
        raise HwcompatError(f"{device.reading.name}: no profile ({'; '.join(device.problems)})")
    fraction = args.response_fraction
    if fraction is None:
        fraction = 1.0
        if cfg.train_data:  # as `hwcompat train` plans: its data's largest response share
            from hwcompat.pipeline.preflight import check_data

            fraction = check_data(loaded)[1]
    inp = planner.plan_input(cfg, method=method, logit_fraction=fraction)
    ram = host.host_ram_bytes
    if args.host_ram_gib is not None:
        if not 0 < args.host_ram_gib < 1e6:
            raise InputError(f"--host-ram-gib {args.host_ram_gib:g}: give the host's RAM in GiB, e.g. 64")
        ram = int(args.host_ram_gib * 2**30)
    result = make_plan(shape, device, loaded, inp, args.suggest, ram)
    if args.json:
        print_json(result.to_dict())
    else:
        print(render(result, shape, device, cfg.model))
    return 0
