"""The resolver: (readings, profiles, installed software, overrides) -> decisions.

A pure function: no I/O, no environment reads. Every decision carries a
reason a user can act on. Decisions follow from capabilities (compute
capability, gfx target, the profile's hardware facts), never from product
names, so a card missing from the catalog resolves like its siblings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hwcompat import compat
from hwcompat.choices import Vendor
from hwcompat.errors import InputError
from hwcompat.profiles import Attention, CompileBackend, Dtype, Fp16Rate, Profile
from hwcompat.readings import Capability, DeviceReading, HostReading, gfx_from_override, override_from_gfx
from hwcompat.resolve.answers import HostPlan, ResolvedDevice, ResolvedProfile
from hwcompat.software import Software
from hwcompat.textcheck import closest

#: Oldest compute capability any current PyTorch CUDA wheel carries (cu126: sm_50).
MIN_CUDA_CC = Capability(5, 0)

SETTABLE = ("dtype", "attention", "compile_backend")  # plus env.NAME

#: Variables that change which code a process loads: set only with an explicit --allow-env NAME.
CODE_LOADING_VARS = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                     "PYTHONUSERBASE", "PYTHONEXECUTABLE", "BASH_ENV", "ENV", "PATH", "PROMPT_COMMAND")


@dataclass(frozen=True)
class Overrides:
    """What the user asked for on top of the matched profile."""

    profile: str | None = None  # --profile / HWCOMPAT_PROFILE
    sets: dict[str, str] = field(default_factory=dict)  # --set key=value

    @classmethod
    def parse(cls, profile: str | None, sets: list[str] | None, allow_env: list[str] | None = None) -> "Overrides":
        out: dict[str, str] = {}
        for item in sets or []:
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set dtype=float32")
            if key.startswith("env."):
                _check_env_name(key[4:], item, allow_env or [])
            if key not in SETTABLE and not key.startswith("env."):
                near = closest(key, SETTABLE)
                hint = f" Did you mean {near!r}?" if near else ""
                raise InputError(f"--set {item!r}: unknown key {key!r}.{hint} "
                                 f"Settable: {', '.join(SETTABLE)}, env.NAME")
            out[key] = value
        return cls(profile=profile, sets=out)


def _check_env_name(name: str, item: str, allowed: list[str]) -> None:
    """A variable name a shell can take literally; code-loading variables only when explicitly allowed."""
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise InputError(f"--set {item!r}: {name!r} is not a valid environment variable name "
                         "(letters, digits and _, not starting with a digit)")
    if name in CODE_LOADING_VARS and name not in allowed:
        raise InputError(f"--set {item!r}: {name} changes which code every process loads; if you mean it, add "
                         f"--allow-env {name}")


def _device_label(r: DeviceReading) -> str:
    return f"{r.name} ({r.arch})"


def match_profile(reading: DeviceReading, profiles: dict[str, Profile]) -> Profile | None:
    """The profile whose match rule covers this reading's physical capability."""
    for p in profiles.values():
        if p.match.covers(reading.vendor, reading.capability, reading.gfx_target, reading.xe_arch,
                          reading.cpu_flags):
            return p
    return None


def _why_matched(r: DeviceReading, p: Profile) -> str:
    if r.vendor == Vendor.nvidia:
        return f"compute capability {r.compute_capability} is in {p.name}'s range ({p.match.describe()})"
    if r.vendor == Vendor.amd:
        return f"physical target {r.gfx_target} is one of {p.name}'s {p.match.describe()}"
    if r.vendor == Vendor.intel:
        return f"PCI device 0x{r.pci_device_id or '?'} is {r.xe_arch}, {p.name}'s {p.match.describe()}"
    return "the CPU profile covers every CPU"


def _tegra_reason(r: DeviceReading) -> str:
    table = compat.wheel_table().get("tegra", {})
    return (f"{r.name} ({r.arch}) is an NVIDIA Jetson (Tegra) GPU: the "
            "desktop PyTorch wheels have no kernels for it (a desktop sm_80/sm_86 cubin does not run on a Tegra "
            f"part; {table.get('source', 'torch/cuda/__init__.py')}). To train there, {table.get('advice', '')}")


