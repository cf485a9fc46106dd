"""A model's shape from its config.json: what the planner's arithmetic reads (no torch, no weights).

The family's own facts come from its ``choices.ModelFamily`` row; ``find_config`` also finds a hub id already in
the local Hugging Face cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat import envvars
from hwcompat.choices import MODEL_FAMILIES, families_text
from hwcompat.errors import InputError, excerpt


GIB = 2**30


#: config.json "model_type" values the planner understands (Llama-style decoder blocks).
SUPPORTED = tuple(MODEL_FAMILIES)


#: fp32 logits one loss chunk may hold: 220 rows at Qwen3's 151,936-token vocabulary, 682 at SmolLM2's 49,152
#: (Liger's FLCE sizes its chunks alike: about as many logits as the hidden states hold).
LOGIT_CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    fused: bool  # Phi-3: qkv_proj and gate_up_proj are single Linear layers
    max_positions: int
    softcapped: bool = False  # Gemma 2's final_logit_softcapping: the loss keeps tanh' beside a chunk's logits
    attn_softcapped: bool = False  # Gemma 2's attn_logit_softcapping: eager attention keeps tanh's output too

    @property
    def norms_per_layer(self) -> int:
        """Gemma 2 wraps attention and MLP in norms on both sides ("sandwich"); the others norm before each."""
        return 4 if MODEL_FAMILIES[self.model_type].sandwich_norms else 2

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of each Linear in one decoder layer; LoRA 'all-linear' adapts all of them."""
        h, i = self.hidden, self.intermediate
        if self.fused:
            return [("qkv_proj", h, self.q_dim + 2 * self.kv_dim), ("o_proj", self.q_dim, h),
                    ("gate_up_proj", h, 2 * i), ("down_proj", i, h)]
        return [("q_proj", h, self.q_dim), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim),
                ("o_proj", self.q_dim, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def linear_params(self) -> int:
        per = sum(a * b for _, a, b in self.linears())
        if self.qkv_bias:
            per += self.q_dim + 2 * self.kv_dim
        return per * self.layers

    def layer_params(self) -> int:
        """One decoder layer's weights (linears, biases, norms): what streaming moves per visit."""
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.linear_params() // self.layers + norms

    def resident_params(self) -> int:
        """What streaming keeps on the card: embeddings, LM head and the final norm."""
        return self.params() - self.layers * self.layer_params()

    def other_params(self) -> int:
        """Embeddings, head, norms: kept in the compute dtype even under QLoRA."""
        norms = self.layers * (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)) + self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, rank: int, targets: list[str] | None = None) -> int:
        return sum(self.lora_tensor_sizes(rank, targets))

    def lora_tensor_sizes(self, rank: int, targets: list[str] | None = None) -> list[int]:
        """Every LoRA A (rank x in) and B (out x rank) matrix, layer by layer."""
        chosen = [(n, a, b) for n, a, b in self.linears() if not targets or targets == ["all-linear"] or n in targets]
        return [size for _ in range(self.layers) for _, a, b in chosen for size in (rank * a, rank * b)]

    def tensor_sizes(self) -> list[int]:
        """Full fine-tuning: the linear weights of every layer, the rest (embeddings, norms) as one."""
        return [a * b for _ in range(self.layers) for _, a, b in self.linears()] + [self.other_params()]


#: config.json size fields: (required, upper bound). Every one must be a positive integer.
SIZE_FIELDS = {"hidden_size": (True, 1 << 20), "intermediate_size": (True, 1 << 22),
               "num_hidden_layers": (True, 10_000), "num_attention_heads": (True, 10_000),
               "vocab_size": (True, 1 << 24), "num_key_value_heads": (False, 10_000), "head_dim": (False, 1 << 16),
               "max_position_embeddings": (False, 1 << 26)}


def _sizes(cfg: dict[str, Any], where: str) -> dict[str, int]:
    """The size fields as positive integers within bounds; a clear error naming the field otherwise."""
    out = {}
    for key, (required, high) in SIZE_FIELDS.items():
        value = cfg.get(key)
        if value is None:
            if required:
                raise InputError(f"{where}: missing field {key!r} in config.json")
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
            raise InputError(f"{where}: {key} must be a positive integer (at most {high:,}), got {excerpt(value)}")
        out[key] = value
    heads, kv = out["num_attention_heads"], out.get("num_key_value_heads", out["num_attention_heads"])
    if heads % kv:
        raise InputError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    if "head_dim" not in out and out["hidden_size"] % heads:
        raise InputError(f"{where}: hidden_size ({out['hidden_size']}) is not a multiple of num_attention_heads "
                         f"({heads}) and config.json has no head_dim")
    return out


def logit_chunk_rows(vocab: int) -> int:
    """Rows of logits the loss computes at once (the planner's logits term and the loss share this rule)."""
    return max(16, LOGIT_CHUNK_BYTES // (4 * max(1, vocab)))


def shape_from_config(cfg: dict[str, Any], where: str) -> ModelShape:
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: config.json must hold a JSON object, got {type(cfg).__name__}")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise InputError(f"{where}: model_type {excerpt(mt)} is not supported by the planner; supported: "
                         f"{families_text()}")
    s, family = _sizes(cfg, where), MODEL_FAMILIES[mt]
    heads, hidden = s["num_attention_heads"], s["hidden_size"]
    return ModelShape(
        model_type=mt, hidden=hidden, intermediate=s["intermediate_size"], layers=s["num_hidden_layers"],
        heads=heads, kv_heads=s.get("num_key_value_heads", heads), head_dim=s.get("head_dim", hidden // heads),
        vocab=s["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", family.ties_head)),
        qkv_bias=bool(cfg.get("attention_bias", family.qkv_bias)), qk_norm=family.qk_norm, fused=family.fused,
        max_positions=s.get("max_position_embeddings", 4096), softcapped=bool(cfg.get("final_logit_softcapping")),
        attn_softcapped=bool(cfg.get("attn_logit_softcapping", family.attn_softcap)),
    )


def find_config(model: str) -> Path:
    """A model folder, a config.json path, or a hub id whose config is in the local HF cache."""
    p = Path(model).expanduser()
    if p.is_file():
        return p
    if (p / "config.json").is_file():
        return p / "config.json"
    if "/" in model and not p.exists():
        hub = Path(envvars.get("HF_HUB_CACHE") or Path(envvars.get("HF_HOME") or Path.home() / ".cache" /
                                                       "huggingface") / "hub")
        snaps = sorted((hub / f"models--{model.replace('/', '--')}" / "snapshots").glob("*/config.json"))
        if snaps:
            return snaps[-1]
    raise InputError(f"--model {model}: no config.json there (a local model folder, a config.json path, or a "
                     "hub id already in the local Hugging Face cache)")


def load_shape(model: str) -> ModelShape:
    path = find_config(model)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: cannot read it as JSON ({str(exc)[:150]})") from None
    if isinstance(cfg, dict) and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    return shape_from_config(cfg, str(path))
