"""The one safetensors reader and writer: headers checked, tensors read one at a time, files streamed out.

Merge, export, the trainer's checkpoint check and the launcher's download check all read weights through here,
so a damaged file is one error everywhere and the dtype tags are one table. Torch is imported only by the
functions that make tensors.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator

from hwcompat.errors import InputError

#: safetensors dtype tag -> (torch dtype name, bytes per element)
ST_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
             "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
             "BOOL": ("bool", 1)}
TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

#: A safetensors header larger than this is not a header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100 << 20


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header, checked: a corrupt or truncated file is an error naming it, not a crash."""
    def bad(why: str) -> InputError:
        return InputError(f"{path}: not a valid safetensors file ({why}); the download or copy is damaged: "
                          "fetch or copy it again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = struct.unpack("<Q", prefix)[0]
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"header length {n:,} bytes in a {size:,}-byte file")
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"the header is not JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name[:80]!r} has no valid dtype / shape / data_offsets") from None
        end = max(end, stop)
        if not 0 <= start <= stop:
            raise bad(f"tensor {name[:80]!r} has offsets {start}..{stop}")
        if dtype not in ST_DTYPES:
            raise InputError(f"{path}: tensor {name[:80]!r} is stored as {str(dtype)[:20]}, which hwcompat does not "
                             f"read (it reads {', '.join(ST_DTYPES)}); use the model's unquantised (F16/BF16/F32) "
                             "release")
        if any(d < 0 for d in shape) or math.prod(shape) * ST_DTYPES[dtype][1] != stop - start:
            raise bad(f"tensor {name[:80]!r}: shape {shape} of {dtype} needs {math.prod(shape) * ST_DTYPES[dtype][1]:,} "
                      f"bytes, its offsets hold {stop - start:,}")
    if 8 + n + end > size:
        raise bad(f"truncated: the tensors need {8 + n + end:,} bytes, the file has {size:,}")
    return header



def read_tensors(path: Path, names: list[str]):
    """Yield (name, tensor) by plain reads at the header's offsets.

    safe_open memory-maps the file, and every page it touches counts towards the process's
    resident memory until the mapping closes, so a streamed merge would still "use" the whole
    shard. Reading each tensor into its own buffer keeps resident memory at one tensor.
    """
    import torch

    header = read_header(path)
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        base = 8 + n
        for name in names:
            info = header[name]
            start, end = info["data_offsets"]
            fh.seek(base + start)
            buf = bytearray(fh.read(end - start))
            dtype = getattr(torch, ST_DTYPES[info["dtype"]][0])
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            yield name, t.reshape(info["shape"])


def write_streaming(path: Path, entries: list[tuple[str, str, list[int]]], tensors: Iterator[tuple[str, Any]],
                     metadata: dict[str, str]) -> None:
    """safetensors with the header computed first, then each tensor's bytes as it comes."""
    import torch

    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, st_dtype, shape in entries:
        size = math.prod(shape) * ST_DTYPES[st_dtype][1]
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for (name, st_dtype, shape), (tname, t) in zip(entries, tensors):
            assert name == tname
            t = t.contiguous()
            if t.dtype == torch.bfloat16:
                fh.write(t.view(torch.int16).numpy().tobytes())
            else:
                fh.write(t.numpy().tobytes())


def shard_files(folder: Path) -> list[str]:
    """The safetensors files of a model folder: its index's shards, or the single ``model.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def originals(folder: Path, names: set[str]) -> dict[str, Any]:
    """The stored tensors ``names`` of a model folder, as the file holds them (those it does not hold are left out):
    a full fine-tune saves its frozen weights from here, since the copy it trained beside may be rounded to the
    profile's dtype."""
    found: dict[str, Any] = {}
    if not folder.is_dir():
        return found
    for shard in shard_files(folder):
        path = folder / shard
        if path.exists():
            wanted = [n for n in read_header(path) if n in names]
            found.update(read_tensors(path, wanted))
    return found
