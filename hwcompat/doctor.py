"""Doctor: is the installed stack right for each card? A pure core plus a fact gatherer.

``gather_stack()`` imports torch to read its version, build and compiled
arch list (``torch._C._cuda_getArchFlags``) and never touches a device.
``diagnose()`` is pure: (host plan, stack facts, environment) -> findings,
so every check is tested with emulated devices and fake stacks.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from hwcompat import compat
from hwcompat.choices import Vendor
from hwcompat.datafiles import data_dir
from hwcompat.readings import Capability
from hwcompat.resolve import HostPlan, ResolvedDevice
from hwcompat.yamlfile import load_packaged_yaml

SEVERITIES = ("error", "warning", "info", "ok")
MIN_SHM_BYTES = 1 << 30  # data-loader workers and NCCL need more than Docker's 64 MiB default


@dataclass(frozen=True)
class Stack:
    """Installed-software facts, as read from the packages themselves."""

    torch_version: str | None = None
    torch_cuda: str | None = None  # torch.version.cuda, e.g. "12.6"; None on CPU / ROCm builds
    torch_hip: str | None = None  # torch.version.hip, e.g. "6.4.43482"
    arch_list: tuple[str, ...] = ()  # "sm_50", "compute_90", "gfx90a" … the kernels compiled into torch
    bitsandbytes: str | None = None
    flash_attn: str | None = None
    transformers: str | None = None
    peft: str | None = None
    torch_xpu: str | None = None  # torch.version.xpu on Intel XPU builds


@dataclass(frozen=True)
class IntelHost:
    """What an Intel GPU needs from the host, as the filesystem shows it (``intel_facts``)."""

    level_zero: str | None = None  # the Level Zero loader found (libze_loader.so.1), or None
    render_nodes: tuple[str, ...] = ()  # /dev/dri/renderD* present
    readable: tuple[str, ...] = ()  # of those, the ones this process may open read-write
    render_group: bool = False  # this process is in the group that owns the render nodes


@dataclass(frozen=True)
class Finding:
    severity: str  # error (blocks training) | warning | info | ok
    check: str
    message: str
    fix: str = ""
    device: int | None = None  # position in the detect table; None for host-wide findings


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def gather_stack() -> Stack:
    """Read torch's build facts (imports torch; no CUDA init, no allocation)."""
    if importlib.util.find_spec("torch") is None:
        return Stack(bitsandbytes=_version("bitsandbytes"), flash_attn=_version("flash_attn") or _version("flash-attn"),
                     transformers=_version("transformers"), peft=_version("peft"))
    import torch

    flags = ""
    getter = getattr(torch._C, "_cuda_getArchFlags", None)
    if getter is not None:
        try:
            flags = getter() or ""
        except Exception:  # CPU builds may raise instead of returning nothing
            flags = ""
    return Stack(
        torch_version=torch.__version__, torch_cuda=getattr(torch.version, "cuda", None),
        torch_hip=getattr(torch.version, "hip", None), arch_list=tuple(flags.split()),
        bitsandbytes=_version("bitsandbytes"), flash_attn=_version("flash_attn") or _version("flash-attn"),
        transformers=_version("transformers"), peft=_version("peft"), torch_xpu=getattr(torch.version, "xpu", None))


#: Where the Level Zero loader lives on the distributions Intel's GPU packages support.
LEVEL_ZERO_PATHS = ("usr/lib/x86_64-linux-gnu/libze_loader.so.1", "usr/lib64/libze_loader.so.1",
                    "usr/lib/libze_loader.so.1", "usr/local/lib/libze_loader.so.1")


def intel_facts(root: str | Path = "/") -> IntelHost:
    """Level Zero and the DRM render nodes, read from the filesystem (no library is loaded)."""
    root = Path(root)
    loader = next((str(root / p) for p in LEVEL_ZERO_PATHS if (root / p).exists()), None)
    nodes = tuple(sorted(str(p) for p in (root / "dev/dri").glob("renderD*"))) if (root / "dev/dri").is_dir() else ()
    readable = tuple(n for n in nodes if os.access(n, os.R_OK | os.W_OK))
    groups = set(os.getgroups()) | {os.getegid()}
    owners = set()
    for n in nodes:
        try:
            owners.add(os.stat(n).st_gid)
        except OSError:
            pass
    return IntelHost(loader, nodes, readable, bool(owners) and owners <= groups)


