"""Export a (merged) Hugging Face model folder to GGUF for llama.cpp and Ollama.

Uses the ``gguf`` package (llama.cpp's own writer): its ``TensorNameMap``
gives the tensor names, and Llama/Mistral q/k weights get the same rotary
permutation llama.cpp's ``convert_hf_to_gguf.py`` applies (HF stores them
for the "half-split" RoPE; GGUF's llama arch expects interleaved pairs).
Qwen2/Qwen3 use NeoX RoPE in llama.cpp and need no permutation.
Tokenizer: byte-level BPE (``tokenizer.json``; Llama 3, Qwen, SmolLM, GPT-2
style), written as ``tokenizer.ggml.model = gpt2`` with merges, special ids
and the chat template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat.errors import HwcompatError, InputError
from hwcompat.fsutil import user_mode

#: config.json model_type -> (gguf arch name, permute q/k for rotary)
ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False)}
from hwcompat.export import EXPORT_TYPES as TYPES
from hwcompat.export.quantize import BITS_PER_WEIGHT, LLAMA_TYPES, binding, quantize

#: tokenizer.ggml.pre: llama.cpp picks the pre-tokenizer regex by name. Recognised here from the
#: tokenizer.json pre_tokenizer; anything else is written as "default" and said so.
PRE_TOKENIZERS = (
    ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}", "llama-bpe"),
    ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?", "qwen2"),
)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    arch: str
    tensors: int
    qtype: str
    pre_tokenizer: str
    note: str | None = None  # llama.cpp's quantizer: how many tensors fell back to another type


def pre_tokenizer_name(src: Path, tok: dict[str, Any], model_type: str) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer does. Its tokenizer.json shape decides when
    hwcompat knows it exactly; else the name llama.cpp's converter gives it, the SHA-256 of its ids for llama.cpp's
    check text (catalog/gguf_pretokenizers.yaml). Shape first because the check text can be blind: SmolLM2's
    tokenizer as transformers rebuilds it from a GGUF (plain byte-level) hashes like the original ("smollm", digits
    split first), yet splits "x  1" differently, and llama.cpp's tokens then differ (tests/test_export_llama.py)."""
    shape = _pre_tokenizer(tok, model_type)
    if shape != "default":
        return shape
    import hashlib

    import yaml
    from transformers import AutoTokenizer

    from hwcompat.datafiles import data_dir

    table = yaml.safe_load((data_dir("catalog") / "gguf_pretokenizers.yaml").read_text(encoding="utf-8"))
    try:
        ids = AutoTokenizer.from_pretrained(str(src)).encode(table["chktxt"])
    except (OSError, ValueError) as exc:  # no loadable tokenizer here: the shape decides
        ids = f"unloadable: {exc}"
    return table["hashes"].get(hashlib.sha256(str(ids).encode()).hexdigest()) or "default"


def _pre_tokenizer(tok: dict[str, Any], model_type: str) -> str:
    text = json.dumps(tok.get("pre_tokenizer") or {})
    for needle, name in PRE_TOKENIZERS:
        if json.dumps(needle)[1:-1] in text:
            return name
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # plain byte-level with GPT-2's regex
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if [p.get("type") for p in parts] == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"  # digits one by one, then GPT-2's regex
    return "default"


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


#: Bytes per weight in each output type (q8_0: 34 bytes per block of 32), for the free-space check.
BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


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
                overwrite: bool = False) -> ExportResult:
    """Write ``out``: refused if it exists (unless ``overwrite``), locked while written, atomic."""
    from hwcompat.fsutil import output_target

    with output_target(out, "hwcompat export", overwrite) as target:
        return _export_gguf(model_dir, target, qtype, name)


