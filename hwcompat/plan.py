"""Memory planner: will this fine-tune fit on this card? No torch, no weights read.

The estimate is a sum of named terms, each from the model's ``config.json``
and the device's resolved profile (dtype, attention kernel, quantization):

- base weights: parameter count x bytes of the profile dtype; QLoRA keeps
  linear layers in NF4 (0.5 byte/param) plus quantisation constants (one
  absmax per 64-weight block; double quantisation stores it in 8 bits with
  an fp32 constant per 256 blocks), embeddings / head / norms stay in the
  compute dtype (bitsandbytes Linear4bit; QLoRA paper, Dettmers et al. 2023).
- adapter weights, gradients, optimizer states: the trainable parameters in
  fp32; AdamW keeps two fp32 moments, 8-bit AdamW two 1-byte moments plus
  block constants (bitsandbytes docs; `accelerate estimate-memory` uses the
  same 4x-parameter rule of thumb for Adam training).
- activations: the tensors each decoder layer saves for backward, per token,
  counted module by module for the Llama block (norm inputs/outputs, q/k/v,
  attention output, SwiGLU gate/up/act/product, LoRA's rank-r intermediates);
  the approach of Korthikanti et al. 2022 ("Reducing Activation Recomputation",
  sbh(34 + 5as/h) for GPT blocks) adapted to SwiGLU and GQA. Gradient
  checkpointing keeps only each layer's input plus one layer's full set
  during recomputation (Unsloth's VRAM notes use the same split).
- the S^2 attention term: eager / math attention materialises the
  probabilities (a x s x s per layer); SDPA's efficient kernels and
  flash-attention do not.
- logits: batch x seq x vocab in the compute dtype, its fp32 upcast for the
  loss, and the fp32 gradient of the logits: the term that makes large-vocab
  models (Gemma, Qwen) surprisingly hungry at long sequence lengths. hwcompat's
  trainer projects only response positions, so `train` scales this term by its
  data's largest response share (``logit_fraction``).
- runtime: CUDA/ROCm context and library workspaces (a constant, measured
  at about 0.5 GiB on CUDA 12 and more on ROCm) plus allocator slack (a
  fraction of the rest; fragmentation, rounding to 2 MiB blocks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hwcompat.errors import InputError, excerpt

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: config.json "model_type" values the planner understands (Llama-style decoder blocks).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")

#: Runtime context + workspaces, bytes (torch CUDA context with cuBLAS/cuDNN handles; ROCm's is larger).
RUNTIME_CONTEXT = {"nvidia": int(0.5 * GIB), "amd": int(0.75 * GIB), "cpu": int(0.3 * GIB)}
ALLOCATOR_SLACK = 0.08  # caching-allocator fragmentation and 2 MiB rounding, fraction of allocated bytes

NF4_BYTES_PER_PARAM = 0.5
QUANT_CONST_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}  # double quantisation on / off
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0 + 2 * 4 / 2048, "sgd": 0.0}


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

    def other_params(self) -> int:
        """Embeddings, head, norms: kept in the compute dtype even under QLoRA."""
        norms = self.layers * (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)) + self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, rank: int, targets: list[str] | None = None) -> int:
        chosen = [(n, a, b) for n, a, b in self.linears() if not targets or targets == ["all-linear"] or n in targets]
        return rank * sum(a + b for _, a, b in chosen) * self.layers


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


def _shape(cfg: dict[str, Any], where: str) -> ModelShape:
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: config.json must hold a JSON object, got {type(cfg).__name__}")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise InputError(f"{where}: model_type {excerpt(mt)} is not supported by the planner; supported: "
                         f"{', '.join(SUPPORTED)} (Llama, Mistral, Qwen2/Qwen3, Gemma, Phi-3)")
    s = _sizes(cfg, where)
    heads, hidden = s["num_attention_heads"], s["hidden_size"]
    return ModelShape(
        model_type=mt, hidden=hidden, intermediate=s["intermediate_size"], layers=s["num_hidden_layers"],
        heads=heads, kv_heads=s.get("num_key_value_heads", heads), head_dim=s.get("head_dim", hidden // heads),
        vocab=s["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", mt in ("gemma", "gemma2"))),
        qkv_bias=bool(cfg.get("attention_bias", mt == "qwen2")), qk_norm=mt == "qwen3", fused=mt == "phi3",
        max_positions=s.get("max_position_embeddings", 4096),
    )


def find_config(model: str) -> Path:
    """A model folder, a config.json path, or a hub id whose config is in the local HF cache."""
    p = Path(model).expanduser()
    if p.is_file():
        return p
    if (p / "config.json").is_file():
        return p / "config.json"
    if "/" in model and not p.exists():
        import os

        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                          "huggingface")) / "hub")
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
    return _shape(cfg, str(path))


@dataclass(frozen=True)
class PlanInput:
    method: str = "lora"  # lora | qlora | full
    seq_len: int = 2048
    batch_size: int = 1
    lora_rank: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    lora_dropout: bool = True
    # Share of positions that need logits. A plain causal-LM forward computes them everywhere (1.0);
    # hwcompat's trainer only at response tokens, so `train` passes its data's worst-case share.
    logit_fraction: float = 1.0


@dataclass(frozen=True)
class Plan:
    fits: bool
    peak_bytes: int
    device_bytes: int
    breakdown: dict[str, int]
    inputs: PlanInput
    dtype: str
    attention: str
    params: int
    trainable_params: int
    notes: list[str]
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "peak_bytes": self.peak_bytes, "device_bytes": self.device_bytes,
                "headroom_bytes": self.headroom_bytes, "breakdown": self.breakdown, "suggestions": self.suggestions,
                "dtype": self.dtype, "attention": self.attention, "params": self.params,
                "trainable_params": self.trainable_params, "inputs": self.inputs.__dict__, "notes": self.notes}


def activation_elems_per_token_layer(s: ModelShape, rank: int, lora: bool, dropout: bool) -> int:
    """Elements one decoder layer saves for backward, per token (see module docstring)."""
    h, i = s.hidden, s.intermediate
    n = 2 * h  # input_layernorm: its input and output (the q/k/v input)
    n += s.q_dim + 2 * s.kv_dim  # q, k (after RoPE) and v for attention backward
    n += s.q_dim  # attention output = o_proj input
    n += 2 * h  # post_attention_layernorm input and output (gate/up input)
    n += 2 * i + i + i  # gate and up outputs, act(gate), act(gate)*up = down_proj input
    if lora:
        n_lin = len(s.linears())
        n += n_lin * rank  # each adapter's A(x), the input of B
        if dropout:  # dropout makes a fresh copy of each adapter input (plus its mask)
            n += sum(a for _, a, _ in s.linears())
    return n


def estimate(shape: ModelShape, inp: PlanInput, dtype: str, attention: str, vendor: str, device_bytes: int,
             quant_ok: bool = True) -> Plan:
    """The pure estimate; raises InputError for combinations the profile cannot run."""
    if inp.method not in ("lora", "qlora", "full"):
        raise InputError(f"--method {inp.method}: use lora, qlora or full")
    if inp.optimizer not in OPTIMIZER_BYTES:
        raise InputError(f"--optimizer {inp.optimizer}: use one of {', '.join(OPTIMIZER_BYTES)}")
    notes: list[str] = []
    db = DTYPE_BYTES[dtype]
    b, t = inp.batch_size, inp.seq_len
    tokens = b * t
    bd: dict[str, int] = {}
    if inp.method == "qlora":
        if not quant_ok:
            notes.append("this card's profile has no NF4 support: QLoRA will fail here")
        compute = 2 if db == 4 else db  # bnb computes in fp16/bf16
        bd["base_weights"] = int(shape.linear_params() * NF4_BYTES_PER_PARAM + shape.other_params() * compute)
        bd["quant_constants"] = int(shape.linear_params() * QUANT_CONST_BYTES[True])
    else:
        bd["base_weights"] = shape.params() * db
    lora = inp.method in ("lora", "qlora")
    trainable = shape.lora_params(inp.lora_rank, inp.lora_targets) if lora else shape.params()
    bd["adapter_weights"] = trainable * 4 if lora else 0
    # full fine-tuning: gradients in the weight dtype; LoRA: fp32 adapter gradients
    bd["gradients"] = trainable * (4 if lora else db)
    bd["optimizer_states"] = int(trainable * OPTIMIZER_BYTES[inp.optimizer])
    act_db = db if inp.method != "qlora" else (2 if db == 4 else db)
    per_layer = activation_elems_per_token_layer(shape, inp.lora_rank, lora, inp.lora_dropout) * act_db
    if inp.gradient_checkpointing:
        bd["activations"] = tokens * (shape.layers * shape.hidden * act_db + per_layer)
    else:
        bd["activations"] = tokens * shape.layers * per_layer
    if attention == "eager":
        layers_holding = 1 if inp.gradient_checkpointing else shape.layers
        bd["attention_scores"] = b * shape.heads * t * t * act_db * 2 * layers_holding
        notes.append("eager attention materialises the S^2 score matrix; sdpa or flash-attention avoid it")
    else:
        bd["attention_scores"] = 0
    bd["logits"] = int(tokens * min(1.0, max(0.0, inp.logit_fraction)) * shape.vocab * (act_db + 4 + 4))
    allocated = sum(bd.values())
    bd["runtime_overhead"] = RUNTIME_CONTEXT.get(vendor, 0) + int(ALLOCATOR_SLACK * allocated)
    peak = sum(bd.values())
    return Plan(fits=peak <= device_bytes, peak_bytes=peak, device_bytes=device_bytes, breakdown=bd, inputs=inp,
                dtype=dtype, attention=attention, params=shape.params(), trainable_params=trainable, notes=notes)


def suggest(shape: ModelShape, plan: Plan, vendor: str, quant_ok: bool) -> list[dict[str, Any]]:
    """If it does not fit: the cheapest changes that make it fit. If it fits: the largest seq / batch."""
    inp = plan.inputs

    def run(new: PlanInput) -> Plan:
        return estimate(shape, new, plan.dtype, plan.attention, vendor, plan.device_bytes, quant_ok)

    out: list[dict[str, Any]] = []
    if not plan.fits:
        candidates = []
        if not inp.gradient_checkpointing:
            candidates.append(("gradient_checkpointing=true", replace(inp, gradient_checkpointing=True)))
        if inp.batch_size > 1:
            candidates.append((f"micro_batch_size=1 gradient_accumulation={inp.batch_size}", replace(inp, batch_size=1)))
        if inp.method == "lora" and quant_ok:
            candidates.append(("qlora=true", replace(inp, method="qlora")))
        if inp.method == "full":
            candidates.append(("method=lora", replace(inp, method="lora")))
        if inp.optimizer == "adamw":
            candidates.append(("optimizer=adamw_8bit", replace(inp, optimizer="adamw_8bit")))
        for change, new in candidates:
            p = run(new)
            out.append({"change": change, "peak_bytes": p.peak_bytes, "fits": p.fits})
        # combinations of the memory knobs this card allows (2 or 3 at once)
        import itertools

        knobs = [(c, n) for c, n in candidates if c.startswith(("gradient_checkpointing", "micro_batch_size", "qlora"))]
        for k in range(2, len(knobs) + 1):
            for combo in itertools.combinations(knobs, k):
                new = inp
                for _, cand in combo:
                    new = replace(new, **{f: getattr(cand, f) for f in ("gradient_checkpointing", "batch_size", "method")
                                          if getattr(cand, f) != getattr(inp, f)})
                p = run(new)
                out.append({"change": " + ".join(c for c, _ in combo), "peak_bytes": p.peak_bytes, "fits": p.fits})
        seq = _round(_largest(lambda v: run(replace(inp, seq_len=v)).fits, 64, inp.seq_len))
        if seq:
            out.append({"change": f"max_seq_len={seq}", "peak_bytes": run(replace(inp, seq_len=seq)).peak_bytes,
                        "fits": True})
        # cheapest first: single changes before combinations, in the order tried (least disruptive first)
        order = {id(x): i for i, x in enumerate(out)}
        out.sort(key=lambda x: (not x["fits"], x["change"].count(" + "), order[id(x)]))
        fixed = plan.breakdown["base_weights"] + plan.breakdown.get("quant_constants", 0) + RUNTIME_CONTEXT.get(vendor, 0)
        if not any(s["fits"] for s in out) and fixed > plan.device_bytes:
            out.append({"change": "a smaller model or a card with more memory: the base weights alone need "
                                  f"{fixed / GIB:.1f} GiB here" + ("" if quant_ok else " and this card cannot run QLoRA"),
                        "peak_bytes": fixed, "fits": False})
        return out
    seq = _round(_largest(lambda v: run(replace(inp, seq_len=v)).fits, inp.seq_len, shape.max_positions), inp.seq_len)
    batch = _largest(lambda v: run(replace(inp, batch_size=v)).fits, inp.batch_size, 1024)
    out.append({"change": f"max_seq_len={seq} (largest at micro_batch_size={inp.batch_size})",
                "peak_bytes": run(replace(inp, seq_len=seq)).peak_bytes, "fits": True})
    out.append({"change": f"micro_batch_size={batch} (largest at max_seq_len={inp.seq_len})",
                "peak_bytes": run(replace(inp, batch_size=batch)).peak_bytes, "fits": True})
    return out


def _largest(ok, lo: int, hi: int) -> int | None:
    """Largest v in [lo, hi] with ok(v) (ok is monotone decreasing), or None."""
    if not ok(lo):
        return None
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _round(v: int | None, floor: int = 64) -> int | None:
    """Round a length down to a multiple of 64 (kernels and users like round numbers)."""
    if v is None:
        return None
    return max(floor, v - v % 64) if v >= 64 else v
