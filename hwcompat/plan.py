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
- activations: the tensors each decoder layer saves for backward, per token, tensor by tensor as hwcompat trains
  (transformers' modules, peft's fp32 adapters, torch autocast): the norms' fp32 inputs, q/k/v and attention's
  output, the MLP's gate/up/act, the inputs the trained weights need (under autocast a cast per adapter or per
  fp32 linear), LoRA's rank-r intermediates; the approach of Korthikanti et al. 2022 ("Reducing Activation
  Recomputation") made exact: tests/train/test_plan_activations.py measures every family's layer with autograd's
  saved_tensors_hooks and the count must agree to the byte. Gradient checkpointing keeps only each layer's input
  plus one layer's full set during recomputation (Unsloth's VRAM notes use the same split).
- the S^2 attention term: eager / math attention keeps the fp32 softmax, its half cast and Gemma 2's soft-cap
  (heads x s x s each, per layer; measured alike); hwcompat's CPU kernel (cpu_bf16) its probabilities only, plus
  one layer's fp32 scores for a moment; SDPA's efficient kernels and flash-attention keep none.
- logits: the loss projects response positions onto the vocabulary one chunk
  of ``logit_chunk_rows(vocab)`` rows at a time (train/objectives/linear_logps.py),
  so the term is one chunk: its fp32 logits, plus the compute-dtype copy a half
  dtype needs beside them, plus tanh' for a soft-capped model (Gemma 2). Fewer
  response rows than a chunk (``logit_fraction`` of the tokens, the data's
  largest response share) make it smaller. Unchunked, batch x seq x vocab in
  three copies was the term that made large-vocab models (Gemma, Qwen) hungry.
- streamed (``offload: layers``, train/stream.py): the decoder layers' frozen weights live in pinned host
  memory; the card holds ``prefetch + 1`` layer-sized slots instead, plus what is not streamed (embeddings,
  final norm, LM head). Per-layer recomputation is implied, so activations are the checkpointed ones. The
  host needs the whole base (loaded there first) plus a layer; each micro-step copies every layer twice
  (forward, then recompute + backward), and its time is estimated as max(compute, copy) from the card's
  peak throughput and its PCIe link (``catalog/throughput.yaml``).
- runtime: CUDA/ROCm context and library workspaces (a constant, measured
  at about 0.5 GiB on CUDA 12 and more on ROCm) plus allocator slack (a
  fraction of the rest; fragmentation, rounding to 2 MiB blocks).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hwcompat import compat
from hwcompat.choices import DTYPE_BYTES, MODEL_FAMILIES, OPTIMIZERS, Vendor, families_text
from hwcompat.errors import InputError, excerpt
from hwcompat import envvars

GIB = 2**30

#: config.json "model_type" values the planner understands (Llama-style decoder blocks).
SUPPORTED = tuple(MODEL_FAMILIES)

#: Runtime context + workspaces, bytes (torch CUDA context with cuBLAS/cuDNN handles; ROCm's is larger).
RUNTIME_CONTEXT = {"nvidia": int(0.5 * GIB), "amd": int(0.75 * GIB), "cpu": int(0.3 * GIB),
                   "intel": int(0.75 * GIB)}  # Intel: not yet measured on an Arc card; ROCm's, the larger figure
#: Shorter than this, a max_seq_len suggested beside other changes is no fine-tune worth suggesting.
MIN_SUGGESTED_SEQ = 256
#: fp32 logits one loss chunk may hold: 220 rows at Qwen3's 151,936-token vocabulary, 682 at SmolLM2's 49,152
#: (Liger's FLCE sizes its chunks alike: about as many logits as the hidden states hold).
LOGIT_CHUNK_BYTES = 128 << 20
ALLOCATOR_SLACK = 0.08  # caching-allocator fragmentation and 2 MiB rounding, fraction of allocated bytes

NF4_BYTES_PER_PARAM = 0.5
QUANT_CONST_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}  # double quantisation on / off
#: bitsandbytes' 8-bit blockwise AdamW (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state, 0.45-0.50):
#: two uint8 states plus a float32 absmax per 256-value block; tensors under 4,096 values keep float32 states;
#: two shared 256-entry float32 quantisation maps.
BNB_BLOCK, BNB_MIN_8BIT_SIZE, BNB_QMAPS_BYTES = 256, 4096, 2 * 256 * 4


def optimizer_state_bytes(optimizer: str, tensor_sizes: list[int]) -> int:
    """Bytes of optimizer state for trainable tensors of these sizes (AdamW: two float32 moments each)."""
    if optimizer == "adamw":
        return 8 * sum(tensor_sizes)
    total = 0
    for n in tensor_sizes:
        total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
    return total + (BNB_QMAPS_BYTES if any(n >= BNB_MIN_8BIT_SIZE for n in tensor_sizes) else 0)


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
    # Sequences per training row: DPO puts a pair's chosen and rejected answers in one forward (2).
    sequences_per_row: int = 1
    # Share of positions that need logits. A plain causal-LM forward computes them everywhere (1.0);
    # hwcompat's trainer only at response tokens, so `train` passes its data's worst-case share.
    logit_fraction: float = 1.0
    generations: int = 0  # grpo: completions per prompt (G); 0: not a GRPO run. batch_size counts completions
    completion_len: int = 0  # grpo: max_completion_length (the rollout's new tokens per row)
    offload: str = "none"  # none | layers (train/stream.py); "auto" is decided by decide_offload, never estimated
    prefetch: int = 1  # offload=layers: device slots = prefetch + 1
    optimizer_offload: str = "none"  # full: none | host (train/host_optim.py); "auto": decide_offload


@dataclass(frozen=True)
class Host:
    """What a streamed run depends on besides the card's memory: host RAM, the link, the card's speed."""

    ram_bytes: int | None = None  # the host's RAM (the CPU reading); None: unknown, not checked
    pcie_generation: int | None = None
    pcie_width: int | None = None
    peak_tflops: float | None = None  # the card's dense peak in the run's dtype; None: step time not estimated
    unified: bool = False  # the card's memory is this host's RAM: the training process's host side shares it


