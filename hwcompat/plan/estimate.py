"""The pure estimate: a run's memory as a sum of named terms (see the package docstring); no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from hwcompat.choices import DTYPE_BYTES, MODEL_FAMILIES, OPTIMIZERS, Offload, OptimizerOffload, PlanMethod
from hwcompat.errors import InputError
from hwcompat.plan.shape import GIB, ModelShape, logit_chunk_rows
from hwcompat.plan.inputs import Host, PlanInput
from hwcompat.plan.host import (HOST_GRAD_IN_FLIGHT, HOST_RUNTIME, HostOptimizer, Stream, host_optimizer_terms,
                                pcie_link)


#: Runtime context + workspaces, bytes (torch CUDA context with cuBLAS/cuDNN handles; ROCm's is larger).
RUNTIME_CONTEXT = {"nvidia": int(0.5 * GIB), "amd": int(0.75 * GIB), "cpu": int(0.3 * GIB),
                   "intel": int(0.75 * GIB)}  # Intel: not yet measured on an Arc card; ROCm's, the larger figure


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


@dataclass
class Suggestion:
    """One change `hwcompat plan --suggest` offers (and a refusal quotes): ``settings`` are config keys and values
    `hwcompat train` accepts, nothing else; ``change`` shows them (and what limits it), ``peak_bytes`` and ``fits``
    are its own plan's."""

    change: str
    settings: dict[str, Any]
    peak_bytes: int
    fits: bool


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
    suggestions: list[Suggestion] = field(default_factory=list)
    stream: Stream | None = None
    max_allocation: int = 0  # the card's single-allocation limit the plan was checked against (0: none)
    host_optimizer: HostOptimizer | None = None

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"fits": self.fits, "peak_bytes": self.peak_bytes, "device_bytes": self.device_bytes,
                "headroom_bytes": self.headroom_bytes, "breakdown": self.breakdown,
                "suggestions": [s.__dict__ for s in self.suggestions],
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
    if inp.method not in (PlanMethod.lora, PlanMethod.qlora, PlanMethod.full):
        raise InputError(f"--method {inp.method}: use lora, qlora or full")
    streamed = inp.offload == Offload.layers
    if streamed and inp.method == PlanMethod.full and inp.optimizer_offload != OptimizerOffload.host:
        raise InputError("offload=layers with a full fine-tune streams the working copy of a model whose optimizer "
                         "lives in host RAM: set optimizer_offload=host too")
    if streamed and inp.method not in (PlanMethod.lora, PlanMethod.full):
        raise InputError(f"offload=layers streams a frozen LoRA base; it does not apply to {inp.method}")
    if inp.optimizer_offload == OptimizerOffload.host and inp.method != PlanMethod.full:
        raise InputError(f"optimizer_offload=host applies to a full fine-tune, not to {inp.method}")
    if inp.optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer={inp.optimizer}: use one of {', '.join(OPTIMIZERS)}")
    return replace(inp, gradient_checkpointing=True) if streamed else inp


def _weight_terms(shape: ModelShape, inp: PlanInput, db: int, quant_ok: bool, notes: list[str]) -> dict[str, int]:
    """Base weights (NF4, streamed slots or resident), the adapter, its gradients and the optimizer's states."""
    bd: dict[str, int] = {}
    if inp.method == PlanMethod.qlora:
        if not quant_ok:
            notes.append("this card's profile has no NF4 support: QLoRA will fail here")
        compute = 2 if db == 4 else db  # bnb computes in fp16/bf16
        bd["base_weights"] = int(shape.linear_params() * NF4_BYTES_PER_PARAM + shape.other_params() * compute)
        bd["quant_constants"] = int(shape.linear_params() * QUANT_CONST_BYTES[True])
    elif inp.offload == Offload.layers:
        bd["base_weights"] = shape.resident_params() * db
        bd["streamed_slots"] = (inp.prefetch + 1) * shape.layer_params() * db
    elif inp.method == PlanMethod.full:
        return _full_terms(shape, inp, db)
    else:
        bd["base_weights"] = shape.params() * db
    trainable = shape.lora_params(inp.lora_rank, inp.lora_targets)
    bd["adapter_weights"] = trainable * 4
    bd["gradients"] = trainable * 4  # fp32 adapter gradients
    bd["optimizer_states"] = optimizer_state_bytes(inp.optimizer, shape.lora_tensor_sizes(inp.lora_rank,
                                                                                          inp.lora_targets))
    return bd