def _intel_findings(d: ResolvedDevice, stack: Stack, intel: IntelHost | None, add) -> None:
    """An Intel GPU needs torch's XPU build, the Level Zero loader and a render node this user may open."""
    if not stack.torch_xpu:
        build = f"CUDA {stack.torch_cuda}" if stack.torch_cuda else f"ROCm {stack.torch_hip}" if stack.torch_hip \
            else "CPU"
        add("error", "torch_build", f"torch {stack.torch_version} is a {build} build: it cannot use this Intel GPU",
            pip_fix(d))
    else:
        add("ok", "torch_build", f"torch {stack.torch_version}: XPU build (SYCL {stack.torch_xpu})")
    if intel is None:
        return
    if intel.level_zero is None:
        add("error", "level_zero", "the Level Zero loader (libze_loader.so.1) is not installed, so torch's XPU "
            "build sees no device (Ubuntu 24.04+ packages it; older releases get it from Intel's GPU driver "
            "repository)", "sudo apt-get install -y libze1 libze-intel-gpu1 intel-opencl-icd")
    else:
        add("ok", "level_zero", f"Level Zero loader: {intel.level_zero}")
    if not intel.render_nodes:
        add("error", "render_node", "no /dev/dri/renderD* node: the kernel driver is not loaded (xe for Battlemage, "
            "Linux 6.12+; i915 for Alchemist), or the container was started without --device=/dev/dri",
            "sudo modprobe xe   (or i915; in a container: docker run --device=/dev/dri)")
    elif not intel.readable:
        add("error", "render_node", f"{', '.join(intel.render_nodes)} exist but this user may not open them"
            + ("" if intel.render_group else " (not in the render group)"),
            "sudo usermod -aG render \"$USER\"   (then log out and in; in a container: --group-add "
            "\"$(stat -c %g /dev/dri/renderD128)\")")
    else:
        add("ok", "render_node", f"{', '.join(intel.readable)} readable")


@lru_cache(maxsize=1)
def driver_floors() -> dict[str, str]:
    table = load_packaged_yaml(data_dir("catalog") / "runtimes.yaml", "runtime table")
    return {str(k): str(v) for k, v in table["cuda_driver_floor"].items()}


_vt = compat.version_tuple  # the one version parser


def pip_fix(d: ResolvedDevice) -> str:
    return f"{d.profile.torch_install}   (or use the {d.profile.image} image)"


def _installed(stack: Stack) -> compat.InstalledTorch:
    return compat.InstalledTorch.from_arch_list(stack.torch_version, stack.torch_cuda, stack.torch_hip,
                                                stack.arch_list)


def _device_findings(pos: int, d: ResolvedDevice, stack: Stack, environ: Mapping[str, str],
                     intel: IntelHost | None = None) -> list[Finding]:
    r, p = d.reading, d.profile
    label = f"{r.name} ({d.arch or 'unknown'})"
    out: list[Finding] = []

    def add(sev: str, check: str, msg: str, fix: str = "") -> None:
        out.append(Finding(sev, check, f"{label}: {msg}", fix, pos))

    if not d.supported or p is None:
        add("error", "supported", "; ".join(d.problems) or "no profile covers this device")
        return out
    if stack.torch_version is None:
        add("error", "torch", "torch is not installed", pip_fix(d))
        return out
    if r.vendor == Vendor.nvidia:
        _nvidia_findings(d, stack, add)
    elif r.vendor == Vendor.intel:
        _intel_findings(d, stack, intel, add)
    elif r.vendor == Vendor.amd:
        _amd_findings(d, stack, environ, add)
    if p.torch_max_version and _vt(stack.torch_version)[:2] > _vt(p.torch_max_version)[:2] and r.vendor != Vendor.cpu:
        add("error", "torch_version", f"torch {stack.torch_version} is newer than {p.torch_max_version}, the last "
            f"release with {d.arch} kernels", pip_fix(d))
    _package_findings(p, stack, environ, add)
    return out


def _nvidia_findings(d: ResolvedDevice, stack: Stack, add) -> None:
    """A CUDA build, kernels for the card's sm_XY, and a driver new enough for torch's CUDA runtime."""
    r = d.reading
    if not stack.torch_cuda:
        build = f"a ROCm build (HIP {stack.torch_hip})" if stack.torch_hip else "a CPU build"
        add("error", "torch_build", f"torch {stack.torch_version} is {build}: it cannot use this NVIDIA GPU",
            pip_fix(d))
    else:
        cc = r.capability or Capability(0, 0)
        why = compat.kernel_problem(_installed(stack), "nvidia", cc, None)
        if why:
            add("error", "kernels", why, pip_fix(d))
        else:
            add("ok", "kernels", f"torch {stack.torch_version} (CUDA {stack.torch_cuda}) has kernels for "
                f"{cc.sm}")
        floor = driver_floors().get(stack.torch_cuda.split(".")[0])
        if floor and r.driver_version and _vt(r.driver_version) < _vt(floor):
            # torch must change anyway when it has no kernels for the card: a driver for its runtime would only
            # strand an old card (R580 is the last branch for Maxwell, Pascal and Volta)
            fix = pip_fix(d) if why else f"upgrade the NVIDIA driver to >= {floor}, or {pip_fix(d)}"
            add("error", "driver", f"driver {r.driver_version} is older than {floor}, the minimum for torch's "
                f"CUDA {stack.torch_cuda} runtime", fix)
        elif floor and r.driver_version:
            add("ok", "driver", f"driver {r.driver_version} >= {floor} (CUDA {stack.torch_cuda})")


