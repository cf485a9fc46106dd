"""Probes against a fake pynvml, a fake amdsmi and a fake sysfs tree."""

from types import SimpleNamespace

import pytest

from hwcompat.probe import amd, cpu, nvidia, probe_host
from hwcompat.readings import gfx_from_kfd_version, gfx_from_override, override_from_gfx
from tests.fakes import NVMLError, fake_nvml


def test_nvml_reads_every_field_and_shuts_down():
    nvml = fake_nvml([{"name": b"Tesla M40 24GB", "cc": (5, 2), "mem": 25769803776},
                      {"name": "Tesla P40", "cc": (6, 1), "mem": 25769803776}])
    readings, problems = nvidia.probe(nvml=nvml)
    assert problems == []
    assert nvml.calls == ["init", "shutdown"]
    m40, p40 = readings
    assert (m40.name, m40.compute_capability, m40.memory_bytes) == ("Tesla M40 24GB", "5.2", 25769803776)
    assert m40.pci_bus_id == "0000:01:00.0"  # NVML's 8-digit domain shortened to sysfs/torch form
    assert (m40.driver_version, m40.runtime_version, m40.power_limit_watts) == ("550.54.14", "12.4", 250.0)
    assert p40.power_limit_watts is None  # NotSupported on this card: unknown, not an error
    assert (p40.index, p40.pcie_generation, p40.pcie_width, p40.source) == (1, 3, 16, "nvml")


def test_nvml_lost_gpu_is_a_problem_not_a_crash():
    nvml = fake_nvml([{"name": "A", "cc": (8, 0), "mem": 1}, {"name": "B", "cc": (8, 0), "mem": 1}], broken={1})
    readings, problems = nvidia.probe(nvml=nvml)
    assert len(readings) == 1
    assert problems == ["NVIDIA device 1: NVML could not read it (GPU is lost); a GPU that fell off the bus "
                        "needs a reboot or `nvidia-smi -r`"]
    assert nvml.calls[-1] == "shutdown"


def _pci_tree(root, vendor="0x10de", klass="0x030200"):
    d = root / "sys/bus/pci/devices/0000:01:00.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "class").write_text(klass + "\n")


def test_nvml_missing_driver_silent_without_nvidia_hardware(tmp_path):
    nvml = fake_nvml([], init_error=NVMLError("NVML Shared Library Not Found"))
    assert nvidia.probe(nvml=nvml, sys_root=tmp_path) == ([], [])


def test_nvml_missing_driver_with_nvidia_card_is_a_problem(tmp_path):
    _pci_tree(tmp_path)
    nvml = fake_nvml([], init_error=NVMLError("Driver Not Loaded"))
    readings, problems = nvidia.probe(nvml=nvml, sys_root=tmp_path)
    assert readings == [] and problems == [
        "NVIDIA GPU present but NVML failed to start (Driver Not Loaded): is the NVIDIA driver installed "
        "and loaded? (nvidia-smi should list the card)"]


# --- AMD: sysfs ---------------------------------------------------------------------------------

def _kfd_tree(root, nodes):
    """nodes: list of dicts of KFD properties; a gfx_target_version of 0 is a CPU node."""
    base = root / amd.KFD_NODES
    for i, props in enumerate(nodes):
        n = base / str(i)
        n.mkdir(parents=True)
        (n / "properties").write_text("".join(f"{k} {v}\n" for k, v in props.items()))
        minor = props.get("drm_render_minor")
        if minor is not None:
            dev = root / "sys/class/drm" / f"renderD{minor}" / "device"
            dev.mkdir(parents=True)
            (dev / "mem_info_vram_total").write_text("8573157376\n")
            (dev / "product_name").write_text("\n")  # consumer cards often leave it empty
    (root / "opt/rocm/.info").mkdir(parents=True)
    (root / "opt/rocm/.info/version").write_text("6.4.1-120\n")


RX6600 = {"gfx_target_version": 100302, "drm_render_minor": 128, "location_id": 0x0300, "domain": 0,
          "device_id": 0x73FF, "simd_count": 56}
CPU_NODE = {"gfx_target_version": 0, "simd_count": 0}


