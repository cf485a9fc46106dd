"""Table-driven resolution of every catalog device, plus overrides and software facts."""

import pytest

from hwcompat.errors import InputError
from hwcompat.probe.emulate import catalog, from_catalog, parse_reading
from hwcompat.profiles import load_profiles
from hwcompat.readings import HostReading
from hwcompat.resolve import Overrides, resolve_device, resolve_host
from hwcompat.software import Software

PROFILES = load_profiles()
NO_FA = Software.with_torch("2.13.0+cpu")
WITH_FA = Software.with_torch("2.13.0+cu130", flash_attn=True)

# name, arch, dtype, attention (flash_attn not installed), compile, supported, env that must be present
ROWS = [
    ("m40", "maxwell", "float32", "sdpa", "eager", True, {"TORCHDYNAMO_DISABLE": "1"}),  # no bf16, slow fp16, no Triton
    ("k80", None, None, None, None, False, {}),  # sm_37: no wheel has kernels
    ("gtx1080ti", "pascal", "float32", "sdpa", "eager", True, {"TORCHDYNAMO_DISABLE": "1"}),  # sm_61 fp16 is 1/64
    ("p40", "pascal", "float32", "sdpa", "eager", True, {"TORCHDYNAMO_DISABLE": "1"}),  # same silicon as 1080 Ti
    ("p100", "pascal", "float16", "sdpa", "eager", True, {"TORCHDYNAMO_DISABLE": "1"}),  # sm_60 variant: fast fp16
    ("v100", "volta", "float16", "sdpa", "inductor", True,  # tensor cores fp16, Triton ok
     {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    ("v100-16", "volta", "float16", "sdpa", "inductor", True,  # the 16 GB PCIe card: same silicon
     {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    ("t4", "turing", "float16", "sdpa", "inductor", True, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),  # no bf16, no FA2
    ("a100", "ampere", "bfloat16", "sdpa", "inductor", True, {}),  # FA2-capable, package missing -> sdpa
    ("rtx3090", "ampere", "bfloat16", "sdpa", "inductor", True, {}),  # sm_86 is Ampere too
    ("rtx4090", "ada", "bfloat16", "sdpa", "inductor", True, {}),
    ("l4", "ada", "bfloat16", "sdpa", "inductor", True, {}),
    ("h100", "hopper", "bfloat16", "sdpa", "inductor", True, {}),
    # Jetson (JetPack 7.2, CUDA 13.2): the jetson profile, never the desktop ampere / blackwell (#36.5)
    ("orin", "jetson", "bfloat16", "sdpa", "eager", True, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
    ("thor", "jetson", "bfloat16", "sdpa", "eager", True, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
    ("b200", "blackwell", "bfloat16", "sdpa", "inductor", True, {}),  # sm_100
    ("rtx5090", "blackwell", "bfloat16", "sdpa", "inductor", True, {}),  # sm_120
    ("rx6600", "rdna2", "float16", "sdpa", "eager", True, {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}),  # gfx1032 not in wheels
    ("rx6700xt", "rdna2", "float16", "sdpa", "eager", True, {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}),  # gfx1031
    ("rx6800", "rdna2", "float16", "sdpa", "eager", True, {}),  # gfx1030 is in the wheels: no override
    ("rx5700xt", "rdna1", "float16", "sdpa", "eager", True, {}),  # gfx1010: AMD's native wheels, no override
    ("rx7900xt", "rdna3", "bfloat16", "sdpa", "inductor", True, {}),  # gfx1100: AOTriton's flag only where experimental
    ("rx7900xtx", "rdna3", "bfloat16", "sdpa", "inductor", True, {}),
    ("rx9070xt", "rdna4", "bfloat16", "sdpa", "inductor", True, {}),  # gfx1201
    # #36.9: gfx906 was refused as "no PyTorch ROCm wheel"; the rocm6.3 wheels (torch <= 2.9) run it
    ("mi50", "vega20", "float16", "sdpa", "eager", True, {"TORCHDYNAMO_DISABLE": "1"}),
    ("radeon-vii", "vega20", "float16", "sdpa", "eager", True, {"TORCHDYNAMO_DISABLE": "1"}),
    ("mi100", "cdna1", "bfloat16", "sdpa", "eager", True, {"TORCHDYNAMO_DISABLE": "1"}),  # no AOTriton for gfx908
    ("mi250", "cdna2", "bfloat16", "sdpa", "inductor", True, {}),
    ("mi300x", "cdna3", "bfloat16", "sdpa", "inductor", True, {}),
    ("mi355x", "cdna4", "bfloat16", "sdpa", "inductor", True, {}),  # #36.12: gfx950 is CDNA4 (was cdna3's)
    ("a380", "alchemist", "bfloat16", "sdpa", "eager", True, {"SYCL_CACHE_PERSISTENT": "1"}),  # Intel Xe-HPG
    ("a770", "alchemist", "bfloat16", "sdpa", "eager", True, {"SYCL_CACHE_PERSISTENT": "1"}),
    ("b580", "battlemage", "bfloat16", "sdpa", "eager", True, {"SYCL_CACHE_PERSISTENT": "1"}),  # Intel Xe2-HPG
    ("arc-pro-b60", "battlemage", "bfloat16", "sdpa", "eager", True, {"SYCL_CACHE_PERSISTENT": "1"}),
    ("cpu", "cpu", "float32", "sdpa", "eager", True, {"TOKENIZERS_PARALLELISM": "false"}),
]


def test_every_catalog_device_has_a_row():
    assert {r[0] for r in ROWS} == set(catalog())


@pytest.mark.parametrize("name,arch,dtype,attention,compile_backend,supported,env", ROWS, ids=[r[0] for r in ROWS])
def test_catalog_device_resolves(name, arch, dtype, attention, compile_backend, supported, env):
    d = resolve_device(from_catalog([name])[0], PROFILES, NO_FA)
    assert d.arch == arch
    assert d.supported is supported
    if arch is None:
        assert d.profile is None and d.problems
        return
    p = d.profile
    assert (p.dtype, p.attention, p.compile_backend) == (dtype, attention, compile_backend)
    for k, v in env.items():
        assert p.env[k] == v
    for key in ("profile", "dtype", "attention", "compile_backend", "torch_build", "image"):
        assert p.reasons[key], key
    assert p.image == f"hwcompat:{p.image_family}"


def test_gfx1030_needs_no_override():
    d = resolve_device(from_catalog(["rx6800"])[0], PROFILES, NO_FA)
    assert "HSA_OVERRIDE_GFX_VERSION" not in d.profile.env


def test_flash_attention_when_installed():
    d = resolve_device(from_catalog(["rtx3090"])[0], PROFILES, WITH_FA)
    assert d.profile.attention == "flash_attention_2"
    d = resolve_device(from_catalog(["rtx3090"])[0], PROFILES, NO_FA)
    assert d.profile.attention == "sdpa"
    assert "flash_attn package is not installed" in d.profile.reasons["attention"]
    # installed, but the card cannot run it: still sdpa
    d = resolve_device(from_catalog(["t4"])[0], PROFILES, WITH_FA)
    assert d.profile.attention == "sdpa"


# Devices not in the catalog resolve from their capability alone.
UNCATALOGUED = [
    ({"vendor": "nvidia", "name": "Quadro M6000", "compute_capability": "5.2", "memory_bytes": 12 << 30}, "maxwell", "float32"),
    ({"vendor": "nvidia", "name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6", "memory_bytes": 12 << 30}, "ampere", "bfloat16"),
    ({"vendor": "nvidia", "name": "NVIDIA GeForce RTX 2080 Ti", "compute_capability": "7.5", "memory_bytes": 11 << 30}, "turing", "float16"),
    # Jetson Nano (sm_53) no longer resolves to maxwell: a Tegra part is refused with the JetPack advice (#23.2,
    # tests/test_wheel_facts.py)
    ({"vendor": "amd", "name": "RX 6500 XT", "gfx_target": "gfx1034", "memory_bytes": 4 << 30}, "rdna2", "float16"),
    ({"vendor": "amd", "name": "RX 7600", "gfx_target": "gfx1102", "memory_bytes": 8 << 30}, "rdna3", "bfloat16"),
]


@pytest.mark.parametrize("entry,arch,dtype", UNCATALOGUED, ids=[e[0]["name"] for e in UNCATALOGUED])
def test_uncatalogued_device_resolves_from_capability(entry, arch, dtype):
    d = resolve_device(parse_reading(entry, "test"), PROFILES, NO_FA)
    assert (d.arch, d.profile.dtype, d.supported) == (arch, dtype, True)


def test_unknown_gfx_target_is_unsupported_with_advice():
    d = resolve_device(parse_reading({"vendor": "amd", "name": "Vega 56", "gfx_target": "gfx9ff",
                                      "memory_bytes": 8 << 30}, "t"), PROFILES, NO_FA)
    assert not d.supported and d.profile is None
    assert "gfx9ff is not covered by any profile" in d.problems[0]


def test_newer_than_known_nvidia_is_unsupported_with_hint():
    d = resolve_device(parse_reading({"vendor": "nvidia", "name": "Future", "compute_capability": "13.0",
                                      "memory_bytes": 1 << 30}, "t"), PROFILES, NO_FA)
    assert not d.supported and "--profile blackwell" in d.problems[0]


def test_known_bad_targets():
    """gfx1033's override gave wrong gradients: it runs on AMD's native kernels only (#23.3, which found the old
    refusal unsourced). gfx1103's override hangs: never set."""
    d = resolve_device(parse_reading({"vendor": "amd", "name": "APU", "gfx_target": "gfx1033",
                                      "memory_bytes": 1 << 30}, "t"), PROFILES, NO_FA)
    assert d.supported and "HSA_OVERRIDE_GFX_VERSION" not in d.profile.env
    assert "torch[device-gfx1033]" in d.profile.torch_install
    d = resolve_device(parse_reading({"vendor": "amd", "name": "APU", "gfx_target": "gfx1103",
                                      "memory_bytes": 1 << 30}, "t"), PROFILES, NO_FA)
    assert d.supported and "HSA_OVERRIDE_GFX_VERSION" not in d.profile.env
    # #36.10: gfx1103 is in the pytorch.org rocm7.14 wheels (torch 2.14, pytorch PR #194367); old: AMD's only
    assert any("hang" in c for c in d.profile.caveats) and d.profile.torch_install.startswith(
        "pip install 'torch>=2.14' --index-url https://download.pytorch.org/whl/rocm7.14")
    d = resolve_device(parse_reading({"vendor": "amd", "name": "APU", "gfx_target": "gfx1152",
                                      "memory_bytes": 1 << 30}, "t"), PROFILES, NO_FA)
    assert d.profile.torch_install.startswith(
        "pip install 'torch[device-gfx1152]>=2.12' --index-url https://repo.amd.com/rocm/whl-multi-arch/")


def test_kepler_message():
    d = resolve_device(from_catalog(["k80"])[0], PROFILES, NO_FA)
    assert d.problems == ["compute capability 3.7 is below 5.0: no current PyTorch wheel has kernels for it "
                          "(its last wheels were the cu118 ones, torch <= 2.7). Train on the CPU profile, "
                          "use a newer card, or an old torch built from source"]  # #23: the wheel table's ceiling


# --- overrides ---------------------------------------------------------------------------------

def _resolve(name, *sets, profile=None, sw=NO_FA):
    return resolve_device(from_catalog([name])[0], PROFILES, sw, Overrides.parse(profile, list(sets)))


def test_bf16_on_v100_is_refused_with_what_to_use():
    with pytest.raises(InputError) as e:
        _resolve("v100", "dtype=bfloat16")
    assert str(e.value) == ("dtype=bfloat16: Tesla V100-SXM2-32GB (sm_70) has no bf16 hardware "
                            "(torch may emulate it, far slower); use float16 (this profile's choice) or float32")


def test_fa2_on_t4_is_refused():
    with pytest.raises(InputError, match="not supported by flash-attention-2"):
        _resolve("t4", "attention=flash_attention_2", sw=WITH_FA)


def test_fa2_without_package_is_refused():
    with pytest.raises(InputError, match="flash_attn package is not installed"):
        _resolve("a100", "attention=flash_attention_2")


def test_inductor_on_p40_is_refused():
    with pytest.raises(InputError, match="GPUTooOldForTriton"):
        _resolve("p40", "compile_backend=inductor")


def test_valid_overrides_apply_with_reason():
    d = _resolve("a100", "dtype=float32", "env.PYTORCH_CUDA_ALLOC_CONF=backend:native")
    assert d.profile.dtype == "float32" and d.profile.reasons["dtype"] == "set by the user"
    assert d.profile.env["PYTORCH_CUDA_ALLOC_CONF"] == "backend:native"


def test_fp16_on_p40_allowed_but_noted():
    d = _resolve("p40", "dtype=float16")
    assert "far below its fp32 rate" in d.profile.reasons["dtype"]


def test_unknown_set_key():
    with pytest.raises(InputError) as e:
        Overrides.parse(None, ["dtyp=float32"])
    assert str(e.value) == ("--set 'dtyp=float32': unknown key 'dtyp'. Did you mean 'dtype'? "
                            "Settable: dtype, attention, compile_backend, env.NAME")


def test_unknown_profile():
    with pytest.raises(InputError, match="unknown profile 'amper'. Did you mean 'ampere'?"):
        _resolve("a100", profile="amper")


def test_forced_profile_for_other_vendor_is_refused():
    with pytest.raises(InputError, match="that profile is for amd devices, but device 0 is nvidia"):
        _resolve("a100", profile="rdna3")


def test_forced_profile_warns_when_it_does_not_match():
    d = _resolve("rtx3090", profile="blackwell")
    assert d.arch == "blackwell" and d.profile.reasons["profile"] == "forced with --profile blackwell"
    assert d.problems[0].startswith("warning: forced profile blackwell does not match")


# --- HSA override and software facts ----------------------------------------------------------

def test_wrong_hsa_override_is_a_problem():
    r = parse_reading({"vendor": "amd", "name": "RX 6600", "gfx_target": "gfx1032",
                       "gfx_target_effective": "gfx1100", "memory_bytes": 8 << 30}, "t")
    d = resolve_device(r, PROFILES, NO_FA)
    assert ("HSA_OVERRIDE_GFX_VERSION=11.0.0 is set (runs gfx1032 as gfx1100), but gfx1032 needs 10.3.0: "
            "export HSA_OVERRIDE_GFX_VERSION=10.3.0") in d.problems


def test_needless_hsa_override_is_a_problem():
    r = parse_reading({"vendor": "amd", "name": "RX 7900", "gfx_target": "gfx1100",
                       "gfx_target_effective": "gfx1030", "memory_bytes": 8 << 30}, "t")
    assert any("needs no override" in p for p in resolve_device(r, PROFILES, NO_FA).problems)


def _real(name):
    from dataclasses import replace
    return replace(from_catalog([name])[0], emulated=False, source="nvml")


def test_cpu_torch_on_real_gpu_is_a_problem():
    d = resolve_device(_real("m40"), PROFILES, NO_FA)
    assert d.problems[0].startswith("installed torch 2.13.0+cpu (CPU build) cannot use an NVIDIA GPU: "
                                    "pip install 'torch<2.15' --index-url https://download.pytorch.org/whl/cu126")


def test_too_new_torch_for_pascal():
    d = resolve_device(_real("p40"), PROFILES, Software.with_torch("2.15.0+cu126"))
    assert any("newer than 2.14" in p for p in d.problems)


def test_cu130_torch_on_maxwell_has_no_kernels():
    d = resolve_device(_real("m40"), PROFILES, Software.with_torch("2.13.0+cu130"))
    assert any("no kernel image is available" in p for p in d.problems)


def test_emulated_devices_are_not_checked_against_local_torch():
    assert resolve_device(from_catalog(["m40"])[0], PROFILES, NO_FA).problems == []


# --- host summary -----------------------------------------------------------------------------

def test_multi_device_host_groups_by_family():
    devs = tuple(from_catalog(["m40", "p40", "p40", "rx6600"])) + tuple(from_catalog(["cpu"]))
    from hwcompat.probe import _reindex
    host = HostReading(devices=tuple(_reindex(list(devs[:-1]))) + devs[-1:])
    plan = resolve_host(host, PROFILES, NO_FA)
    groups = {g["profile"]: g for g in plan.groups}
    assert groups["pascal"]["devices"] == [1, 2] and groups["pascal"]["can_train_together"]
    assert groups["maxwell"]["can_train_together"] is False
    assert "cpu" not in groups  # with GPUs, the CPU is the fallback, not a training group
    assert [d.reading.index for d in plan.devices] == [0, 1, 2, 0, 0]


def test_overrides_skip_cpu_fallback_on_gpu_hosts():
    host = HostReading(devices=tuple(from_catalog(["a100", "cpu"])))
    plan = resolve_host(host, PROFILES, NO_FA, Overrides.parse(None, ["dtype=bfloat16"]))
    assert plan.devices[0].profile.dtype == "bfloat16" and plan.devices[1].profile.dtype == "float32"


# --- the CPU's own flags pick its dtype (#41 §1) -------------------------------------------------------------------

CPU_FLAG_SETS = [
    # flags (as /proc/cpuinfo names them), dtype, bf16 allowed, what the variant note names
    (["avx", "avx2", "fma", "f16c"], "float32", False, None),  # AVX2-only (Zen 2, Skylake client)
    (["avx", "avx2", "fma", "avx512f"], "float32", False, None),  # AVX-512 without BF16 (Skylake-SP): emulated bf16
    (["avx", "avx2", "avx512f", "avx512_bf16"], "bfloat16", True, "AVX512-BF16"),  # Cooper Lake, Zen 4/5
    (["avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"], "bfloat16", True, "AMX"),  # Sapphire Rapids
    (["asimd", "sve", "bf16"], "float32", True, "Arm BF16"),  # Graviton 3: allowed, not the default (unmeasured)
    (["asimd"], "float32", False, None),  # an Arm core without BF16
]


def _cpu(flags):
    return parse_reading({"vendor": "cpu", "name": "Some CPU", "memory_bytes": 2**34, "cpu_cores": 8,
                          "cpu_flags": flags}, "test")


@pytest.mark.parametrize("flags,dtype,bf16,note", CPU_FLAG_SETS)
def test_the_cpu_dtype_follows_its_own_flags(flags, dtype, bf16, note):
    d = resolve_device(_cpu(flags), PROFILES, NO_FA)
    assert d.arch == "cpu" and d.supported
    assert d.profile.dtype == dtype and d.profile.hardware["bf16"] is bf16
    if note:
        assert note in d.profile.variant and note in d.profile.reasons["profile"]
    else:
        assert d.profile.variant is None
    assert d.profile.reasons["dtype"]  # every choice says why
    if dtype == "bfloat16":
        assert "fp32 master weights" in d.profile.reasons["dtype"] and "dtype=float32" in d.profile.reasons["dtype"]


@pytest.mark.parametrize("flags", [f for f, _, bf16, _ in CPU_FLAG_SETS if not bf16])
def test_bf16_on_a_cpu_without_native_bf16_is_refused_with_the_measured_reason(flags):
    with pytest.raises(InputError) as e:
        resolve_device(_cpu(flags), PROFILES, NO_FA, Overrides.parse(None, ["dtype=bfloat16"]))
    msg = str(e.value)
    assert msg.startswith("dtype=bfloat16: Some CPU (cpu) has no bf16 hardware (no avx512_bf16 or amx_bf16")
    assert "pytorch/pytorch#146508" in msg and msg.endswith("use float32 (this profile's choice)")


@pytest.mark.parametrize("flags", [f for f, dtype, _, _ in CPU_FLAG_SETS if dtype == "bfloat16"])
def test_float32_stays_available_where_bf16_is_the_default(flags):
    d = resolve_device(_cpu(flags), PROFILES, NO_FA, Overrides.parse(None, ["dtype=float32"]))
    assert d.profile.dtype == "float32" and d.profile.reasons["dtype"] == "set by the user"


@pytest.mark.parametrize("flags,dtype,_,__", CPU_FLAG_SETS)
def test_the_cpu_attention_is_hwcompats_kernel_where_the_run_is_bf16(flags, dtype, _, __):
    """cpu_bf16 where bf16 is the default; in float32 (the default elsewhere, or set) it pays nothing: SDPA."""
    d = resolve_device(_cpu(flags), PROFILES, NO_FA)
    assert d.profile.attention == ("cpu_bf16" if dtype == "bfloat16" else "sdpa")
    if dtype == "bfloat16":
        assert "S^2" in d.profile.reasons["attention"]
        fp32 = resolve_device(_cpu(flags), PROFILES, NO_FA, Overrides.parse(None, ["dtype=float32"])).profile
        assert fp32.attention == "sdpa" and "bf16 only" in fp32.reasons["attention"]
        mine = resolve_device(_cpu(flags), PROFILES, NO_FA, Overrides.parse(None, ["attention=sdpa"])).profile
        assert mine.attention == "sdpa" and mine.reasons["attention"] == "set by the user"


def test_cpu_bf16_attention_on_a_gpu_is_refused():
    with pytest.raises(InputError, match="attention=cpu_bf16 is hwcompat's attention for training on a CPU"):
        resolve_device(from_catalog(["a100"])[0], PROFILES, NO_FA, Overrides.parse(None, ["attention=cpu_bf16"]))


def test_a_cpu_variant_naming_an_unknown_flag_is_a_profile_error():
    import yaml

    from hwcompat.errors import ProfileError
    from hwcompat.profiles import parse_profile
    from hwcompat.datafiles import data_dir

    raw = yaml.safe_load((data_dir("profiles") / "cpu.yaml").read_text())
    raw["variants"][0]["match"] = {"cpu_flags_any": ["avx512bf16"]}
    with pytest.raises(ProfileError, match=r"variants\[0\]\.match\.cpu_flags_any"):
        parse_profile(raw, "cpu.yaml")


def test_the_bf16_reason_quotes_the_measurement_it_names():
    """The AVX512-BF16 variant's reason cites bench/results/train-cpu-bf16.json: its figures are that file's."""
    import json
    import re
    from pathlib import Path

    why = resolve_device(_cpu(["avx512f", "avx512_bf16"]), PROFILES, NO_FA).profile.reasons["dtype"]
    res = json.loads((Path(__file__).parents[1] / "bench/results/train-cpu-bf16.json").read_text())
    bf16, fp32 = res["hwcompat"], res["hwcompat_fp32"]
    assert (bf16["dtype"], fp32["dtype"]) == ("bfloat16", "float32")
    speed, memory, loss16, loss32 = re.search(r"([\d.]+)x fp32's tokens/s and ([\d.]+)x its peak memory, "
                                              r"eval loss ([\d.]+) vs ([\d.]+)", why).groups()
    assert speed == f"{bf16['tokens_per_s'] / fp32['tokens_per_s']:.1f}"
    assert memory == f"{bf16['peak_memory_bytes'] / fp32['peak_memory_bytes']:.2f}"
    assert (loss16, loss32) == (f"{bf16['eval_loss']:.3f}", f"{fp32['eval_loss']:.3f}")
