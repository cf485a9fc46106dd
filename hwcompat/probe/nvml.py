"""The dozen NVML calls the NVIDIA probe makes, through ctypes, with pynvml's names and return shapes.

Why not ``import pynvml``: nvidia-ml-py declares hundreds of ctypes structures at import, which took
115 ms on an H100 host (``bench/results/detect-h100-host.json``), more than everything else ``detect``
does. The C API used here is stable and tiny; ``probe.nvidia`` falls back to pynvml when this module
cannot bind (no libnvidia-ml.so.1 on the loader path, or a driver without a symbol), and a test holds
this module's calls to pynvml's on the real package.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

LIBRARY = "libnvidia-ml.so.1"
NAME_BUFFER = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE, also enough for the UUID
DRIVER_BUFFER = 80  # NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE


class NVMLError(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.value = code


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _PciInfo(ctypes.Structure):  # nvmlPciInfo_t as nvmlDeviceGetPciInfo_v3 fills it
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint), ("bus", ctypes.c_uint),
                ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint), ("pciSubSystemId", ctypes.c_uint),
                ("busId", ctypes.c_char * 32)]


class NVML:
    """Bound to libnvidia-ml; raises OSError / AttributeError at construction when it cannot bind."""

    def __init__(self, library: str = LIBRARY):
        self._lib = ctypes.CDLL(library)
        for name in ("nvmlInit_v2", "nvmlShutdown", "nvmlDeviceGetCount_v2", "nvmlDeviceGetHandleByIndex_v2",
                     "nvmlDeviceGetPciInfo_v3", "nvmlErrorString"):
            getattr(self._lib, name)  # AttributeError now, not halfway through a probe
        self._lib.nvmlErrorString.restype = ctypes.c_char_p

    def _call(self, name: str, *args) -> None:
        code = getattr(self._lib, name)(*args)
        if code != 0:
            text = self._lib.nvmlErrorString(code)
            raise NVMLError(code, text.decode() if text else f"NVML error {code}")

    def _uint(self, name: str, handle) -> int:
        out = ctypes.c_uint()
        self._call(name, handle, ctypes.byref(out))
        return out.value

    def _text(self, name: str, *args, size: int = NAME_BUFFER) -> str:
        buf = ctypes.create_string_buffer(size)
        self._call(name, *args, buf, ctypes.c_uint(size))
        return buf.value.decode("utf-8", "replace")

    # --- pynvml's names -----------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._call("nvmlInit_v2")

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._text("nvmlSystemGetDriverVersion", size=DRIVER_BUFFER)

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        out = ctypes.c_int()
        self._call("nvmlSystemGetCudaDriverVersion", ctypes.byref(out))
        return out.value

    def nvmlDeviceGetCount(self) -> int:
        out = ctypes.c_uint()
        self._call("nvmlDeviceGetCount_v2", ctypes.byref(out))
        return out.value

    def nvmlDeviceGetHandleByIndex(self, index: int):
        handle = ctypes.c_void_p()
        self._call("nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(index), ctypes.byref(handle))
        return handle

    def nvmlDeviceGetName(self, handle) -> str:
        return self._text("nvmlDeviceGetName", handle)

    def nvmlDeviceGetUUID(self, handle) -> str:
        return self._text("nvmlDeviceGetUUID", handle)

    def nvmlDeviceGetCudaComputeCapability(self, handle) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._call("nvmlDeviceGetCudaComputeCapability", handle, ctypes.byref(major), ctypes.byref(minor))
        return major.value, minor.value

    def nvmlDeviceGetMemoryInfo(self, handle) -> SimpleNamespace:
        mem = _Memory()
        self._call("nvmlDeviceGetMemoryInfo", handle, ctypes.byref(mem))
        return SimpleNamespace(total=mem.total, free=mem.free, used=mem.used)

    def nvmlDeviceGetPciInfo(self, handle) -> SimpleNamespace:
        info = _PciInfo()
        self._call("nvmlDeviceGetPciInfo_v3", handle, ctypes.byref(info))
        return SimpleNamespace(busId=info.busId, domain=info.domain, bus=info.bus, device=info.device,
                               pciDeviceId=info.pciDeviceId)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle) -> int:
        return self._uint("nvmlDeviceGetEnforcedPowerLimit", handle)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle) -> int:
        return self._uint("nvmlDeviceGetCurrPcieLinkGeneration", handle)

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle) -> int:
        return self._uint("nvmlDeviceGetCurrPcieLinkWidth", handle)


#: The calls the probe makes, checked against pynvml's names in a test.
CALLS = tuple(n for n in vars(NVML) if n.startswith("nvml"))