def _amd_findings(d: ResolvedDevice, stack: Stack, environ: Mapping[str, str], add) -> None:
    """A ROCm build, the GFX override the card needs (and no other), kernels, and the ROCm runtime's version."""
    r, p = d.reading, d.profile
    if not stack.torch_hip:
        add("error", "torch_build", f"torch {stack.torch_version} is not a ROCm build: it cannot use this AMD GPU",
            pip_fix(d))
    else:
        want = p.env.get("HSA_OVERRIDE_GFX_VERSION")
        have = environ.get("HSA_OVERRIDE_GFX_VERSION")
        effective = r.gfx_target_effective or r.gfx_target
        if want and have != want:
            if have:
                add("error", "gfx_override", f"HSA_OVERRIDE_GFX_VERSION={have} is set, but {r.gfx_target} needs "
                    f"{want}", f"export HSA_OVERRIDE_GFX_VERSION={want}")
            else:
                add("warning", "gfx_override", f"{r.gfx_target} is not in the ROCm wheels and needs "
                    f"HSA_OVERRIDE_GFX_VERSION={want}; `hwcompat train` sets it, your own scripts must "
                    "('HIP error: invalid device function' otherwise)", f"export HSA_OVERRIDE_GFX_VERSION={want}")
        elif not want and have:
            add("warning", "gfx_override", f"HSA_OVERRIDE_GFX_VERSION={have} is set but {r.gfx_target} needs "
                "no override", "unset HSA_OVERRIDE_GFX_VERSION")
        elif not want and compat.kernel_problem(_installed(stack), "amd", None, effective):
            add("error", "kernels", compat.kernel_problem(_installed(stack), "amd", None, effective), pip_fix(d))
        else:
            add("ok", "kernels", f"torch {stack.torch_version} (HIP {stack.torch_hip}) runs {r.gfx_target}"
                + (f" as {want}" if want else ""))
        if r.runtime_version and _vt(stack.torch_hip)[:2] != _vt(r.runtime_version)[:2]:
            add("info", "rocm", f"torch is built for ROCm {'.'.join(map(str, _vt(stack.torch_hip)[:2]))}, the "
                f"system has ROCm {r.runtime_version}; the wheel bundles its runtime, the kernel driver must "
                "support it")


def _package_findings(p, stack: Stack, environ: Mapping[str, str], add) -> None:
    """bitsandbytes and flash_attn against what the card runs, and the allocator setting against the profile's."""
    nf4 = "nf4" in p.quantization
    if stack.bitsandbytes and not nf4:
        add("warning", "bitsandbytes", f"bitsandbytes {stack.bitsandbytes} is installed but QLoRA will fail here: "
            f"{p.reasons.get('quantization.nf4', '')}", "train with plain LoRA (qlora=false)")
    elif nf4 and not stack.bitsandbytes:
        add("info", "bitsandbytes", "QLoRA (4-bit) would work on this card once bitsandbytes is installed",
            "pip install bitsandbytes")
    elif nf4:
        add("ok", "bitsandbytes", f"bitsandbytes {stack.bitsandbytes}: QLoRA available")
    fa_hw = p.hardware.get("flash_attention_2", False)
    if stack.flash_attn and not fa_hw:
        add("info", "flash_attn", f"flash_attn {stack.flash_attn} is installed but does not run on this card; "
            "sdpa is used")
    elif fa_hw and not stack.flash_attn:
        add("info", "flash_attn", "flash-attention-2 would run on this card and enables padding-free packing",
            "pip install flash-attn --no-build-isolation")
    elif fa_hw:
        add("ok", "flash_attn", f"flash_attn {stack.flash_attn}: flash-attention-2 in use")
    alloc = environ.get("PYTORCH_CUDA_ALLOC_CONF")
    want_alloc = p.env.get("PYTORCH_CUDA_ALLOC_CONF")
    if alloc and want_alloc and alloc != want_alloc:
        add("warning", "allocator", f"PYTORCH_CUDA_ALLOC_CONF={alloc} differs from the profile's {want_alloc} "
            "(fragmentation OOMs on long runs)", f"export PYTORCH_CUDA_ALLOC_CONF={want_alloc}")


