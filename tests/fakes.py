"""Stand-ins for vendor libraries the probes read, shared by the probe, Jetson and unified-memory tests."""

from types import SimpleNamespace


class NVMLError(Exception):
    pass


def fake_nvml(devices, init_error=None, broken=()):
    """A pynvml module holding ``devices`` ({name, cc, mem}); ``calls`` records init and shutdown."""
    calls = []

    def h(i):
        if i in broken:
            raise NVMLError("GPU is lost")
        return i

    def not_supported(_h):
        raise NVMLError("Not Supported")

    return SimpleNamespace(
        calls=calls,
        nvmlInit=lambda: (calls.append("init"), init_error and (_ for _ in ()).throw(init_error)),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: b"550.54.14",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=h,
        nvmlDeviceGetName=lambda i: devices[i]["name"],
        nvmlDeviceGetCudaComputeCapability=lambda i: devices[i]["cc"],
        nvmlDeviceGetMemoryInfo=lambda i: SimpleNamespace(total=devices[i]["mem"]),
        nvmlDeviceGetPciInfo=lambda i: SimpleNamespace(busId=f"00000000:0{i + 1}:00.0".encode()),
        nvmlDeviceGetUUID=lambda i: f"GPU-{i}",
        nvmlDeviceGetEnforcedPowerLimit=lambda i: 250000 if i == 0 else not_supported(i),
        nvmlDeviceGetPowerManagementLimit=lambda i: 300000,  # the configurable limit; a user cap is below it
        nvmlDeviceGetCurrPcieLinkGeneration=lambda i: 3,
        nvmlDeviceGetCurrPcieLinkWidth=lambda i: 16,
    )