def _tegra_problems(r: DeviceReading, p: Profile) -> list[str]:
    """A Jetson runs the profile's aarch64 wheel only where that wheel's cubins apply at the CUDA its JetPack
    gives: Thor's own sm_110 on any CUDA 13 driver, Orin's sm_80 only from the unification (CUDA 13.2). The
    older one is refused (that torch has no kernels for it there); an unknown CUDA version is said."""
    if r.vendor != Vendor.nvidia or not compat.is_tegra(r.capability) or not p.torch.min_version:
        return []
    row = compat.family_row(p.torch.build, compat.major_minor(p.torch.min_version), machine="aarch64") or {}
    runtime = row.get("runtime", "0.0")
    if r.runtime_version and compat.major_minor(r.runtime_version) < compat.major_minor(runtime):
        runtime = r.runtime_version  # the device's CUDA decides what its driver runs
    if r.runtime_version and compat.covers_nvidia(row.get("targets", ()), r.capability, runtime):
        return []
    need = compat.wheel_table().get("tegra", {}).get("unified_from_cuda", "")
    fix = (f"the {p.name} profile needs JetPack 7.2 (CUDA {need}), where PyPI's aarch64 torch runs this GPU "
           "(catalog/wheels.yaml tegra); upgrade JetPack (older JetPack: NVIDIA's own torch for Jetson, which "
           "hwcompat does not train with)")
    if not r.runtime_version:
        return [f"note: {r.name}'s CUDA version is unknown; {fix}"]
    return [f"{r.name} ({r.arch}): its driver supports CUDA {r.runtime_version}; {fix}"]


def _unsupported_reason(r: DeviceReading) -> str:
    if r.vendor == Vendor.nvidia:
        cc = r.capability or Capability(0, 0)
        if cc < MIN_CUDA_CC:
            last = compat.last_wheels_for(cc)
            ended = (f" (its last wheels were the {last[0]} ones, torch <= {last[1]})" if last else
                     " (no PyTorch wheel ever had them)")
            return (f"compute capability {r.compute_capability} is below {MIN_CUDA_CC}: no current PyTorch "
                    f"wheel has kernels for it{ended}. Train on the CPU profile, use a newer card, or an old torch "
                    "built from source")
        return (f"compute capability {r.compute_capability} is newer than every known profile; "
                "try the closest one with --profile blackwell and report the result")
    if r.vendor == Vendor.amd:
        return (f"gfx target {r.gfx_target} is not covered by any profile (no PyTorch ROCm wheel and no known "
                "HSA_OVERRIDE_GFX_VERSION for it); train on the CPU profile, or force one with --profile "
                "if you know its closest target")
    return "no profile for this device"


def _hardware_for(p: Profile) -> dict[str, Any]:
    hw = asdict(p.hardware)
    hw["fp16"] = p.hardware.fp16.value
    return hw


def _check_dtype(value: str, hw: dict[str, Any], label: str, profile_choice: str, vendor: str) -> str:
    try:
        Dtype(value)
    except ValueError:
        raise InputError(f"dtype={value}: not a dtype; use one of {', '.join(d.value for d in Dtype)}") from None
    if value == "bfloat16" and not hw["bf16"]:
        why = hw["source"] if vendor == Vendor.cpu else "torch may emulate it, far slower"
        raise InputError(f"dtype=bfloat16: {label} has no bf16 hardware "
                         f"({why}); use {profile_choice} (this profile's choice)"
                         f"{' or float32' if profile_choice != 'float32' else ''}")
    if value == "float16" and hw["fp16"] == Fp16Rate.none.value:
        raise InputError(f"dtype=float16: {label} cannot train in fp16; use {profile_choice}")
    if value == "float16" and hw["fp16"] == Fp16Rate.slow.value:
        return f"set by the user; note: {label} runs fp16 far below its fp32 rate"
    return "set by the user"


def _check_attention(value: str, hw: dict[str, Any], sw: Software, label: str, vendor: str) -> str:
    try:
        Attention(value)
    except ValueError:
        raise InputError(f"attention={value}: use one of {', '.join(a.value for a in Attention)}") from None
    if value == Attention.cpu_bf16 and vendor != Vendor.cpu:
        raise InputError(f"attention=cpu_bf16 is hwcompat's attention for training on a CPU; {label} is not one: "
                         "use sdpa")
    if value == "flash_attention_2":
        if not hw["flash_attention_2"]:
            raise InputError(f"attention=flash_attention_2: {label} is not supported by flash-attention-2 "
                             "(NVIDIA needs Ampere, sm_80+; AMD needs MI200/MI300 or RDNA3/4); use sdpa")
        if not sw.flash_attn:
            raise InputError("attention=flash_attention_2: the flash_attn package is not installed; "
                             "pip install flash-attn --no-build-isolation, or use sdpa")
    return "set by the user"