@dataclass(frozen=True)
class Stream:
    """The streamed terms of a plan (offload: layers)."""

    layer_bytes: int  # one decoder layer's frozen weights
    host_bytes: int  # host RAM the run needs: the base (loaded on the host, then pinned layer by layer) + a layer
    host_ram_bytes: int | None  # what the host has
    bytes_per_micro_step: int  # host -> device: every layer in forward and again in backward
    link_bytes_per_s: float  # effective pinned host -> device rate of the link
    link: str  # e.g. "PCIe 3.0 x16"
    copy_seconds: float  # per micro-step
    compute_seconds: float | None  # per micro-step, from the card's peak x sustained fraction
    step_seconds: float | None  # max(compute, copy): the copies overlap compute (+ a GRPO rollout's copies)
    rollout_bytes: int = 0  # GRPO: the rollout's share of bytes_per_micro_step (every layer per new token)

    @property
    def host_fits(self) -> bool:
        return self.host_ram_bytes is None or self.host_bytes <= self.host_ram_bytes


@dataclass(frozen=True)
class HostOptimizer:
    """The host side of ``optimizer_offload: host`` (train/host_optim.py): RAM and the copies of one step."""

    host_bytes: int  # fp32 masters, fp32 gradients, AdamW's two moments, pinned staging, the process
    host_ram_bytes: int | None
    bytes_per_step: int  # device -> host gradients (each micro-step) + host -> device weights (once)
    link: str
    copy_seconds: float  # per optimizer step, at the link's rate (gradient copies overlap backward)
    largest_params: int  # the largest model whose host side fits this host's RAM (0: unknown)

    @property
    def host_fits(self) -> bool:
        return self.host_ram_bytes is None or self.host_bytes <= self.host_ram_bytes


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
    stream: Stream | None = None
    max_allocation: int = 0  # the card's single-allocation limit the plan was checked against (0: none)
    host_optimizer: HostOptimizer | None = None

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "peak_bytes": self.peak_bytes, "device_bytes": self.device_bytes,
                "headroom_bytes": self.headroom_bytes, "breakdown": self.breakdown, "suggestions": self.suggestions,
                "dtype": self.dtype, "attention": self.attention, "params": self.params,
                "trainable_params": self.trainable_params, "inputs": self.inputs.__dict__, "notes": self.notes,
                "stream": None if self.stream is None else {**self.stream.__dict__, "host_fits": self.stream.host_fits},
                "host_optimizer": None if self.host_optimizer is None else {
                    **self.host_optimizer.__dict__, "host_fits": self.host_optimizer.host_fits}}


#: What a layer's trained weights are, for what autograd keeps: LoRA adapters (fp32) on a frozen base; a full
#: fine-tune's fp32 masters under autocast (resident); its working copy in the compute dtype (optimizer in host RAM).
ADAPTERS, MASTERS, WORKING_COPY = "adapters", "masters", "working copy"


def layer_activation_bytes(s: ModelShape, rank: int, trained: str, dropout: bool, act_db: int,
                           attention: str = "sdpa") -> int:
    """Bytes one decoder layer saves for backward, per token, as hwcompat trains: transformers' modules, peft's LoRA
    with fp32 adapters, torch autocast in ``act_db``-byte halves (4: fp32, no autocast). Every term is a tensor
    autograd keeps (tests/train/test_plan_activations.py measures them with saved_tensors_hooks on tiny models of
    every supported family and must agree to the byte); the S^2 score matrices are ``attention_scores``."""
    h, i, q, kv = s.hidden, s.intermediate, s.q_dim, s.kv_dim
    lora = trained == ADAPTERS
    # each RMSNorm's input upcast to fp32 (HF norms compute in fp32) and its rstd; trained, also the normalized input
    # for the weight's gradient, in the weights' dtype (Gemma's norms multiply in fp32 whatever the dtype)
    normed = 4 if trained == MASTERS or MODEL_FAMILIES[s.model_type].norms_in_fp32 else act_db
    n = s.norms_per_layer * (h * 4 + 4 + (0 if lora else h * normed))
    if s.qk_norm:  # Qwen3's per-head q/k norms alike (their input is a linear's output: the compute dtype)
        n += (q + kv) * 4 + (s.heads + s.kv_heads) * 4 + (0 if lora else (q + kv) * act_db)
    n += _attention_bytes(s, act_db, attention)
    n += 3 * i * act_db  # the MLP's gate and up outputs and act(gate)
    n += _linear_input_bytes(s, trained, act_db, attention, dropout)
    if lora:
        n += len(s.linears()) * rank * act_db  # each adapter's A(x), the input of B
        if dropout:  # each adapter input's dropped copy and its mask (CUDA's native_dropout: a byte per value)
            n += sum(a for _, a, _ in s.linears()) * (act_db + 1)
    return n


def score_bytes(s: ModelShape, act_db: int, attention: str = "eager") -> int:
    """Bytes attention keeps per score (each of heads x S x S per layer). Eager: the fp32 softmax output, its cast to
    a half dtype (what multiplies v), and Gemma 2's tanh output (its soft-cap); SDPA's math kernel (a card without a
    fused one) is counted alike; it is measured for eager only (on the CPU). hwcompat's CPU kernel (cpu_bf16): only
    the probabilities in the compute dtype (train/cpu_attention.py)."""
    if attention == CPU_BF16:
        return act_db
    return 4 + (act_db if act_db < 4 else 0) + (act_db if s.attn_softcapped else 0)


def score_transient_bytes(act_db: int, attention: str) -> int:
    """Bytes per score one layer's cpu_bf16 kernel holds for a moment beyond what it keeps: the fp32 scores and
    softmax beside the probabilities' cast (the backward's fp32 dP and half dS are smaller). Eager's are not counted."""
    return 8 + (act_db if act_db < 4 else 0) if attention == CPU_BF16 else 0