def _export_gguf(model_dir: str | Path, out: Path, qtype: str, name: str | None) -> ExportResult:
    import gguf
    import numpy as np
    import torch


    src = Path(model_dir)
    out = Path(out)
    if qtype not in TYPES:
        raise InputError(f"--type {qtype}: use one of {', '.join(TYPES)}")
    if qtype in LLAMA_TYPES:
        binding(qtype)  # before anything is written: without the extra, say how to get it
    if not (src / "config.json").exists():
        raise InputError(f"{src}: no config.json; give a model folder (e.g. the output of `hwcompat merge`)")
    cfg = json.loads((src / "config.json").read_text())
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise InputError(f"{src}: model_type {mt!r} cannot be exported yet; supported: "
                         f"{', '.join(ARCHS)} (Llama, Mistral, Qwen2, Qwen3)")
    if cfg.get("quantization_config"):
        raise InputError(f"{src}: a quantised checkpoint; export the merged full-precision model")
    tok_path = src / "tokenizer.json"
    if not tok_path.exists():
        raise InputError(f"{src}: no tokenizer.json; GGUF export needs the fast (byte-level BPE) tokenizer")
    tok = json.loads(tok_path.read_text())
    if (tok.get("model") or {}).get("type") != "BPE" or (tok["model"].get("byte_fallback")):
        raise InputError(f"{src}: tokenizer is {tok.get('model', {}).get('type')} "
                         f"{'with byte fallback (SentencePiece-style)' if tok.get('model', {}).get('byte_fallback') else ''}; "
                         "only byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style) are exported")
    arch_name, permute = ARCHS[mt]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    arch_str = gguf.MODEL_ARCH_NAMES[arch]
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    tmap = gguf.get_tensor_name_map(arch, n_layers)

    from hwcompat.fsutil import require_space
    from hwcompat.merge import _header, _read_tensors

    index = src / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    elems = sum(int(np.prod(info["shape"])) for f in files for k, info in _header(src / f).items()
                if k != "__metadata__")
    # llama.cpp quantizes from a lossless GGUF of the merged weights (their own dtype), written first
    written = lossless_type(cfg) if qtype in LLAMA_TYPES else qtype
    quantized = elems * BITS_PER_WEIGHT[qtype] / 8 if qtype in LLAMA_TYPES else 0
    require_space(out.parent, elems * BYTES_PER_ELEMENT[written] + quantized, f"the {qtype} GGUF")
    tmp = _temp_beside(out)
    final, note = None, None
    writer = gguf.GGUFWriter(str(tmp), arch_str)
    writer.add_name(name or model_name(src, cfg))
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    writer.add_rope_freq_base(float(rope))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[written]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # --- tokenizer --------------------------------------------------------------------------------
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    n_vocab = int(cfg.get("vocab_size") or len(vocab))
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer_name(src, tok, mt)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(src), load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer)
    tcfg_path = src / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    template = tcfg.get("chat_template")
    if not template and (src / "chat_template.jinja").exists():
        template = (src / "chat_template.jinja").read_text()
    if template and not special.chat_template:
        writer.add_chat_template(template)

    # --- tensors: two passes, so only one tensor is ever in memory ----------------------------------
    # Pass 1 declares every tensor (name, stored shape, type) from the safetensors headers alone;
    # pass 2 reads, converts and writes them one at a time in the same order.
    plan: list[tuple[str, str, str, Any]] = []  # (file, hf key, gguf name, ggml type)
    for f in files:
        for key, info in _header(src / f).items():
            if key == "__metadata__" or key.endswith("rotary_emb.inv_freq"):
                continue
            new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise HwcompatError(f"{src}: no GGUF name for tensor {key}; this model variant is not supported")
            shape = info["shape"]
            if len(shape) == 1 or written == "f32":
                t = gguf.GGMLQuantizationType.F32
            elif written == "q8_0" and shape[-1] % 32 == 0:
                t = gguf.GGMLQuantizationType.Q8_0
            elif written == "bf16":
                t = gguf.GGMLQuantizationType.BF16
            else:
                t = gguf.GGMLQuantizationType.F16
            probe = _convert(np.zeros((1, shape[-1]), np.float32), t, gguf, np)
            stored = tuple(shape[:-1]) + (probe.shape[-1],)
            writer.add_tensor_info(new, stored, probe.dtype, int(np.prod(stored)) * probe.dtype.itemsize, raw_dtype=t)
            plan.append((f, key, new, t))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for f in files:
            keys = [k for (ff, k, _, _) in plan if ff == f]
            types = {k: t for (ff, k, _, t) in plan if ff == f}
            for key, tensor in _read_tensors(src / f, keys):
                t = tensor.to(torch.float32)
                if permute and key.endswith("q_proj.weight"):
                    t = _permute(t, n_head)
                elif permute and key.endswith("k_proj.weight"):
                    t = _permute(t, n_kv)
                writer.write_tensor_data(_convert(t.numpy(), types[key], gguf, np))
        writer.close()
        final = tmp
        if qtype in LLAMA_TYPES:
            final = _temp_beside(out)
            note = quantize(tmp, final, qtype)
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
    count = len(plan)
    return ExportResult(out, arch_str, count, qtype, pre, note)