def _check_compile(value: str, hw: dict[str, Any], label: str) -> str:
    try:
        CompileBackend(value)
    except ValueError:
        raise InputError(f"compile_backend={value}: use one of "
                         f"{', '.join(c.value for c in CompileBackend)}") from None
    if value == "inductor" and not hw["triton"]:
        raise InputError(f"compile_backend=inductor: {label} cannot run Triton kernels "
                         "(NVIDIA needs compute capability >= 7.0; torch raises GPUTooOldForTriton); use eager")
    return "set by the user"


def _run_target(r: DeviceReading, env: dict[str, str]) -> str | None:
    """The gfx target the ROCm runtime will run this card as: the override hwcompat sets, else the user's."""
    override = env.get("HSA_OVERRIDE_GFX_VERSION")
    if override:
        try:
            return gfx_from_override(override)
        except ValueError:
            return None
    return r.gfx_target_effective or r.gfx_target


def _amd_quantization(r: DeviceReading, p: Profile, env: dict[str, str], reasons: dict[str, str]) -> list[str]:
    """On AMD, bitsandbytes (NF4, LLM.int8, 8-bit optimizers) runs where the library the profile's torch loads
    has kernels for the target the card runs as (catalog/bitsandbytes.yaml, read from the wheel)."""
    found = compat.bnb_rocm_targets(p.torch.build)
    run = _run_target(r, env)
    if found is None or run is None:
        return [k for k, q in p.quantization.items() if q.supported]
    lib, targets, version = found
    as_ = f" ({r.gfx_target} runs as {run})" if run != r.gfx_target else ""
    ok = run in targets
    why = (f"bitsandbytes {version}'s {lib} (loaded by the {p.torch.build} torch) "
           f"{'has' if ok else 'has no'} {run} kernels{as_} (catalog/bitsandbytes.yaml)")
    for k in p.quantization:
        reasons[f"quantization.{k}"] = why + ("; the 8-bit optimizers use the same library" if k == "optim8bit"
                                              else "")
    return list(p.quantization) if ok else []


def _torch_problems(r: DeviceReading, p: Profile, sw: Software, env: dict[str, str]) -> list[str]:
    """Does the installed torch run this real device? Emulated devices are not this host's hardware."""
    t = sw.torch
    if r.emulated or r.vendor == Vendor.cpu or t is None:
        return []
    fix = f"{p.torch.install_command()} (or use the {p.image.tag} image)"
    problems = []
    why = compat.kernel_problem(t, r.vendor, r.capability, _run_target(r, env))
    if why:
        problems.append(f"installed {why}: {fix}")
    elif t.targets is None:
        problems.append(f"note: installed {t.describe()} is not in hwcompat's wheel table (catalog/wheels.yaml), so "
                        "whether it has kernels for this card is unknown; `hwcompat doctor` asks torch itself")
    release, cap = t.release, compat.release(p.torch.max_version)
    if release and cap and release > cap:
        problems.append(f"installed {t.describe()} is newer than {p.torch.max_version}, the last release with "
                        f"{p.name} kernels: {fix}")
    return problems


def _native_override(r: DeviceReading, sw: Software, env: dict[str, str], reasons: dict[str, str]) -> None:
    """Drop the profile's HSA_OVERRIDE_GFX_VERSION when the installed torch has the card's own kernels."""
    t = sw.torch
    if r.emulated or r.vendor != Vendor.amd or "HSA_OVERRIDE_GFX_VERSION" not in env or t is None or not t.targets:
        return
    if r.gfx_target in t.targets:
        del env["HSA_OVERRIDE_GFX_VERSION"]
        reasons["env.HSA_OVERRIDE_GFX_VERSION"] = (f"not set: the installed {t.describe()} carries native "
                                                   f"{r.gfx_target} kernels ({t.targets_from})")


