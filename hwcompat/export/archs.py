"""What each architecture needs in GGUF beyond the shared Llama-like keys: the data that tells the families apart.

Each entry follows llama.cpp's own converter (``convert_hf_to_gguf.py``, its ``conversion/`` package at the
llama-cpp-python 0.3.36 pin): the GGUF architecture, whether q/k are permuted for its rotary layout, a shift added to
RMSNorm weights, the tensors it drops, and the hyper-parameters it writes. ``tests/test_export_archs.py`` runs a tiny
model of each through llama.cpp and ``--verify``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hwcompat.choices import MODEL_FAMILIES


@dataclass(frozen=True)
class Arch:
    gguf: str  # gguf.MODEL_ARCH member
    family: str  # config.json model_type (choices.MODEL_FAMILIES: the one list of supported families)
    permute_qk: bool = False  # HF half-split rotary -> GGUF interleaved (llama.cpp's "normal" RoPE)
    norm_shift: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    drop: tuple[str, ...] = ()  # HF tensors llama.cpp does not read (Gemma ties the head to the embedding)

    @property
    def label(self) -> str:
        """How users call the family."""
        return MODEL_FAMILIES[self.family].label


ARCHS: dict[str, Arch] = {
    "llama": Arch("LLAMA", "llama", permute_qk=True),
    "mistral": Arch("LLAMA", "mistral", permute_qk=True),
    "qwen2": Arch("QWEN2", "qwen2"),
    "qwen3": Arch("QWEN3", "qwen3"),
    "gemma": Arch("GEMMA", "gemma", norm_shift=1.0, drop=("lm_head.weight",)),
    "gemma2": Arch("GEMMA2", "gemma2", norm_shift=1.0, drop=("lm_head.weight",)),
    "phi3": Arch("PHI3", "phi3"),
}


def rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings wherever the config keeps them (``rope_scaling`` + top-level keys before transformers 5,
    ``rope_parameters`` since)."""
    merged = {k: cfg[k] for k in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")
              if cfg.get(k) is not None}
    merged.update(cfg.get("rope_scaling") or {})
    merged.update(cfg.get("rope_parameters") or {})
    return merged


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


def rope_dims(model_type: str, cfg: dict[str, Any]) -> int:
    """Rotary dimensions per head: all of them, except Phi-3's partial rotary factor."""
    if MODEL_FAMILIES[model_type].fused:  # Phi-3's partial rotary
        return int(float(rope(cfg).get("partial_rotary_factor", 1.0)) * int(cfg["hidden_size"])) // int(
            cfg["num_attention_heads"])
    return head_dim(cfg)


def check(src, model_type: str, cfg: dict[str, Any]) -> None:
    """What llama.cpp's graph for the family takes as given, refused before anything is written when the model
    differs: its answers would be wrong with no error (``--verify`` would catch it later; this says why)."""
    from hwcompat.errors import InputError

    family = MODEL_FAMILIES[model_type]
    if family.ties_head and cfg.get("tie_word_embeddings") is False:
        raise InputError(f"{src}: this {ARCHS[model_type].label} model has its own output head "
                         "(tie_word_embeddings false), but llama.cpp's Gemma reads the head from the token embedding; "
                         "train without a LoRA on lm_head (the Gemma default) and merge again")
    if family.query_scalar:
        scalar = cfg.get("query_pre_attn_scalar")
        allowed = {head_dim(cfg), int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])}
        if scalar is not None and int(scalar) not in allowed:
            raise InputError(f"{src}: query_pre_attn_scalar {scalar}: llama.cpp's Gemma 2 scales queries by "
                             f"1/sqrt of head_dim or hidden_size/heads ({sorted(allowed)}), as the released "
                             "Gemma 2 models do; this variant cannot be exported faithfully")


def write_specific(writer, model_type: str, cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """Write the family's own keys; return extra tensors (GGUF name, float32 array) it needs."""
    family = MODEL_FAMILIES[model_type]
    if family.attn_softcap is not None:  # Gemma 2: both soft-caps and its sliding window
        writer.add_attn_logit_softcapping(float(cfg.get("attn_logit_softcapping") or 0.0))
        writer.add_final_logit_softcapping(float(cfg.get("final_logit_softcapping") or 0.0))
        writer.add_sliding_window(int(cfg.get("sliding_window") or 0))
    if family.fused:
        return _phi3(writer, cfg)
    return []


def _phi3(writer, cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """Phi-3's sliding window (0 = none) and, for the 128k models, LongRoPE: the long/short factors become tensors
    and the attention factor llama.cpp cannot derive (as llama.cpp's Phi3MiniModel writes them)."""
    import numpy as np

    r = rope(cfg)
    ctx = int(cfg.get("max_position_embeddings") or 4096)
    orig = int(r.get("original_max_position_embeddings") or ctx)
    writer.add_rope_scaling_orig_ctx_len(orig)
    writer.add_sliding_window(int(cfg.get("sliding_window") or 0))
    long, short = r.get("long_factor"), r.get("short_factor")
    if not long:
        return []
    kind = str(r.get("rope_type") or r.get("type") or "").lower()
    scale = ctx / orig
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        from hwcompat.errors import InputError

        raise InputError(f"Phi-3 rope scaling {kind!r} has no GGUF form in llama.cpp (longrope and yarn have)")
    writer.add_rope_scaling_attn_factors(attn)
    return [("rope_factors_long.weight", np.asarray(long, np.float32)),
            ("rope_factors_short.weight", np.asarray(short, np.float32))]
