"""Export a (merged) Hugging Face model folder to GGUF for llama.cpp and Ollama.

Uses the ``gguf`` package (llama.cpp's own writer): its ``TensorNameMap`` gives the tensor names; what each family
needs beyond that (the rotary permutation of Llama/Mistral q/k, Gemma's norm shift, Phi-3's LongRoPE factors) is the
table in ``archs.py``, and the tokenizer is ``vocab.py``. Two passes over the safetensors headers and data keep one
tensor in memory; k-quants are llama.cpp's own quantizer run on the lossless GGUF (``quantize.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat.errors import HwcompatError, InputError, excerpt
from hwcompat.fsutil import user_mode

from hwcompat.choices import EXPORT_TYPE_TABLE, EXPORT_TYPES as TYPES, LLAMA_TYPES, families_text
from hwcompat.export.archs import ARCHS, check, head_dim, rope, rope_dims, write_specific
from hwcompat.export.quantize import binding, quantize
from hwcompat.export.vocab import write_vocab


@dataclass(frozen=True)
class ExportResult:
    path: Path
    arch: str
    tensors: int
    qtype: str
    pre_tokenizer: str
    note: str | None = None  # llama.cpp's quantizer: how many tensors fell back to another type
    tokenizer: str = "gpt2"  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece)


def _convert(data, ggml_type, gguf, np):
    """float32 array -> the stored array for one GGML type (quantised types come back as bytes)."""
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, ggml_type)


def _permute(w, n_head: int):
    """llama.cpp's LlamaModel.permute: HF half-split rotary layout -> interleaved."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def lossless_type(cfg: dict) -> str:
    """The GGUF type that holds the merged weights exactly (their config dtype; fp32 when unsaid)."""
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return {"float16": "f16", "bfloat16": "bf16"}.get(dtype, "f32")


def _temp_beside(out: Path) -> Path:
    """A unique ``.NAME.<random>.tmp`` beside ``out`` (the name fsutil.clean_stale knows as a leftover)."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    return Path(name)


def model_name(src: Path, cfg: dict) -> str:
    """``general.name``: the base model's name (a merged folder is called ``merged``, which says nothing)."""
    merge_record = src / "hwcompat_merge.json"
    if merge_record.exists():
        try:
            base = Path(str(json.loads(merge_record.read_text())["base"]))
            return model_name(base, json.loads((base / "config.json").read_text())) if (
                base / "config.json").exists() else base.name
        except (OSError, ValueError, KeyError, TypeError):
            pass
    named = str(cfg.get("_name_or_path") or "").rstrip("/")
    return Path(named).name if named else src.name


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16", name: str | None = None,
                overwrite: bool = False, imatrix=None) -> ExportResult:
    """Write ``out``: refused if it exists (unless ``overwrite``), locked while written, atomic. ``imatrix`` (an
    ``imatrix.ImportanceMatrix``) goes to llama.cpp's quantizer with a k-quant."""
    from hwcompat.fsutil import output_target

    with output_target(out, "hwcompat export", overwrite) as target:
        return _export_gguf(model_dir, target, qtype, name, imatrix)


def weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> the weight's shape as stored in the safetensors (its last axis: the input columns), from
    the headers alone."""
    import gguf

    from hwcompat.userfile import read_json_object
    from hwcompat.weights import read_header, shard_files

    src = Path(model_dir)
    cfg = read_json_object(src / "config.json", "model config")
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[cfg["model_type"]].gguf),
                                    int(cfg["num_hidden_layers"]))
    out = {}
    for f in shard_files(src):
        for key, info in read_header(src / f).items():
            new = tmap.get_name(key, try_suffixes=(".weight", ".bias")) if key != "__metadata__" else None
            if new:
                out[new] = tuple(info["shape"])
    return out


def _check(src: Path, qtype: str) -> dict[str, Any]:
    """Everything a user can get wrong, refused before a byte is written; returns config.json."""
    from hwcompat.export.vocab import kind

    if qtype not in TYPES:
        raise InputError(f"--type {qtype}: use one of {', '.join(TYPES)}")
    if qtype in LLAMA_TYPES:
        binding(qtype)  # without the extra, say how to get it
    if not (src / "config.json").exists():
        raise InputError(f"{src}: no config.json; give a model folder (e.g. the output of `hwcompat merge`)")
    from hwcompat.userfile import read_json_object

    cfg = read_json_object(src / "config.json", "model config")
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise InputError(f"{src}: model_type {mt!r} cannot be exported yet; supported: {families_text()}")
    if cfg.get("quantization_config"):
        raise InputError(f"{src}: a quantised checkpoint; export the merged full-precision model")
    for key in REQUIRED_SIZES:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{src / 'config.json'}: {key}: expected a positive integer, got {excerpt(value)}; the "
                             "GGUF header needs it (restore config.json from the model's release). Nothing was written")
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (src / name).exists():  # gguf's vocabulary reader would crash on a damaged one, mid-write
            read_json_object(src / name, "tokenizer file")
    kind(src)
    check(src, mt, cfg)
    return cfg


#: config.json sizes every exported family's GGUF header is built from.
REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")


def _write_header(writer, src: Path, cfg: dict[str, Any], written: str, name: str | None) -> tuple[str, str, list]:
    """The hyper-parameters and the tokenizer; returns (tokenizer model, pre-tokenizer, extra tensors)."""
    import gguf

    mt = cfg["model_type"]
    n_head = int(cfg["num_attention_heads"])
    writer.add_name(name or model_name(src, cfg))
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    writer.add_rope_dimension_count(rope_dims(mt, cfg))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(rope(cfg).get("rope_theta") or 10000.0))
    extra = write_specific(writer, mt, cfg)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[written])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    model, pre = write_vocab(writer, src, cfg, mt)
    return model, pre, extra


def _ggml_type(shape, written: str, gguf):
    if len(shape) == 1 or written == "f32":
        return gguf.GGMLQuantizationType.F32
    if written == "q8_0" and shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    if written == "bf16":
        return gguf.GGMLQuantizationType.BF16
    return gguf.GGMLQuantizationType.F16


def _declare_tensors(writer, src: Path, files: list[str], cfg: dict[str, Any], written: str, extra: list
                     ) -> list[tuple]:
    """Declare every tensor (name, stored shape, type) from the safetensors headers alone, so that pass 2 can read,
    convert and write them one at a time in the same order: only one tensor is ever in memory."""
    import gguf
    import numpy as np

    from hwcompat.weights import read_header

    arch = ARCHS[cfg["model_type"]]
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf), int(cfg["num_hidden_layers"]))
    plan: list[tuple[str, str, str, Any]] = []  # (file, hf key, gguf name, ggml type)
    for f in files:
        for key, info in read_header(src / f).items():
            if key == "__metadata__" or key.endswith("rotary_emb.inv_freq") or key in arch.drop:
                continue
            new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise HwcompatError(f"{src}: no GGUF name for tensor {key}; this model variant is not supported")
            plan.append((f, key, new, _ggml_type(info["shape"], written, gguf)))
            _declare(writer, new, info["shape"], plan[-1][3], gguf, np)
    for new, array in extra:  # generated (Phi-3 LongRoPE factors): always f32, as llama.cpp's converter
        _declare(writer, new, array.shape, gguf.GGMLQuantizationType.F32, gguf, np)
    return plan


def _declare(writer, name: str, shape, t, gguf, np) -> None:
    probe = _convert(np.zeros((1, shape[-1]), np.float32), t, gguf, np)
    stored = tuple(shape[:-1]) + (probe.shape[-1],)
    writer.add_tensor_info(name, stored, probe.dtype, int(np.prod(stored)) * probe.dtype.itemsize, raw_dtype=t)


def _write_tensors(writer, src: Path, files: list[str], plan: list[tuple], cfg: dict[str, Any], extra: list) -> None:
    import gguf
    import numpy as np
    import torch

    from hwcompat.weights import read_tensors

    arch = ARCHS[cfg["model_type"]]
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    for f in files:
        types = {k: t for (ff, k, _, t) in plan if ff == f}
        for key, tensor in read_tensors(src / f, list(types)):
            t = tensor.to(torch.float32)
            if arch.permute_qk and key.endswith("q_proj.weight"):
                t = _permute(t, n_head)
            elif arch.permute_qk and key.endswith("k_proj.weight"):
                t = _permute(t, n_kv)
            elif arch.norm_shift and key.endswith("norm.weight"):
                t = t + arch.norm_shift
            writer.write_tensor_data(_convert(t.numpy(), types[key], gguf, np))
    for _, array in extra:
        writer.write_tensor_data(array.astype(np.float32))


def _export_gguf(model_dir: str | Path, out: Path, qtype: str, name: str | None, imatrix=None) -> ExportResult:
    import gguf
    import numpy as np

    from hwcompat.fsutil import require_space
    from hwcompat.weights import read_header, shard_files

    src, out = Path(model_dir), Path(out)
    cfg = _check(src, qtype)
    files = shard_files(src)
    elems = sum(int(np.prod(info["shape"])) for f in files for k, info in read_header(src / f).items()
                if k != "__metadata__")
    # llama.cpp quantizes from a lossless GGUF of the merged weights (their own dtype), written first
    written = lossless_type(cfg) if qtype in LLAMA_TYPES else qtype
    quantized = elems * EXPORT_TYPE_TABLE[qtype].bits / 8 if qtype in LLAMA_TYPES else 0
    require_space(out.parent, elems * EXPORT_TYPE_TABLE[written].bits / 8 + quantized, f"the {qtype} GGUF")
    tmp = _temp_beside(out)
    final, note = None, None
    arch_str = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHS[cfg["model_type"]].gguf)]
    writer = gguf.GGUFWriter(str(tmp), arch_str)
    try:
        model, pre, extra = _write_header(writer, src, cfg, written, name)
        declared = _declare_tensors(writer, src, files, cfg, written, extra)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, src, files, declared, cfg, extra)
        writer.close()
        final = tmp
        if qtype in LLAMA_TYPES:
            final = _temp_beside(out)
            note = quantize(tmp, final, qtype, imatrix=imatrix)
            tmp.unlink()
        user_mode(final)
        final.replace(out)
    except BaseException:
        try:
            writer.close()
        except Exception:  # a writer interrupted mid-tensor may not close cleanly; the temp file goes anyway
            pass
        finally:
            tmp.unlink(missing_ok=True)
            if final is not None:
                final.unlink(missing_ok=True)
        raise
    return ExportResult(out, arch_str, len(declared) + len(extra), qtype, pre, note, model)