def _choose(reading: DeviceReading, profiles: dict[str, Profile], forced: str | None
            ) -> tuple[Profile | None, str, list[str]]:
    """The profile family: the one that matches, or the one ``--profile`` forces; (profile, reason, problems)."""
    base = match_profile(reading, profiles)
    if not forced:
        return base, (_why_matched(reading, base) if base else ""), []
    if forced not in profiles:
        near = closest(forced, profiles)
        hint = f" Did you mean {near!r}?" if near else ""
        raise InputError(f"unknown profile {forced!r}.{hint} Known: {', '.join(sorted(profiles))}")
    chosen = profiles[forced]
    if chosen.vendor != reading.vendor:
        raise InputError(f"--profile {forced}: that profile is for {chosen.vendor} devices, "
                         f"but device {reading.index} is {reading.vendor} ({reading.name})")
    problems = []
    if base is None or base.name != forced:
        problems.append(f"warning: forced profile {forced} does not match this device "
                        f"({_why_matched(reading, base) if base else 'no profile matches it'}); "
                        "its choices may not run here")
    return chosen, f"forced with --profile {forced}", problems


def _dtype(p: Profile, hw: dict[str, Any], sets: dict[str, str], label: str) -> tuple[str, str]:
    if "dtype" in sets:
        return sets["dtype"], _check_dtype(sets["dtype"], hw, label, p.dtype.value, p.vendor)
    return p.dtype.value, p.dtype.reason


def _attention(p: Profile, hw: dict[str, Any], sets: dict[str, str], software: Software, label: str, dtype: str
               ) -> tuple[str, str]:
    if "attention" in sets:
        return sets["attention"], _check_attention(sets["attention"], hw, software, label, p.vendor)
    if p.attention.value == "flash_attention_2" and not software.flash_attn:
        return "sdpa", ("flash-attention-2 would be the choice here, but the flash_attn package is not "
                        "installed (pip install flash-attn --no-build-isolation); using PyTorch SDPA")
    if p.attention.value == Attention.cpu_bf16 and dtype != Dtype.bfloat16:
        return "sdpa", (f"cpu_bf16 pays off in bf16 only (in {dtype} it measured within 3-25% of SDPA's time at "
                        "the S^2 memory): SDPA")
    return p.attention.value, p.attention.reason


def _compile(p: Profile, hw: dict[str, Any], sets: dict[str, str], label: str) -> tuple[str, str]:
    if "compile_backend" in sets:
        return sets["compile_backend"], _check_compile(sets["compile_backend"], hw, label)
    return p.compile_backend.value, p.compile_backend.reason