def _attention_bytes(s: ModelShape, act_db: int, attention: str) -> int:
    """What attention keeps per token: SDPA its q, k, v, output and the fp32 log-sum-exp per head; eager its q and
    k, v repeated to every head (GQA's repeat_kv copies); cpu_bf16 q, k and v in the compute dtype (contiguous copies,
    no repeat_kv) and its output."""
    if attention in ("eager", SDPA_MATH):
        return 3 * s.q_dim * act_db
    if attention == CPU_BF16:
        return (2 * s.q_dim + 2 * s.kv_dim) * act_db
    extra = s.q_dim + s.kv_dim if s.fused else 0  # Phi-3: v is a view into qkv_proj's output, which stays whole
    return (2 * s.q_dim + 2 * s.kv_dim + extra) * act_db + s.heads * 4


def _linear_input_bytes(s: ModelShape, trained: str, act_db: int, attention: str, dropout: bool = False) -> int:
    """The inputs kept for the weights' (or adapters') gradients. Where no cast intervenes (fp32, a half working
    copy, a LoRA adapter without dropout: train/model._cast_once) each distinct input once: q/k/v share theirs,
    gate/up theirs. A LoRA adapter with dropout under autocast casts its input to fp32 and autocast back: a copy per
    adapter. fp32 masters under autocast keep autocast's cast of each fp32 input per linear, while o_proj's and
    down_proj's inputs come out of half ops and are kept as they are."""
    h, i, q = s.hidden, s.intermediate, s.q_dim
    # SDPA's output is o_proj's input in place (counted with attention) where q kept the (batch, seq, head) layout;
    # eager's and cpu_bf16's is a fresh transposed copy, and so is Phi-3's (its rotary concatenates q in head-major
    # layout)
    o_input = q if attention in SQUARE or s.fused else 0
    if act_db == 4 or trained == WORKING_COPY or (trained == ADAPTERS and not dropout):
        return (2 * h + i + o_input) * act_db
    if trained == ADAPTERS:
        return sum(a for _, a, _ in s.linears()) * act_db
    cast = sum(a for name, a, _ in s.linears() if name not in ("o_proj", "down_proj"))
    return (cast + i + o_input) * act_db


def _checked(inp: PlanInput) -> PlanInput:
    """The inputs the planner can plan; a streamed run always recomputes (each layer is re-fetched in backward)."""
    if inp.method not in ("lora", "qlora", "full"):
        raise InputError(f"--method {inp.method}: use lora, qlora or full")
    streamed = inp.offload == "layers"
    if streamed and inp.method == "full" and inp.optimizer_offload != "host":
        raise InputError("offload=layers with a full fine-tune streams the working copy of a model whose optimizer "
                         "lives in host RAM: set optimizer_offload=host too")
    if streamed and inp.method not in ("lora", "full"):
        raise InputError(f"offload=layers streams a frozen LoRA base; it does not apply to {inp.method}")
    if inp.optimizer_offload == "host" and inp.method != "full":
        raise InputError(f"optimizer_offload=host applies to a full fine-tune, not to {inp.method}")
    if inp.optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer={inp.optimizer}: use one of {', '.join(OPTIMIZERS)}")
    return replace(inp, gradient_checkpointing=True) if streamed else inp


def _weight_terms(shape: ModelShape, inp: PlanInput, db: int, quant_ok: bool, notes: list[str]) -> dict[str, int]:
    """Base weights (NF4, streamed slots or resident), the adapter, its gradients and the optimizer's states."""
    bd: dict[str, int] = {}
    if inp.method == "qlora":
        if not quant_ok:
            notes.append("this card's profile has no NF4 support: QLoRA will fail here")
        compute = 2 if db == 4 else db  # bnb computes in fp16/bf16
        bd["base_weights"] = int(shape.linear_params() * NF4_BYTES_PER_PARAM + shape.other_params() * compute)
        bd["quant_constants"] = int(shape.linear_params() * QUANT_CONST_BYTES[True])
    elif inp.offload == "layers":
        bd["base_weights"] = shape.resident_params() * db
        bd["streamed_slots"] = (inp.prefetch + 1) * shape.layer_params() * db
    elif inp.method == "full":
        return _full_terms(shape, inp, db)
    else:
        bd["base_weights"] = shape.params() * db
    trainable = shape.lora_params(inp.lora_rank, inp.lora_targets)
    bd["adapter_weights"] = trainable * 4
    bd["gradients"] = trainable * 4  # fp32 adapter gradients
    bd["optimizer_states"] = optimizer_state_bytes(inp.optimizer, shape.lora_tensor_sizes(inp.lora_rank,
                                                                                          inp.lora_targets))
    return bd


#: optimizer_offload=host: device gradients in flight to the host before the oldest copy is waited for
#: (train/host_optim.py IN_FLIGHT_BYTES).
HOST_GRAD_IN_FLIGHT = 256 << 20


def _full_terms(shape: ModelShape, inp: PlanInput, db: int) -> dict[str, int]:
    """A full fine-tune's card side. Resident (torch AMP): fp32 weights, fp32 gradients, the optimizer's states,
    and in a half dtype the copy of every weight autocast casts and backward keeps. Offloaded: the working copy in
    the profile's dtype, and the gradients on their way to the host (at most the in-flight bound plus the largest
    tensor); the optimizer's side is the host's (``host_optimizer_terms``)."""
    n = shape.params()
    if inp.optimizer_offload == "host":
        largest = max(shape.tensor_sizes())
        grads = min(n * db, HOST_GRAD_IN_FLIGHT + largest * db)
        if inp.offload == "layers":  # the layers' working copy visits the card in prefetch + 1 slots
            return {"base_weights": shape.resident_params() * db,
                    "streamed_slots": (inp.prefetch + 1) * shape.layer_params() * db, "gradients": grads,
                    "optimizer_states": 0}
        return {"base_weights": n * db, "gradients": grads, "optimizer_states": 0}
    return {"base_weights": n * 4, "autocast_copies": n * db if db != 4 else 0, "gradients": n * 4,
            "optimizer_states": optimizer_state_bytes(inp.optimizer, shape.tensor_sizes())}


