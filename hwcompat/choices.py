"""Every user vocabulary, once: what a config key, a flag or a table may name.

The CLI's ``choices=``, the config's closed vocabularies, the profile schema, the planner and the exporter
all read these; a new value is added here and nowhere else. Data only: no logic, no imports of our own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Vocabulary(str, enum.Enum):
    """A closed vocabulary: each member equals its text (``Finetune.full == "full"``, so configs and JSON keep plain
    strings) and prints as it, as StrEnum does (3.11+; the package runs on 3.10). The CLI's ``choices=`` and the
    config's checks read ``values()``."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Vendor(Vocabulary):
    """Who made the device: the probes, the profiles' ``vendor`` and every per-vendor rule speak of these."""

    nvidia = "nvidia"
    amd = "amd"
    intel = "intel"
    cpu = "cpu"


class Dtype(str, enum.Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Attention(str, enum.Enum):
    eager = "eager"
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"
    cpu_bf16 = "cpu_bf16"  # hwcompat's CPU training attention (train/cpu_attention.py)


class CompileBackend(str, enum.Enum):
    eager = "eager"
    inductor = "inductor"


#: Bytes per element of each training dtype (the planner's and the merge's free-space arithmetic).
DTYPE_BYTES = {Dtype.float32.value: 4, Dtype.float16.value: 2, Dtype.bfloat16.value: 2}

def _vocabulary(name: str, words: str) -> Any:
    """A closed vocabulary from its words (``Finetune.full``, ``Finetune.values()``)."""
    return Vocabulary(name, [(w, w) for w in words.split()], module=__name__, qualname=name)


#: Config ``optimizer``; their state bytes: plan.optimizer_state_bytes.
Optimizer = _vocabulary("Optimizer", "adamw adamw_8bit paged_adamw_8bit")
#: Config ``method``: what the run learns (one objective each, train/objectives).
Method = _vocabulary("Method", "sft dpo grpo")
#: `hwcompat plan --method`: what trains (finetune, qlora) and the objectives that plan alike.
PlanMethod = _vocabulary("PlanMethod", "lora qlora full dpo grpo")
#: What trains: LoRA adapters, or every weight (LLaMA-Factory's finetuning_type).
Finetune = _vocabulary("Finetune", "lora full")
#: Where the base's layers live: resident, or streamed from host memory (train/stream.py).
Offload = _vocabulary("Offload", "auto none layers")
#: finetune=full: the fp32 master weights and AdamW state on the device, or in host RAM.
OptimizerOffload = _vocabulary("OptimizerOffload", "auto none host")
#: How rows become micro-batches (train/batching.py).
Batching = _vocabulary("Batching", "auto packed length_grouped padded")
#: The row formats data/rows.py reads (one RowFormat each).
DataFormat = _vocabulary("DataFormat", "auto prompt_completion messages sharegpt alpaca")
#: lr_schedule: the learning rate after warmup.
Schedule = _vocabulary("Schedule", "cosine linear constant")
#: grpo: TRL's loss_type (its default first).
LossType = _vocabulary("LossType", "dapo grpo dr_grpo")
#: grpo: TRL's scale_rewards.
ScaleRewards = _vocabulary("ScaleRewards", "group batch none")
#: grpo: TRL's importance_sampling_level (sequence = GSPO).
ISLevel = _vocabulary("ISLevel", "token sequence")
#: report_to: experiment trackers (train/trackers.py).
Tracker = _vocabulary("Tracker", "tensorboard trackio mlflow wandb")
#: export: what follows training (gguf: model.gguf + Modelfile).
Export = _vocabulary("Export", "none gguf")


#: The tuples the CLI's choices= and the config's checks read (the meaning of each: the field comments in
#: train/config.py).
OPTIMIZERS = Optimizer.values()
OBJECTIVES = Method.values()
PLAN_METHODS = PlanMethod.values()
FINETUNE = Finetune.values()
OFFLOAD = Offload.values()
OPTIMIZER_OFFLOAD = OptimizerOffload.values()
BATCHING = Batching.values()
DATA_FORMATS = DataFormat.values()
SCHEDULES = Schedule.values()
LOSS_TYPES = LossType.values()
SCALE_REWARDS = ScaleRewards.values()
IS_LEVELS = ISLevel.values()
TRACKERS = Tracker.values()
EXPORTS = Export.values()
METRICS = ("auto", "exact", "json", "label", "none")  # eval_metrics (data/metrics.py)
OVERLONG = ("truncate", "drop")
CPU_ALLOCATORS = ("auto", "tcmalloc", "system")
CHAT_TEMPLATE = ("auto", "true", "false")


@dataclass(frozen=True)
class ExportType:
    """One GGUF output type: its bits per weight (the free-space check) and who encodes it."""

    name: str
    bits: float  # per weight; q8_0: 34 bytes per block of 32; k-quant mixes rounded up (llama.cpp's block sizes)
    llama_ftype: str = ""  # llama.cpp's llama_ftype name (llama.h) when its quantizer makes it (hwcompat[gguf])


#: The GGUF types hwcompat writes; the `gguf` package encodes the first four, llama.cpp's quantizer the rest.
EXPORT_TYPE_TABLE = {t.name: t for t in (
    ExportType("f32", 32.0), ExportType("f16", 16.0), ExportType("bf16", 16.0), ExportType("q8_0", 8.5),
    ExportType("q6_k", 6.6, "LLAMA_FTYPE_MOSTLY_Q6_K"), ExportType("q5_k_m", 5.7, "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    ExportType("q4_k_m", 4.9, "LLAMA_FTYPE_MOSTLY_Q4_K_M"), ExportType("q5_0", 5.5, "LLAMA_FTYPE_MOSTLY_Q5_0"),
    ExportType("q4_0", 4.5, "LLAMA_FTYPE_MOSTLY_Q4_0"))}
EXPORT_TYPES = tuple(EXPORT_TYPE_TABLE)
#: --type -> llama_ftype name, for the types llama.cpp's quantizer makes.
LLAMA_TYPES = {t.name: t.llama_ftype for t in EXPORT_TYPE_TABLE.values() if t.llama_ftype}


@dataclass(frozen=True)
class ModelFamily:
    """What sets one supported family apart from a plain Llama block: one row read by the planner
    (plan.shape_from_config, the activation terms) and the GGUF exporter (export/archs.py), so the two never hold
    different beliefs about a family. Each fact as transformers' modeling file has it (and llama.cpp's converter)."""

    label: str  # how users call the family
    ties_head: bool = False  # the output head is the token embedding (config's default; all llama.cpp reads)
    qkv_bias: bool = False  # q/k/v projections have biases unless config.json says otherwise (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    fused: bool = False  # qkv_proj and gate_up_proj are single Linear layers; partial rotary, LongRoPE (Phi-3)
    sandwich_norms: bool = False  # norms before and after attention and the MLP (Gemma 2)
    norms_in_fp32: bool = False  # RMSNorm multiplies (1 + w) in fp32 whatever the dtype (Gemma)
    attn_softcap: float | None = None  # attn_logit_softcapping when config.json omits it (Gemma 2: 50)
    query_scalar: bool = False  # queries scaled by 1/sqrt(query_pre_attn_scalar) (Gemma 2)


#: config.json ``model_type`` values hwcompat plans, trains and exports (Llama-style decoder blocks); the planner and
#: the GGUF writer both take this table and this refusal.
MODEL_FAMILIES = {
    "llama": ModelFamily("Llama"),
    "mistral": ModelFamily("Mistral"),
    "qwen2": ModelFamily("Qwen2", qkv_bias=True),
    "qwen3": ModelFamily("Qwen3", qk_norm=True),
    "gemma": ModelFamily("Gemma", ties_head=True, norms_in_fp32=True),
    "gemma2": ModelFamily("Gemma 2", ties_head=True, norms_in_fp32=True, sandwich_norms=True, attn_softcap=50.0,
                          query_scalar=True),
    "phi3": ModelFamily("Phi-3", fused=True),
}


def families_text() -> str:
    """What a refusal lists: the model types, then their families' names."""
    return f"{', '.join(MODEL_FAMILIES)} ({', '.join(f.label for f in MODEL_FAMILIES.values())})"
