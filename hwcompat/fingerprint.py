"""What a run trained on, as digests cheap enough to compute at every start: its data and its base weights.

A resume must continue the same run. Same paths are not the same inputs: a data file edited in place or a
model folder replaced by another model would let ``--resume`` mix two trainings silently, and a merge into
a folder that merely has the right name would add the adapter to the wrong weights. So the launcher records
these digests in run.json and a resume or a merge compares them.

- Data files are small (thousands of rows): hashed whole.
- Weights can be tens of GB: the digest covers config.json, every shard's size and safetensors header
  (names, dtypes, shapes, offsets) and 64 evenly spaced 4 KiB samples of each shard's tensor bytes (a shard
  under 64 MiB is read whole). Another
  model, a merged copy or a different fine-tune of the same shape differs in nearly every sample; reading
  256 KiB per shard keeps a 14B model's digest well under a second.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

SAMPLES = 64
SAMPLE_BYTES = 4096
#: A shard up to this size is hashed whole (a small model costs nothing to read); larger ones are sampled.
WHOLE_BELOW = 64 << 20


def data_digest(path: str | Path) -> str:
    """BLAKE2b of a data file's bytes, or of a data folder's (a ``save_to_disk`` folder: every regular file in it,
    by name); "missing" when it cannot be read (the data checks say why)."""
    h = hashlib.blake2b(digest_size=16)
    p = Path(path)
    try:
        for f in sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]:
            h.update(f.name.encode() + b"\0" if f != p else b"")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    except OSError:
        return "missing"
    return h.hexdigest()


def weights_digest(folder: str | Path) -> str:
    """A digest of a model folder's identity (see the module docstring); "" when it is not a local folder."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not shards:
        return ""
    h = hashlib.blake2b(digest_size=16)
    try:
        h.update((folder / "config.json").read_bytes())
        for shard in shards:
            _shard(h, shard)
    except OSError:
        return ""
    return h.hexdigest()


def _shard(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(path.name.encode() + b"\0" + str(size).encode())
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return
        n = struct.unpack("<Q", prefix)[0]
        n = min(n, max(0, size - 8))
        h.update(fh.read(n))
        start, span = 8 + n, max(0, size - 8 - n)
        if span <= WHOLE_BELOW:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            return
        for i in range(SAMPLES if span else 0):
            fh.seek(start + span * i // SAMPLES)
            h.update(fh.read(SAMPLE_BYTES))


def run_inputs(cfg, world_size: int) -> dict[str, object]:
    """What run.json records about a run's inputs: processes, base weights, every data file."""
    return {"world_size": world_size, "base": weights_digest(cfg.model),
            "data": {p: data_digest(p) for p in [*cfg.train_data, *cfg.eval_data]},
            "init_adapter": weights_digest_adapter(cfg.init_adapter) if cfg.init_adapter else ""}


def weights_digest_adapter(folder: str | Path) -> str:
    """An adapter folder: its adapter_config.json and adapter_model.safetensors."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=16)
    try:
        h.update((folder / "adapter_config.json").read_bytes())
        _shard(h, folder / "adapter_model.safetensors")
    except OSError:
        return ""
    return h.hexdigest()


def changed_inputs(recorded: dict, now: dict) -> list[str]:
    """Plain-language differences between two ``run_inputs`` records ([] when the same, or nothing recorded)."""
    if not recorded:
        return []  # a run from before inputs were recorded
    out = []
    if recorded.get("world_size") != now.get("world_size"):
        out.append(f"the number of processes: the run was trained with {recorded.get('world_size')}, this start has "
                   f"{now.get('world_size')} (a different global batch gives a different adapter): resume with "
                   f"--devices {recorded.get('world_size')}" + (" on the same machines" if now.get("world_size") else ""))
    if recorded.get("base") and recorded.get("base") != now.get("base"):
        out.append("the base model's weights or config.json changed at the same path")
    if recorded.get("init_adapter") != now.get("init_adapter") and recorded.get("init_adapter") is not None:
        out.append("init_adapter's files changed")
    for path, digest in (recorded.get("data") or {}).items():
        if (now.get("data") or {}).get(path) != digest:
            out.append(f"the content of {path}")
    return out