def host_optimizer_terms(shape: ModelShape, inp: PlanInput, db: int, host: Host, vendor: str) -> HostOptimizer:
    """Host RAM and copies of ``optimizer_offload: host``: 16 bytes per parameter (fp32 master, fp32 gradient,
    AdamW's two moments), the pinned staging a CUDA card's gradients land in (its dtype), the process; each step
    moves every gradient down once per micro-step and every weight up once."""
    n = shape.params()
    staging = n * db if vendor == Vendor.nvidia else 0
    pinned = shape.layers * shape.layer_params() * db if inp.offload == "layers" else 0  # the streamed working copy
    per_param = 16 + (db if vendor == Vendor.nvidia else 0) + (db if inp.offload == "layers" else 0)
    gen, width, rate = _link(host)
    moved = n * db * (1 + 1)
    ram = host.ram_bytes
    largest = max(0, (ram - HOST_RUNTIME) // per_param) if ram else 0
    return HostOptimizer(host_bytes=16 * n + staging + pinned + HOST_RUNTIME, host_ram_bytes=ram, bytes_per_step=moved,
                         link=f"PCIe {gen}.0 x{width}{'' if host.pcie_generation else ' (assumed)'}",
                         copy_seconds=moved / rate, largest_params=largest)


#: The planner's name for SDPA where the card has no fused kernel: its math kernel holds the scores as eager does.
SDPA_MATH = "sdpa-math"
#: hwcompat's CPU training attention (train/cpu_attention.py): the bf16 probabilities kept, S^2 per layer.
CPU_BF16 = "cpu_bf16"
#: The attentions whose memory has an S^2 term per layer, and what the plan says of each.
SQUARE_NOTES = {
    "eager": "eager attention materialises the S^2 score matrix; sdpa or flash-attention avoid it",
    SDPA_MATH: "SDPA runs its math kernel on this card (no fused kernel: the profile's hardware.fused_sdpa), which "
               "materialises the S^2 score matrix as eager does",
    CPU_BF16: "attention=cpu_bf16 keeps each layer's probabilities (S^2) for a faster backward; where that does not "
              "fit, training falls back to sdpa",
}
SQUARE = tuple(SQUARE_NOTES)


def max_allocation(hardware: dict[str, Any]) -> int:
    """The card's single-allocation limit in bytes from its profile's hardware facts (0: none)."""
    return int(float(hardware.get("max_allocation_gib") or 0) * GIB)


def planned_attention(attention: str, hardware: dict[str, Any]) -> str:
    """The attention the planner counts: the profile's choice, with SDPA on a card without a fused SDPA kernel
    (RDNA1/2, MI100, Alchemist: ``hardware.fused_sdpa: false`` in its profile) counted as its math kernel."""
    return SDPA_MATH if attention == "sdpa" and not hardware.get("fused_sdpa", True) else attention


def _activation_terms(shape: ModelShape, inp: PlanInput, db: int, attention: str, notes: list[str]
                      ) -> dict[str, int]:
    """Saved activations (per layer, or one layer's worth plus checkpoints), attention scores, logits."""
    b, t = inp.batch_size * inp.sequences_per_row, inp.seq_len
    tokens = b * t
    lora = inp.method in ("lora", "qlora")
    act_db = db if inp.method != "qlora" else (2 if db == 4 else db)
    trained = ADAPTERS if lora else (WORKING_COPY if inp.optimizer_offload == "host" else MASTERS)
    per_layer = layer_activation_bytes(shape, inp.lora_rank, trained, inp.lora_dropout, act_db, attention)
    bd: dict[str, int] = {}
    if inp.gradient_checkpointing:  # each layer's input (the residual stream: fp32 with fp32 masters)
        bd["activations"] = tokens * (shape.layers * shape.hidden * (4 if trained == MASTERS else act_db) + per_layer)
    else:
        bd["activations"] = tokens * shape.layers * per_layer
    if attention in SQUARE:
        layers_holding = 1 if inp.gradient_checkpointing else shape.layers
        held = score_bytes(shape, act_db, attention) * layers_holding
        bd["attention_scores"] = b * shape.heads * t * t * (held + score_transient_bytes(act_db, attention))
        notes.append(SQUARE_NOTES[attention])
    else:
        bd["attention_scores"] = 0
    bd["logits"] = logit_chunk_bytes(shape, tokens * min(1.0, max(0.0, inp.logit_fraction)), act_db)
    if inp.generations:
        rollout = rollout_bytes(shape, inp, act_db)
        bd["rollout"] = max(0, rollout - sum(bd.values()))
        notes.append(f"grpo: the rollout (no gradients) holds the KV cache of {inp.batch_size} rows x {inp.seq_len} "
                     f"tokens and one token's logits per row, {rollout / GIB:.2f} GiB, before the loss's activations "
                     "exist; 'rollout' is what it needs beyond them (0 when the training side is the larger)")
    return bd


def rollout_bytes(shape: ModelShape, inp: PlanInput, act_db: int) -> int:
    """GRPO's generation (train/rollout.py): every row's KV cache at full length, the prompts' cache once more while
    it is expanded G ways, and the sampling of one token per row (its logits, float64 softmax and cumulative sum)."""
    per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim * act_db
    rows = inp.batch_size
    prompt = max(0, inp.seq_len - inp.completion_len)
    cache = rows * inp.seq_len * per_token + (rows // max(1, inp.generations)) * prompt * per_token
    return cache + rows * shape.vocab * (act_db + 16)


def logit_chunk_bytes(shape: ModelShape, response_rows: float, act_db: int) -> int:
    """The loss's largest live logits: one chunk in fp32, its half-dtype copy, tanh' when soft-capped."""
    rows = min(math.ceil(response_rows), logit_chunk_rows(shape.vocab))
    per = 4 + (act_db if act_db != 4 else 0) + (4 if shape.softcapped else 0)
    return rows * shape.vocab * per


def _single_allocation_ok(shape: ModelShape, inp: PlanInput, db: int, bd: dict[str, int], limit: int,
                          notes: list[str]) -> bool:
    """On a card whose runtime caps one allocation (Alchemist: 4 GiB), the largest single tensors must fit under
    it: the embedding (and an untied head) in the run's dtype, the loss's logit chunk, one layer's attention
    scores where they are materialised."""
    if not limit:
        return True
    per_layer_scores = bd.get("attention_scores", 0) // max(1, shape.layers if not inp.gradient_checkpointing else 1)
    largest = {"the embedding": shape.vocab * shape.hidden * db, "the loss's logit chunk": bd.get("logits", 0),
               "one layer's attention scores": per_layer_scores}
    what, size = max(largest.items(), key=lambda kv: kv[1])
    if size <= limit:
        return True
    notes.append(f"{what} is one {size / GIB:.1f} GiB allocation, over this card's {limit / GIB:.0f} GiB limit for "
                 "a single allocation: a shorter max_seq_len or micro_batch_size (scores, logits), or a model with a "
                 "smaller vocabulary x hidden size")
    return False


def estimate(shape: ModelShape, inp: PlanInput, dtype: str, attention: str, vendor: str, device_bytes: int,
             quant_ok: bool = True, host: Host | None = None, max_allocation: int = 0) -> Plan:
    """The pure estimate; raises InputError for combinations the profile cannot run."""
    inp = _checked(inp)
    notes: list[str] = []
    db = DTYPE_BYTES[dtype]
    if inp.sequences_per_row == 2:
        notes.append("dpo: chosen and rejected run in one forward, counted as 2 sequences per pair (an upper bound: "
                     "with SDPA, eager or cpu_bf16 attention the shared prompt runs once); the reference "
                     "log-probabilities are computed once per row without gradients and kept, so no reference "
                     "activations are held")
    bd = _weight_terms(shape, inp, db, quant_ok, notes)
    bd.update(_activation_terms(shape, inp, db, attention, notes))
    allocated = sum(bd.values())
    bd["runtime_overhead"] = RUNTIME_CONTEXT.get(vendor, 0) + int(ALLOCATOR_SLACK * allocated)
    host = host or Host()
    if host.unified:
        _unified_terms(bd, notes)
    peak = sum(bd.values())
    # a full fine-tune's streamed copy is counted in its host optimizer's RAM (one figure for the host)
    stream = stream_terms(shape, inp, db, replace(host, ram_bytes=None) if inp.method == "full" else host) if (
        inp.offload == "layers") else None
    if stream is not None and not stream.host_fits:
        notes.append(f"offload=layers needs {stream.host_bytes / GIB:.1f} GiB of host RAM (the base is loaded there, "
                     f"then pinned); this host has {stream.host_ram_bytes / GIB:.1f} GiB: host RAM is the limit")
    hosted = host_optimizer_terms(shape, inp, db, host, vendor) if inp.optimizer_offload == "host" else None
    if hosted is not None and not hosted.host_fits:
        notes.append(f"optimizer_offload=host needs {hosted.host_bytes / GIB:.1f} GiB of host RAM (16 bytes per "
                     f"parameter: fp32 master, gradient and AdamW's two moments); this host has "
                     f"{hosted.host_ram_bytes / GIB:.1f} GiB, enough for about {hosted.largest_params / 1e9:.1f}B "
                     "parameters: host RAM is the limit")
    lora = inp.method in ("lora", "qlora")
    trainable = shape.lora_params(inp.lora_rank, inp.lora_targets) if lora else shape.params()
    single_ok = _single_allocation_ok(shape, inp, db, bd, max_allocation, notes)
    host_ok = (stream is None or stream.host_fits) and (hosted is None or hosted.host_fits)
    return Plan(fits=peak <= device_bytes and host_ok and single_ok, peak_bytes=peak,
                device_bytes=device_bytes, breakdown=bd, inputs=inp, dtype=dtype, attention=attention,
                params=shape.params(), trainable_params=trainable, notes=notes, stream=stream,
                max_allocation=max_allocation, host_optimizer=hosted)


#: Host RAM a training process needs besides the weights (Python, torch, tokenizer, data), bytes.
HOST_RUNTIME = int(1.5 * GIB)


def _unified_terms(bd: dict[str, int], notes: list[str]) -> None:
    """A unified-memory device (GB10, Jetson, an APU) has one pool: the card's plan and the host's share it, so
    the training process's host side is a term of the same peak, and so is the load's: transformers reads the
    weights into host memory and the move to the device copies them, both in the one pool for a moment."""
    bd["host_process"] = HOST_RUNTIME
    load_extra = bd.get("base_weights", 0)
    train_side = sum(v for k, v in bd.items() if k != "host_process") - bd.get("base_weights", 0)
    if load_extra > train_side:  # the load's moment is the peak: two copies of the base at once
        bd["load_copy"] = load_extra - train_side
    notes.append("unified memory: the device's memory is this host's RAM, so the host process "
                 f"({HOST_RUNTIME / GIB:.1f} GiB) and the load's second copy of the base are counted in the same "
                 "pool; offload=layers cannot help here")


def stream_terms(shape: ModelShape, inp: PlanInput, db: int, host: Host) -> Stream:
    """Host RAM, bytes moved and the step-time estimate of a streamed micro-step (see module docstring)."""
    table = throughput_table()
    gen, width, rate = _link(host)
    layer = shape.layer_params() * db
    moved = 2 * shape.layers * layer
    tokens = inp.batch_size * inp.sequences_per_row * inp.seq_len
    # forward, recompute and the input-gradient GEMMs: 3 x 2 FLOPs per parameter per token (the frozen base
    # has no weight gradient; attention's own FLOPs and the adapters are left out: small at these lengths); a
    # full fine-tune's weight gradients add 2 more
    flops = 8 if inp.method == "full" else 6
    compute = (flops * shape.params() * tokens / (host.peak_tflops * 1e12 * table["sustained_fraction"])
               if host.peak_tflops else None)
    # GRPO's rollout decodes through the streamed layers: the prompt's pass and each new token visit every layer,
    # with nothing to overlap (a token's compute is tiny): its copies add to the step
    rollout = (1 + inp.completion_len) * shape.layers * layer if inp.generations else 0
    copy = moved / rate
    return Stream(layer_bytes=layer, host_bytes=shape.params() * db + layer + HOST_RUNTIME,
                  host_ram_bytes=host.ram_bytes, bytes_per_micro_step=moved + rollout, link_bytes_per_s=rate,
                  link=f"PCIe {gen}.0 x{width}{'' if host.pcie_generation else ' (assumed)'}",
                  copy_seconds=copy + rollout / rate, compute_seconds=compute,
                  step_seconds=None if compute is None else max(compute, copy) + rollout / rate, rollout_bytes=rollout)


def _link(host: Host) -> tuple[int, int, float]:
    """(PCIe generation, width, effective pinned bytes/s) of the card's link; the catalog's default when unread."""
    table = throughput_table()
    gen = host.pcie_generation or table["pcie_default"]["generation"]
    width = host.pcie_width or table["pcie_default"]["width"]
    lane = table["pcie"][gen]
    return gen, width, lane["gt_per_s"] * 1e9 * lane["encoding"] * width / 8 * table["pcie_efficiency"]


_THROUGHPUT: dict[str, Any] = {}


def throughput_table() -> dict[str, Any]:
    """catalog/throughput.yaml, read once (PCIe rates, peak TFLOPS by device name)."""
    if not _THROUGHPUT:
        from hwcompat.yamlfile import load_packaged_yaml

        from hwcompat.datafiles import data_dir

        _THROUGHPUT.update(load_packaged_yaml(data_dir("catalog") / "throughput.yaml", "throughput table"))
    return _THROUGHPUT


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The card's dense peak in ``dtype`` from the catalog (first name match), or None when unknown."""
    for row in throughput_table()["devices"]:
        if row["match"] in device_name:
            return row.get(dtype)
    return None


def host_for(device, cpu_ram_bytes: int | None, dtype: str) -> Host:
    """A resolved device's link and speed, and the host's RAM, as the planner's ``Host``."""
    r = device.reading
    return Host(ram_bytes=cpu_ram_bytes, pcie_generation=r.pcie_generation, pcie_width=r.pcie_width,
                peak_tflops=peak_tflops(r.name, dtype),
                unified=r.unified_memory or compat.is_tegra(r.capability))


@dataclass(frozen=True)
class MemoryChoice:
    """What ``offload: auto`` settled on: the offload, the checkpointing, that plan, and what changed and why."""

    offload: str  # none | layers
    gradient_checkpointing: bool
    plan: Plan
    changed: str = ""  # '' when the run is as configured
    optimizer_offload: str = "none"  # full fine-tuning: none | host


def decide_offload(shape: ModelShape, inp: PlanInput, setting: str, run, may_checkpoint: bool = True,
                   may_stream: bool = True, optimizer_offload: str = "none") -> MemoryChoice:
    """``offload: auto`` takes the cheapest change that fits, in ``--suggest``'s order: gradient checkpointing
    (recomputes activations on the card) before streaming (recomputes them too, and copies every layer over PCIe
    twice per micro-step; never on a unified-memory device, ``may_stream``). ``may_checkpoint`` is False when the user wrote ``gradient_checkpointing: false``: then
    neither is chosen (streaming implies checkpointing) and the run is refused with the suggestion instead.

    ``run(PlanInput) -> Plan`` estimates on the card. A full fine-tune's choice is ``optimizer_offload``'s
    (``decide_optimizer_offload``)."""
    if inp.method == "full":
        return decide_optimizer_offload(inp, optimizer_offload, run, may_checkpoint,
                                        may_stream and setting != "none")
    resident = run(replace(inp, offload="none"))
    if setting == "none" or (setting == "auto" and resident.fits):
        return MemoryChoice("none", inp.gradient_checkpointing, resident)
    if setting == "auto" and not inp.gradient_checkpointing and may_checkpoint:
        checkpointed = run(replace(inp, offload="none", gradient_checkpointing=True))
        if checkpointed.fits:
            return MemoryChoice("none", True, checkpointed, "gradient_checkpointing=true (offload: auto): the resident "
                                "run does not fit without it and does with it, which is cheaper than streaming")
    no_stream = inp.method != "lora" or not may_stream
    if no_stream or (setting == "auto" and not inp.gradient_checkpointing and not may_checkpoint):
        return MemoryChoice("none", inp.gradient_checkpointing, resident)
    streamed = run(replace(inp, offload="layers"))
    if setting == "layers" or streamed.fits:
        why = ("" if setting == "layers" else "offload=layers (offload: auto): the resident run does not fit, even "
               "with gradient checkpointing, and the streamed one does")
        if why and not inp.gradient_checkpointing:
            why += "; each layer is recomputed in backward (gradient checkpointing implied)"
        return MemoryChoice("layers", inp.gradient_checkpointing, streamed, why)
    return MemoryChoice("none", inp.gradient_checkpointing, resident)


def decide_optimizer_offload(inp: PlanInput, setting: str, run, may_checkpoint: bool = True,
                             may_stream: bool = True) -> MemoryChoice:
    """``optimizer_offload: auto`` for a full fine-tune, cheapest first: resident; resident with gradient
    checkpointing; the optimizer in host RAM (a host -> device copy of every weight per step, the AdamW step on
    the CPU); the same with checkpointing. ``none`` / ``host`` are planned as written."""
    ckpt = inp.gradient_checkpointing
    if setting == "host":  # with offload=layers written beside it: streamed as written
        return MemoryChoice(inp.offload, ckpt, run(replace(inp, optimizer_offload="host")), optimizer_offload="host")
    resident = run(replace(inp, optimizer_offload="none", offload="none"))
    if setting == "none" or (setting == "auto" and resident.fits):
        return MemoryChoice("none", ckpt, resident)
    tries = [(ckpt, "none", "none")] + ([(True, "none", "none")] if not ckpt and may_checkpoint else [])
    tries += [(ckpt, "host", "none")] + ([(True, "host", "none")] if not ckpt and may_checkpoint else [])
    tries += [(True, "host", "layers")] if may_stream and (ckpt or may_checkpoint) else []
    for gc, where, layers in tries[1:]:
        p = run(replace(inp, gradient_checkpointing=gc, optimizer_offload=where, offload=layers))
        if p.fits:
            why = [] if gc == ckpt or layers == "layers" else ["gradient_checkpointing=true"]
            if where == "host":
                why.append(f"optimizer_offload=host (the fp32 masters and AdamW state in "
                           f"{p.host_optimizer.host_bytes / GIB:.1f} GiB of host RAM)")
            if layers == "layers":
                why.append("offload=layers (the working copy streamed a layer at a time)")
            return MemoryChoice(layers, gc, p, " and ".join(why) + " (optimizer_offload: auto): the resident full "
                                "fine-tune does not fit" + ("" if where == "none" else ", the offloaded one does"),
                                optimizer_offload=where)
    hosted = run(replace(inp, gradient_checkpointing=ckpt or may_checkpoint, optimizer_offload="host"))
    if hosted.peak_bytes <= hosted.device_bytes and setting == "auto":  # the card would hold it; the host does not
        resident.notes.extend(n for n in hosted.notes if n.startswith("optimizer_offload=host"))
    return MemoryChoice("none", ckpt, resident)


#: PlanInput field -> the `hwcompat train` config key it is (suggestions speak the config's language).
CONFIG_KEYS = {"seq_len": "max_seq_len", "batch_size": "micro_batch_size", "gradient_checkpointing":
               "gradient_checkpointing", "optimizer": "optimizer", "lora_rank": "lora_r"}


def _fix(settings: dict[str, Any], p: Plan, note: str = "") -> dict[str, Any]:
    """One suggestion: ``settings`` are config keys for `hwcompat train` (key=value); ``change`` shows them."""
    text = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())
    return {"change": text + (f" ({note})" if note else ""), "settings": settings, "peak_bytes": p.peak_bytes,
            "fits": p.fits}


def _candidates(inp: PlanInput, quant_ok: bool, optim8_ok: bool, can_stream: bool = False
                ) -> list[tuple[dict[str, Any], PlanInput, str]]:
    """Single memory-saving changes, least disruptive first: (config settings, planner input, note)."""
    out = []
    if not inp.gradient_checkpointing:
        out.append(({"gradient_checkpointing": True}, replace(inp, gradient_checkpointing=True), ""))
    group = max(1, inp.generations)  # grpo: a micro-batch holds whole groups of G completions
    if inp.batch_size > group:
        out.append(({"micro_batch_size": group, "gradient_accumulation": inp.batch_size // group},
                    replace(inp, batch_size=group), "same effective batch" + (", one prompt's G completions per "
                                                                             "micro-batch" if inp.generations else "")))
    if inp.generations and inp.completion_len > 64:
        half = inp.completion_len // 2
        out.append(({"max_completion_length": half, "max_seq_len": inp.seq_len - half},
                    replace(inp, completion_len=half, seq_len=inp.seq_len - half), "shorter completions"))
    if can_stream and inp.method == "lora" and inp.offload == "none" and not inp.generations:  # slower step
        out.append(({"offload": "layers"}, replace(inp, offload="layers"),
                    "stream the frozen base from host RAM, one layer at a time"))
    if inp.method == "lora" and quant_ok:
        out.append(({"qlora": True}, replace(inp, method="qlora"), ""))
    if inp.method == "full":
        out.append(({"qlora": False}, replace(inp, method="lora"), "LoRA instead of full fine-tuning: what "
                                                                     "hwcompat train trains"))
    if inp.optimizer == "adamw" and optim8_ok:
        out.append(({"optimizer": "adamw_8bit"}, replace(inp, optimizer="adamw_8bit"), ""))
    return out


def _with_shorter_sequences(combined, seq_len: int, run) -> list[dict[str, Any]]:
    """Each change set (none included) that does not fit at ``seq_len``, with the longest max_seq_len that fits
    with it: on an 8 GB RX 6600 a 7B fits streamed at 1664 tokens, though no change fits at 2048."""
    out = []
    for settings, new in combined:
        if run(new).fits:
            continue
        seq = _round(_largest(lambda v: run(replace(new, seq_len=v)).fits, 64 + new.completion_len, seq_len))
        if seq and (seq >= MIN_SUGGESTED_SEQ or not settings):
            out.append(_fix({**settings, "max_seq_len": seq}, run(replace(new, seq_len=seq))))
    return out


def _minimal(out: list[dict[str, Any]], seq_len: int) -> list[dict[str, Any]]:
    """Drop a fitting suggestion when another fits with a subset of its changes and no shorter sequences (streaming
    already recomputes each layer, so checkpointing on top of it adds nothing); and a change that still does not fit
    once something does, unless it is a single change (the table of what each one saves)."""
    def parts(x):
        rest = {k: v for k, v in x["settings"].items() if k != "max_seq_len"}
        return set(rest.items()), x["settings"].get("max_seq_len", seq_len)

    fitting = [x for x in out if x["fits"]]
    keep = []
    for x in out:
        changes, seq = parts(x)
        if x["fits"]:
            if any(y is not x and parts(y)[0] <= changes and parts(y)[1] >= seq and
                   (parts(y)[0] < changes or parts(y)[1] > seq or id(y) < id(x)) for y in fitting):
                continue
        elif fitting and len(changes - {("gradient_accumulation", v) for _, v in changes}) > 1:
            continue
        keep.append(x)
    return keep


def _largest_settings(shape: ModelShape, inp: PlanInput, run) -> list[dict[str, Any]]:
    """A plan that fits: the longest max_seq_len, the largest micro_batch_size (whole GRPO groups) and, for GRPO,
    the longest completions that still fit."""
    seq = _round(_largest(lambda v: run(replace(inp, seq_len=v)).fits, inp.seq_len, shape.max_positions),
                 inp.seq_len)
    group = max(1, inp.generations)
    batch = _largest(lambda v: run(replace(inp, batch_size=v * group)).fits, inp.batch_size // group, 1024)
    batch = batch * group if batch else batch
    per = f", {batch // group} prompt(s) x num_generations={group}" if inp.generations and batch else ""
    largest = [_fix({"max_seq_len": seq}, run(replace(inp, seq_len=seq)),
                    f"largest at micro_batch_size={inp.batch_size}"),
               _fix({"micro_batch_size": batch}, run(replace(inp, batch_size=batch)),
                    f"largest at max_seq_len={inp.seq_len}{per}")]
    if inp.generations and seq:  # the completion budget the longest sequence leaves, prompts unchanged
        longest = inp.completion_len + seq - inp.seq_len
        largest.append(_fix({"max_completion_length": longest, "max_seq_len": seq},
                            run(replace(inp, seq_len=seq, completion_len=longest)),
                            f"largest completions at micro_batch_size={inp.batch_size}"))
    return largest


def suggest(shape: ModelShape, plan: Plan, vendor: str, quant_ok: bool, optim8_ok: bool = False,
            host: Host | None = None) -> list[dict[str, Any]]:
    """If it does not fit: the cheapest changes that make it fit. If it fits: the largest seq / batch.

    Every suggestion carries ``settings``: keys and values `hwcompat train` accepts, nothing else."""
    import itertools

    inp = plan.inputs

    def run(new: PlanInput) -> Plan:
        return estimate(shape, new, plan.dtype, plan.attention, vendor, plan.device_bytes, quant_ok, host,
                        plan.max_allocation)

    out: list[dict[str, Any]] = []
    if plan.fits:
        return _largest_settings(shape, inp, run)
    candidates = _candidates(inp, quant_ok, optim8_ok, can_stream=vendor != Vendor.cpu)
    out += [_fix(settings, run(new), note) for settings, new, note in candidates]
    combined: list[tuple[dict[str, Any], PlanInput]] = [({}, inp)] + [(s_, new) for s_, new, _ in candidates]
    for k in range(2, len(candidates) + 1):  # combinations of 2, 3 … changes
        for combo in itertools.combinations(candidates, k):
            settings, new = {}, inp
            for s_, cand, _ in combo:
                settings.update(s_)
                new = replace(new, **{f: getattr(cand, f) for f in PlanInput.__dataclass_fields__
                                      if getattr(cand, f) != getattr(inp, f)})
            try:
                out.append(_fix(settings, run(new)))
            except InputError:  # a combination that cannot run together (offload=layers with qlora)
                continue
            combined.append((settings, new))
    out = _minimal(out + _with_shorter_sequences(combined, inp.seq_len, run), inp.seq_len)
    # cheapest first: single changes before combinations, in the order tried (least disruptive first)
    order = {id(x): i for i, x in enumerate(out)}
    out.sort(key=lambda x: (not x["fits"], len(x["settings"]) - ("gradient_accumulation" in x["settings"]), order[id(x)]))
    for s_ in out:  # a streamed suggestion that fails on host RAM says so
        if "offload" in s_["settings"] and not s_["fits"]:
            streamed = run(replace(inp, offload="layers"))
            if streamed.stream and not streamed.stream.host_fits and streamed.peak_bytes <= plan.device_bytes:
                s_["change"] += (f" (fits the card, but needs {streamed.stream.host_bytes / GIB:.1f} GiB host RAM of "
                                 f"{streamed.stream.host_ram_bytes / GIB:.1f}: host RAM is the limit)")
    fixed = plan.breakdown["base_weights"] + plan.breakdown.get("quant_constants", 0) + RUNTIME_CONTEXT.get(vendor, 0)
    if not any(s["fits"] for s in out) and fixed > plan.device_bytes:
        out.append({"change": "a smaller model or a card with more memory: the base weights alone need "
                              f"{fixed / GIB:.1f} GiB here" + ("" if quant_ok else " and this card cannot run QLoRA"),
                    "settings": {}, "peak_bytes": fixed, "fits": False})
    return out


def plan_input(cfg, method: str | None = None, logit_fraction: float = 1.0) -> PlanInput:
    """The planner's input from a `hwcompat train` config (TrainConfig): one function, so the two agree."""
    full = cfg.finetune == "full"
    return PlanInput(method=method or ("full" if full else "qlora" if cfg.qlora else "lora"), seq_len=cfg.max_seq_len,
                     batch_size=cfg.micro_batch_size, lora_rank=cfg.lora_r, lora_targets=list(cfg.lora_target_modules),
                     gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer,
                     lora_dropout=cfg.lora_dropout > 0, logit_fraction=logit_fraction,
                     sequences_per_row=2 if cfg.method == "dpo" else 1,
                     generations=cfg.num_generations if cfg.method == "grpo" else 0,
                     completion_len=cfg.max_completion_length if cfg.method == "grpo" else 0,
                     offload="layers" if cfg.offload == "layers" else "none", prefetch=cfg.offload_prefetch,
                     optimizer_offload="host" if full and cfg.optimizer_offload == "host" else "none")


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
