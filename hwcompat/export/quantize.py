"""k-quants (q4_k_m, q5_k_m, q6_k) and q4_0 / q5_0 from llama.cpp's own quantizer.

The ``gguf`` package writes f32 / f16 / bf16 / q8_0 itself but has no k-quant encoder, and a k-quant is not
only an encoding: llama.cpp's ``llama_model_quantize`` decides per tensor which type it gets (q4_k_m keeps
``attn_v`` and ``ffn_down`` of some layers at q6_k, falls back where a row is not a multiple of 256). Re-doing
that by hand would drift from what llama.cpp and Ollama users get, so hwcompat calls it through the maintained
binding, llama-cpp-python (the optional extra ``hwcompat[gguf]``), on a lossless GGUF of the merged weights,
with an importance matrix (``imatrix.py``) when one is given, through the same C array ``llama-quantize`` fills.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

from hwcompat.choices import LLAMA_TYPES
from hwcompat.errors import HwcompatError, InputError

#: The binding, pinned to the version the tests ran; it compiles llama.cpp (~10 min on 2 cores, CPU build).
REQUIREMENT = "llama-cpp-python==0.3.36"
#: On the user's own machine: the library only (no tools, server or examples), built for this CPU: ~7 minutes on 2
#: cores instead of ~10. The one install line the refusals and the README print (a test keeps them equal).
LIBRARY_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
                      "-DLLAMA_BUILD_SERVER=OFF")
INSTALL = f"CMAKE_ARGS=\"{LIBRARY_CMAKE_ARGS}\" python3 -m pip install '{REQUIREMENT}'"
#: How the images and CI compile it: library only, portable (no -march=native: the wheel runs on any x86-64 the
#: image lands on), ggml's own threads (no OpenMP runtime needed in the image).
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF "
                       "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")


def missing(qtype: str | None) -> InputError:
    """The error for a k-quant (``qtype``) or ``--verify`` (None) without the extra, with the install command."""
    what = (f"--type {qtype} is made by llama.cpp's quantizer" if qtype else
            "--verify runs the GGUF in llama.cpp")
    instead = "Without it: --type q8_0, f16, bf16 or f32." if qtype else "Without it: --no-verify."
    return InputError(f"{what}, which needs the optional extra hwcompat[gguf] (llama-cpp-python): {INSTALL}   (it "
                      f"compiles llama.cpp: ~7 minutes on 2 cores). {instead}")


def binding(qtype: str | None):
    """llama_cpp, or an error that says how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise missing(qtype) from None
    return llama_cpp


def quiet() -> None:
    """llama.cpp logs every tensor to stderr; keep its errors only (llama-cpp-python's own logger switch)."""
    from llama_cpp import _logger

    _logger.set_verbose(False)


def quantize(src: Path, out: Path, qtype: str, threads: int | None = None, imatrix=None) -> str | None:
    """``src`` (an f32/f16/bf16 GGUF) -> ``out`` in ``qtype``; the caller owns both paths (temp names, rename).
    ``imatrix`` (an ``imatrix.ImportanceMatrix``) weights the rounding as ``llama-quantize --imatrix`` does.
    Returns llama.cpp's fallback note ("N of M tensor(s) required fallback quantization"), if it made one."""
    llama_cpp = binding(qtype)
    quiet()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_TYPES[qtype])
    params.nthread = threads or os.cpu_count() or 1
    keep = _with_imatrix(llama_cpp, params, imatrix) if imatrix is not None else None  # noqa: F841 (alive)
    with _stderr_captured() as log:  # a line per tensor from C code; kept for the error and the fallback note
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    text = log.read_text(errors="replace") if log.exists() else ""
    log.unlink(missing_ok=True)
    if rc != 0:
        raise HwcompatError(f"llama.cpp's quantizer failed on {src} -> {qtype} (return code {rc}); its log ends:\n"
                            + "\n".join(text.splitlines()[-15:]))
    return next((line.split("WARNING:", 1)[-1].strip() for line in text.splitlines() if "fallback" in line
                 and "tensor(s)" in line), None)


def _with_imatrix(llama_cpp, params, im) -> list:
    """Fill ``params.imatrix`` (a NULL-terminated ``llama_model_imatrix_data`` array) and the ``quantize.imatrix.*``
    metadata llama-quantize writes; returns the buffers, which must outlive the call."""
    import numpy as np

    values = sorted(im.values().items())
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep: list = [entries]
    for entry, (name, v) in zip(entries, values):
        buf = np.ascontiguousarray(v, np.float32)
        keep += [buf, name.encode()]
        entry.name, entry.data, entry.size = keep[-1], buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size
    meta = [("quantize.imatrix.file", im.datasets[0] if im.datasets else "hwcompat"),
            ("quantize.imatrix.dataset", ", ".join(im.datasets)),
            ("quantize.imatrix.entries_count", len(values)), ("quantize.imatrix.chunks_count", im.chunks)]
    kv = (llama_cpp.llama_model_kv_override * (len(meta) + 1))()  # the last one's empty key ends the list
    for o, (key, value) in zip(kv, meta):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    return keep + [kv]


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 into a temp file (llama.cpp writes there from C, below Python's sys.stderr)."""
    import sys
    import tempfile

    fd, name = tempfile.mkstemp(prefix="hwcompat-quantize-", suffix=".log")
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield Path(name)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