def _environment(reading: DeviceReading, p: Profile, sets: dict[str, str], software: Software,
                 reasons: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The profile's variables, the user's ``env.NAME`` sets, and the ROCm override checked against the shell's."""
    env = {e.name: e.value for e in p.env}
    reasons.update({f"env.{e.name}": e.reason for e in p.env})
    for key, value in sets.items():
        if key.startswith("env."):
            env[key[4:]] = value
            reasons[key] = "set by the user"
    problems = _override_problems(reading, env)
    _native_override(reading, software, env, reasons)
    return env, problems


def _override_problems(reading: DeviceReading, env: dict[str, str]) -> list[str]:
    """An HSA_OVERRIDE_GFX_VERSION already in the shell that differs from what the card needs."""
    if reading.vendor != Vendor.amd or not reading.gfx_target_effective:
        return []
    wanted = env.get("HSA_OVERRIDE_GFX_VERSION")
    have = override_from_gfx(reading.gfx_target_effective)
    if wanted and have != wanted:
        return [f"HSA_OVERRIDE_GFX_VERSION={have} is set (runs {reading.gfx_target} as "
                f"{reading.gfx_target_effective}), but {reading.gfx_target} needs {wanted}: "
                f"export HSA_OVERRIDE_GFX_VERSION={wanted}"]
    if not wanted and reading.gfx_target_effective != reading.gfx_target:
        return [f"HSA_OVERRIDE_GFX_VERSION={have} is set but {reading.gfx_target} is in the ROCm "
                "wheels and needs no override: unset HSA_OVERRIDE_GFX_VERSION"]
    return []


def _quantization(reading: DeviceReading, p: Profile, env: dict[str, str], reasons: dict[str, str]) -> list[str]:
    reasons.update({f"quantization.{k}": q.reason for k, q in p.quantization.items()})
    if reading.vendor == Vendor.amd:
        return _amd_quantization(reading, p, env, reasons)
    return [k for k, q in p.quantization.items() if q.supported]


def _build_reasons(p: Profile, reasons: dict[str, str]) -> None:
    reasons["torch_build"] = p.torch.reason
    reasons["image"] = f"{p.image.tag} carries the {p.torch.build} torch build this family needs"
    if p.driver_min:
        reasons["driver"] = p.driver_min.reason


def resolve_device(reading: DeviceReading, profiles: dict[str, Profile], software: Software,
                   overrides: Overrides = Overrides(), apply_overrides: bool = True) -> ResolvedDevice:
    """Resolve one device: each choice from its own small rule, with its reason. Raises InputError for an
    override the hardware cannot honour."""
    label = _device_label(reading)
    forced = overrides.profile if apply_overrides else None
    chosen, why, problems = _choose(reading, profiles, forced)
    if chosen is None and reading.vendor == Vendor.nvidia and compat.is_tegra(reading.capability):
        return ResolvedDevice(reading, None, False, [_tegra_reason(reading)], None)
    if chosen is None:
        return ResolvedDevice(reading, None, False, [_unsupported_reason(reading)], None)
    p = chosen.for_device(reading.vendor, reading.capability, reading.gfx_target, reading.xe_arch,
                          reading.cpu_flags)
    reasons = {"profile": why + (f"; variant: {p.variant_note}" if p.variant_note else "")}
    hw = _hardware_for(p)
    supported = p.supported.value == "true"
    reasons["supported"] = p.supported.reason + (f" ({p.supported.source})" if p.supported.source else "")
    if not supported:
        problems.append(p.supported.reason)
    sets = overrides.sets if apply_overrides else {}
    dtype, reasons["dtype"] = _dtype(p, hw, sets, label)
    attention, reasons["attention"] = _attention(p, hw, sets, software, label, dtype)
    compile_backend, reasons["compile_backend"] = _compile(p, hw, sets, label)
    env, env_problems = _environment(reading, p, sets, software, reasons)
    quant = _quantization(reading, p, env, reasons)
    _build_reasons(p, reasons)
    tegra = _tegra_problems(reading, p)
    supported = supported and not (tegra and not tegra[0].startswith("note:"))
    problems += env_problems + tegra + _torch_problems(reading, p, software, env)
    resolved = ResolvedProfile(
        name=p.name, dtype=dtype, attention=attention, compile_backend=compile_backend, env=env,
        quantization=quant, torch_build=p.torch.build, torch_index_url=p.torch.index_url,
        torch_install=p.torch.install_command(),
        torch_max_version=p.torch.max_version, torch_min_version=p.torch.min_version,
        driver_min_version=p.driver_min.value if p.driver_min else None, image=p.image.tag,
        image_family=p.image.family, evidence=p.evidence.value, variant=p.variant_note,
        caveats=[c.text for c in p.caveats], reasons=reasons, hardware=hw,
        peak_tflops=dict(p.peak_tflops), peak_card=p.peak_card, evidence_note=p.evidence_note,
    )
    return ResolvedDevice(reading, p.name, supported, problems, resolved)


def resolve_host(host: HostReading, profiles: dict[str, Profile], software: Software,
                 overrides: Overrides = Overrides()) -> HostPlan:
    """Resolve every device. Overrides apply to the GPUs, or to the CPU when it is the only device."""
    has_gpu = any(d.vendor != Vendor.cpu for d in host.devices)
    devices = [resolve_device(d, profiles, software, overrides,
                              apply_overrides=(d.vendor != Vendor.cpu) or not has_gpu)
               for d in host.devices]
    groups: dict[str, dict[str, Any]] = {}
    for pos, d in enumerate(devices):
        if d.reading.vendor == Vendor.cpu and has_gpu or not d.supported or d.profile is None:
            continue
        g = groups.setdefault(d.profile.name, {"profile": d.profile.name, "image": d.profile.image,
                                               "vendor": d.reading.vendor, "devices": []})
        g["devices"].append(pos)
    out = list(groups.values())
    for g in out:
        g["can_train_together"] = len(g["devices"]) > 1
    return HostPlan(host, devices, out)