#: transformers from which ``from_pretrained(dtype=...)`` is honoured (transformers PR #39782, in 4.56): before it
#: the keyword was ``torch_dtype``, ``dtype`` was ignored and the weights loaded in fp32, twice the planned memory.
#: pyproject's requirement says the same (tests/test_doctor.py keeps the two equal).
TRANSFORMERS_FLOOR = "4.56"


def _transformers_finding(stack: Stack) -> Finding | None:
    if stack.transformers is None:
        return None
    if _vt(stack.transformers)[:2] < _vt(TRANSFORMERS_FLOOR)[:2]:
        return Finding("error", "transformers", f"transformers {stack.transformers} ignores from_pretrained(dtype=…) "
                       f"(honoured from {TRANSFORMERS_FLOOR}, transformers PR #39782): weights would load in fp32, "
                       "twice the planned memory", f"pip install 'transformers>={TRANSFORMERS_FLOOR}'")
    return Finding("ok", "transformers", f"transformers {stack.transformers} >= {TRANSFORMERS_FLOOR}")


def diagnose(plan: HostPlan, stack: Stack, environ: Mapping[str, str], shm_bytes: int | None = None,
             in_container: bool = False, intel: IntelHost | None = None) -> list[Finding]:
    """All findings for this host; any 'error' means training is blocked."""
    out: list[Finding] = []
    has_gpu = any(d.reading.vendor != Vendor.cpu for d in plan.devices)
    if stack.torch_version is None:
        out.append(Finding("error", "torch", "torch is not installed",
                           "pip install torch --index-url https://download.pytorch.org/whl/cpu (CPU) or the command "
                           "for your card below"))
    else:
        build = (f"CUDA {stack.torch_cuda}" if stack.torch_cuda else f"ROCm (HIP {stack.torch_hip})" if stack.torch_hip
                 else f"XPU (SYCL {stack.torch_xpu})" if stack.torch_xpu else "CPU")
        out.append(Finding("ok", "torch", f"torch {stack.torch_version}: {build} build"
                           + (f"; kernels: {' '.join(stack.arch_list)}" if stack.arch_list else "")))
    tf = _transformers_finding(stack)
    if tf is not None:
        out.append(tf)
    for pos, d in enumerate(plan.devices):
        if d.reading.vendor == Vendor.cpu:
            if not has_gpu and stack.torch_version:
                out.append(Finding("ok", "cpu", f"no GPU found: training runs on {d.reading.name} "
                                   f"({d.reading.cpu_cores} cores) with the cpu profile", device=pos))
            continue
        out += _device_findings(pos, d, stack, environ, intel)
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"):
        if environ.get(var) is not None:
            out.append(Finding("warning", "visible_devices", f"{var}={environ[var]!r} is set: torch sees only those "
                               "devices, in that order, while `hwcompat detect` lists all of them",
                               f"unset {var} unless you meant it; `hwcompat env --device N` sets it per run"))
    nv = [d for d in plan.devices if d.reading.vendor == Vendor.nvidia]
    if len({d.reading.name for d in nv}) > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        out.append(Finding("warning", "device_order", "mixed NVIDIA cards and CUDA_DEVICE_ORDER is not PCI_BUS_ID: "
                           "CUDA numbers the fastest card first, so torch's cuda:0 may not be detect's device 0",
                           "export CUDA_DEVICE_ORDER=PCI_BUS_ID"))
    if in_container and shm_bytes is not None and shm_bytes < MIN_SHM_BYTES:
        out.append(Finding("warning", "shm", f"/dev/shm is {shm_bytes // 2**20} MiB in this container: data-loader "
                           "workers and NCCL crash with 'bus error'", "docker run --ipc=host (or --shm-size=8g)"))
    for prob in plan.host.problems:
        out.append(Finding("warning", "probe", prob))
    return out


def host_facts(root: str | Path = "/") -> tuple[int | None, bool]:
    """(/dev/shm size, running in a container?) from the filesystem."""
    root = Path(root)
    try:
        st = os.statvfs(root / "dev/shm")
        shm = st.f_blocks * st.f_frsize
    except OSError:
        shm = None
    container = (root / ".dockerenv").exists() or (root / "run/.containerenv").exists()
    try:
        cg = (root / "proc/1/cgroup").read_text()
        container = container or any(k in cg for k in ("docker", "kubepods", "containerd", "libpod"))
    except OSError:
        pass
    return shm, container


def to_dict(findings: list[Finding], stack: Stack) -> dict[str, Any]:
    return {"ok": not any(f.severity == "error" for f in findings), "stack": asdict(stack),
            "findings": [asdict(f) for f in findings]}