def _full_terms(shape: ModelShape, inp: PlanInput, db: int) -> dict[str, int]:
    """A full fine-tune's card side. Resident (torch AMP): fp32 weights, fp32 gradients, the optimizer's states,
    and in a half dtype the copy of every weight autocast casts and backward keeps. Offloaded: the working copy in
    the profile's dtype, and the gradients on their way to the host (at most the in-flight bound plus the largest
    tensor); the optimizer's side is the host's (``host_optimizer_terms``)."""
    n = shape.params()
    if inp.optimizer_offload == OptimizerOffload.host:
        largest = max(shape.tensor_sizes())
        grads = min(n * db, HOST_GRAD_IN_FLIGHT + largest * db)
        if inp.offload == Offload.layers:  # the layers' working copy visits the card in prefetch + 1 slots
            return {"base_weights": shape.resident_params() * db,
                    "streamed_slots": (inp.prefetch + 1) * shape.layer_params() * db, "gradients": grads,
                    "optimizer_states": 0}
        return {"base_weights": n * db, "gradients": grads, "optimizer_states": 0}
    return {"base_weights": n * 4, "autocast_copies": n * db if db != 4 else 0, "gradients": n * 4,
            "optimizer_states": optimizer_state_bytes(inp.optimizer, shape.tensor_sizes())}


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
    lora = inp.method in (PlanMethod.lora, PlanMethod.qlora)
    act_db = db if inp.method != PlanMethod.qlora else (2 if db == 4 else db)
    trained = ADAPTERS if lora else (WORKING_COPY if inp.optimizer_offload == OptimizerOffload.host else MASTERS)
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
    stream = stream_terms(shape, inp, db, replace(host, ram_bytes=None) if inp.method == PlanMethod.full else host) if (
        inp.offload == Offload.layers) else None
    if stream is not None and not stream.host_fits:
        notes.append(f"offload=layers needs {stream.host_bytes / GIB:.1f} GiB of host RAM (the base is loaded there, "
                     f"then pinned); this host has {stream.host_ram_bytes / GIB:.1f} GiB: host RAM is the limit")
    on_host = inp.optimizer_offload == OptimizerOffload.host
    hosted = host_optimizer_terms(shape, inp, db, host, vendor) if on_host else None
    if hosted is not None and not hosted.host_fits:
        notes.append(f"optimizer_offload=host needs {hosted.host_bytes / GIB:.1f} GiB of host RAM (16 bytes per "
                     f"parameter: fp32 master, gradient and AdamW's two moments); this host has "
                     f"{hosted.host_ram_bytes / GIB:.1f} GiB, enough for about {hosted.largest_params / 1e9:.1f}B "
                     "parameters: host RAM is the limit")
    lora = inp.method in (PlanMethod.lora, PlanMethod.qlora)
    trainable = shape.lora_params(inp.lora_rank, inp.lora_targets) if lora else shape.params()
    single_ok = _single_allocation_ok(shape, inp, db, bd, max_allocation, notes)
    host_ok = (stream is None or stream.host_fits) and (hosted is None or hosted.host_fits)
    return Plan(fits=peak <= device_bytes and host_ok and single_ok, peak_bytes=peak,
                device_bytes=device_bytes, breakdown=bd, inputs=inp, dtype=dtype, attention=attention,
                params=shape.params(), trainable_params=trainable, notes=notes, stream=stream,
                max_allocation=max_allocation, host_optimizer=hosted)


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
    table = host.throughput
    gen, width, rate = pcie_link(host)
    layer = shape.layer_params() * db
    moved = 2 * shape.layers * layer
    tokens = inp.batch_size * inp.sequences_per_row * inp.seq_len
    # forward, recompute and the input-gradient GEMMs: 3 x 2 FLOPs per parameter per token (the frozen base
    # has no weight gradient; attention's own FLOPs and the adapters are left out: small at these lengths); a
    # full fine-tune's weight gradients add 2 more
    flops = 8 if inp.method == PlanMethod.full else 6
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