def test_sysfs_physical_and_effective_target(tmp_path):
    """The override case: physical gfx1032 (RX 6600) run as gfx1030."""
    _kfd_tree(tmp_path, [CPU_NODE, RX6600])
    readings, problems = amd.probe_sysfs(tmp_path, {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"})
    assert problems == []
    (r,) = readings
    assert (r.gfx_target, r.gfx_target_effective) == ("gfx1032", "gfx1030")
    assert (r.pci_bus_id, r.memory_bytes, r.runtime_version) == ("0000:03:00.0", 8573157376, "6.4.1-120")
    assert r.name == "AMD GPU gfx1032 (device 0x73ff)" and r.source == "sysfs" and r.index == 0


def test_sysfs_without_override(tmp_path):
    _kfd_tree(tmp_path, [CPU_NODE, RX6600])
    (r,), _ = amd.probe_sysfs(tmp_path, {})
    assert r.gfx_target_effective is None


def test_sysfs_bad_override_is_a_problem(tmp_path):
    _kfd_tree(tmp_path, [CPU_NODE, RX6600])
    _, problems = amd.probe_sysfs(tmp_path, {"HSA_OVERRIDE_GFX_VERSION": "gfx1030"})
    assert problems == ["HSA_OVERRIDE_GFX_VERSION must look like '10.3.0', got 'gfx1030'; unset it or use the form "
                        "the profile suggests (e.g. 10.3.0)"]


def test_no_kfd_means_no_amd_devices(tmp_path):
    assert amd.probe_sysfs(tmp_path, {}) == ([], [])


def test_amdsmi_import_keyerror_falls_back_to_sysfs(tmp_path, monkeypatch):
    """Without ROCm, `import amdsmi` raises KeyError (ROCM_PATH): sysfs answers and the user is told why."""
    from hwcompat.probe import vendorlib

    def fake_import(name):
        raise KeyError("ROCM_PATH")

    monkeypatch.delitem(__import__("sys").modules, "amdsmi", raising=False)
    monkeypatch.setattr(vendorlib.importlib, "import_module", fake_import)
    _kfd_tree(tmp_path, [CPU_NODE, RX6600])
    readings, problems = amd.probe(sys_root=tmp_path, environ={})
    assert [r.source for r in readings] == ["sysfs"]
    assert problems == ["amdsmi failed (KeyError: 'ROCM_PATH'); read the GPUs from sysfs instead"]


def fake_amdsmi():
    return SimpleNamespace(
        amdsmi_init=lambda: None, amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: ["h0"],
        amdsmi_get_gpu_asic_info=lambda h: {"market_name": "AMD Radeon RX 6600", "target_graphics_version": "gfx1030"},
        amdsmi_get_gpu_device_bdf=lambda h: "0000:03:00.0",
        AmdSmiMemoryType=SimpleNamespace(VRAM="vram"),
        amdsmi_get_gpu_memory_total=lambda h, kind: 8589934592,
        amdsmi_get_gpu_driver_info=lambda h: {"driver_version": "6.8.5"},
        amdsmi_get_gpu_device_uuid=lambda h: "uuid-0",
    )


def test_amdsmi_reading_takes_physical_target_from_sysfs(tmp_path):
    _kfd_tree(tmp_path, [CPU_NODE, RX6600])
    (r,), problems = amd.probe(smi=fake_amdsmi(), sys_root=tmp_path, environ={"HSA_OVERRIDE_GFX_VERSION": "10.3.0"})
    assert problems == []
    assert (r.name, r.gfx_target, r.gfx_target_effective, r.source) == ("AMD Radeon RX 6600", "gfx1032", "gfx1030",
                                                                        "amdsmi")
    assert (r.memory_bytes, r.driver_version, r.uuid) == (8589934592, "6.8.5", "uuid-0")


def test_amdsmi_failure_falls_back_with_a_problem(tmp_path):
    smi = fake_amdsmi()
    smi.amdsmi_init = lambda: (_ for _ in ()).throw(RuntimeError("AMDSMI_STATUS_DRM_ERROR"))
    _kfd_tree(tmp_path, [CPU_NODE, RX6600])
    readings, problems = amd.probe(smi=smi, sys_root=tmp_path, environ={})
    assert [r.source for r in readings] == ["sysfs"]
    assert problems == ["amdsmi failed (RuntimeError: AMDSMI_STATUS_DRM_ERROR); read the GPUs from sysfs instead"]


@pytest.mark.parametrize("version,gfx", [(100302, "gfx1032"), (90010, "gfx90a"), (110000, "gfx1100"),
                                         (90402, "gfx942"), (90008, "gfx908"), (120001, "gfx1201")])
def test_gfx_from_kfd_version(version, gfx):
    assert gfx_from_kfd_version(version) == gfx


@pytest.mark.parametrize("override,gfx", [("10.3.0", "gfx1030"), ("11.0.0", "gfx1100"), ("9.0.10", "gfx90a")])
def test_override_round_trip(override, gfx):
    assert gfx_from_override(override) == gfx and override_from_gfx(gfx) == override


# --- CPU and host --------------------------------------------------------------------------------

def test_cpu_probe_fake_proc(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Intel Xeon E5-2680 v4\n"
                                           "flags\t\t: fpu sse avx avx2 fma f16c\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal:       65536000 kB\n")
    r, problems = cpu.probe(tmp_path)
    assert problems == []
    assert (r.vendor, r.name, r.memory_bytes, r.cpu_flags) == ("cpu", "Intel Xeon E5-2680 v4", 65536000 * 1024,
                                                                ("avx", "avx2", "fma", "f16c"))


def test_cpu_probe_missing_proc_is_a_problem(tmp_path):
    r, problems = cpu.probe(tmp_path)
    assert r.vendor == "cpu" and len(problems) == 2


def test_host_on_this_machine_has_cpu_last():
    host = probe_host()
    assert host.devices[-1].vendor == "cpu" and not host.emulated


def test_emulated_host_skips_real_probes(monkeypatch):
    monkeypatch.setattr(nvidia, "probe", lambda **kw: pytest.fail("real probe ran"))
    host = probe_host(emulate=["rx6600", "m40"])
    assert [d.vendor for d in host.devices] == ["nvidia", "amd", "cpu"]
    assert host.emulated


def test_env_var_emulation():
    host = probe_host(environ={"HWCOMPAT_EMULATE": "t4,t4"})
    assert [(d.name, d.index) for d in host.devices[:2]] == [("Tesla T4", 0), ("Tesla T4", 1)]
