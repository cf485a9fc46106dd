"""``hwcompat detect``: what each device is, what it can do, how to train on it."""

from __future__ import annotations

import argparse

from hwcompat.cli.common import add_device_options, gib, plan_dict_from_args, plan_from_args, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="list devices and the profile each resolves to",
                       description="List every device (GPUs first, the CPU last) with the profile hwcompat "
                                   "would train with. Never imports torch.")
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--explain", action="store_true", help="show the reason behind every choice")
    p.set_defaults(func=run)


def _cap(d) -> str:
    r = d.reading
    shifted = r.gfx_target and r.gfx_target_effective and r.gfx_target_effective != r.gfx_target
    return r.arch + (f"→{r.gfx_target_effective}" if shifted else "")


def _memory(r) -> str:
    return gib(r.memory_bytes) + (" unified" if r.unified_memory else "")


def printable(text: str) -> str:
    """A name a driver reported, safe on a terminal: control characters (an escape sequence) shown as \\xNN."""
    return "".join(c if 32 <= ord(c) and not 0x7f <= ord(c) < 0xa0 else f"\\x{ord(c):02x}" for c in text)


def render_table(plan, explain: bool = False) -> str:
    header = ["#", "NAME", "ARCH", "CAP", "MEMORY", "DTYPE", "ATTENTION", "COMPILE", "IMAGE", "EVIDENCE", "STATUS"]
    rows = []
    for pos, d in enumerate(plan.devices):
        p = d.profile
        status = "ok" if d.supported and not d.problems else ("unsupported" if not d.supported else "warning")
        # evidence: "verified" only when a real-card selftest result backs the profile, "path-verified" when a
        # bigger card ran its code path under the family's memory (both from committed bench/results/ files)
        rows.append([str(pos), printable(d.reading.name), d.arch or "-", _cap(d), _memory(d.reading),
                     p.dtype if p else "-", p.attention if p else "-", p.compile_backend if p else "-",
                     p.image if p else "-", p.evidence if p else "-", status])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    for pos, d in enumerate(plan.devices):
        notes = [f"  problem: {x}" for x in d.problems]
        if explain and d.profile:
            p = d.profile
            notes.append(f"  env: {' '.join(f'{k}={v}' for k, v in p.env.items()) or '(none)'}")
            notes.append(f"  quantization: {', '.join(p.quantization) or 'none'}; torch: {p.torch_build}"
                         f"{'; driver >= ' + p.driver_min_version if p.driver_min_version else ''}"
                         f"; evidence: {p.evidence}{f' ({p.evidence_note})' if p.evidence_note else ''}")
            notes.append(f"  install torch: {p.torch_install}")
            notes += [f"  why {k}: {v}" for k, v in p.reasons.items()]
            notes += [f"  caveat: {c}" for c in p.caveats]
        if notes:
            lines.append("")
            lines.append(f"[{pos}] {printable(d.reading.name)}" + (" (emulated)" if d.reading.emulated else ""))
            lines += notes
    gpu_groups = [g for g in plan.groups if g["vendor"] != "cpu"]
    if len(gpu_groups) > 1:
        lines.append("")
        lines.append("Devices of different families cannot share one training run; train each group on its own:")
        for g in gpu_groups:
            lines.append(f"  {g['profile']}: devices {', '.join(map(str, g['devices']))} → {g['image']}")
    elif gpu_groups and gpu_groups[0]["can_train_together"]:
        g = gpu_groups[0]
        lines.append("")
        lines.append(f"Devices {', '.join(map(str, g['devices']))} ({g['profile']}) can train together: "
                     "hwcompat train --devices all")
    for prob in plan.host.problems:
        lines.append(f"host problem: {prob}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print_json(plan_dict_from_args(args))
    else:
        print(render_table(plan_from_args(args), explain=args.explain))
    return 0
