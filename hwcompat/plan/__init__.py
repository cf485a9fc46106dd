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

from hwcompat.plan.shape import (  # noqa: F401 (the planner's API)
    GIB, LOGIT_CHUNK_BYTES, ModelShape, SIZE_FIELDS, SUPPORTED, find_config,
    load_shape, logit_chunk_rows, shape_from_config,
)
from hwcompat.plan.inputs import (  # noqa: F401 (the planner's API)
    Host, PlanInput,
)
from hwcompat.plan.host import (  # noqa: F401 (the planner's API)
    HOST_GRAD_IN_FLIGHT, HOST_RUNTIME, HostOptimizer, Stream, host_for, host_optimizer_terms,
    peak_tflops, throughput_table,
)
from hwcompat.plan.estimate import (  # noqa: F401 (the planner's API)
    ADAPTERS, BNB_BLOCK, BNB_MIN_8BIT_SIZE, BNB_QMAPS_BYTES, MASTERS, WORKING_COPY,
    ALLOCATOR_SLACK, CPU_BF16, NF4_BYTES_PER_PARAM, Plan, QUANT_CONST_BYTES, RUNTIME_CONTEXT, Suggestion,
    SDPA_MATH, SQUARE, SQUARE_NOTES, estimate, layer_activation_bytes, logit_chunk_bytes,
    max_allocation, optimizer_state_bytes, planned_attention, rollout_bytes, score_bytes, score_transient_bytes,
    stream_terms,
)
from hwcompat.plan.suggest import (  # noqa: F401 (the planner's API)
    CONFIG_KEYS, MIN_SUGGESTED_SEQ, MemoryChoice, decide_offload, decide_optimizer_offload, plan_input,
    suggest,
)
