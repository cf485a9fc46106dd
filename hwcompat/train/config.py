"""Training config: one YAML file plus ``key=value`` overrides, with origins.

Every value remembers where it came from (default, profile, config file,
command line) so ``--print-config`` can explain the run before any model is
loaded. Unknown keys are errors with the nearest valid key suggested.
This module never imports torch.
"""

from __future__ import annotations

import functools
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from hwcompat.errors import InputError, excerpt
from hwcompat.textcheck import closest
from hwcompat.choices import TRACKERS, Finetune, Method, Offload, Optimizer, OptimizerOffload
from hwcompat.schema import Problem, check
from hwcompat.train.config_values import RANGES, coerce, key_table
from hwcompat.yamlfile import load_yaml


@dataclass
class TrainConfig:
    """All knobs of a run. Field comments are the user documentation (see --print-config)."""

    # --- model -------------------------------------------------------------------------------
    model: str = ""  # local model directory (a hub id only when you have network)
    tokenizer: str | None = None  # defaults to the model directory
    trust_remote_code: bool = False  # run code shipped with the model; off unless you trust it
    allow_network: bool = False  # let a hub id (model: org/name) be downloaded; off: local folders only, offline
    # --- data --------------------------------------------------------------------------------
    train_data: list[str] = field(default_factory=list)  # JSONL file(s)
    eval_data: list[str] = field(default_factory=list)  # JSONL file(s); empty: split eval_fraction off train
    eval_fraction: float = 0.1  # used only without eval_data; split with `seed`
    data_format: str = "auto"  # auto | prompt_completion | messages | sharegpt | alpaca
    # a file's column names -> the format's fields, e.g. {prompt: question, completion: answer} (CSV, Parquet, JSONL)
    columns: dict[str, str] = field(default_factory=dict)
    chat_template: str = "auto"  # auto (use the tokenizer's if it has one) | true | false
    system_prompt: str | None = None  # prepended as a system message when a row has none
    max_seq_len: int = 1024  # tokens per example, prompt + response
    overlong: str = "truncate"  # truncate | drop: what to do with longer rows (always reported)
    # what is learned: sft (response tokens of prompt/response rows) | dpo (preference pairs) | grpo (rewards)
    method: str = "sft"
    # how far from the reference (the model before training) the policy may move; dpo: 0.1 unless set, grpo: the
    # KL penalty's weight, 0.0 unless set (TRL's default: no reference pass)
    beta: float | None = None
    rpo_alpha: float = 0.0  # dpo: weight of the chosen answer's NLL added to the loss (keeps its likelihood up)
    init_adapter: str | None = None  # start from this LoRA adapter (e.g. an SFT run's adapter/); dpo's reference
    # --- grpo: reinforcement learning on your own metric (TRL's GRPOConfig names and defaults) -----------------
    # built-in task metrics scored against the row's answer (field_f1, json_valid, exact_match, label_accuracy …)
    # or your function module:function (module.py beside the config, or importable); see train/rewards.py
    rewards: list[str] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)  # one per reward; empty: all 1.0
    num_generations: int = 8  # completions sampled per prompt (G); micro_batch_size counts completions
    max_completion_length: int = 512  # new tokens per completion at most
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling of the rollouts (1.0: off)
    epsilon: float = 0.2  # the clipping range's lower side (1 - epsilon)
    epsilon_high: float | None = None  # its upper side (1 + epsilon_high); None: epsilon (DAPO's clip-higher: 0.28)
    num_iterations: int = 1  # optimizer steps per generation (TRL's mu; 1: on-policy). > 1 reuses each rollout
    scale_rewards: str = "group"  # group | batch | none: the advantages' divisor (Dr. GRPO: none)
    loss_type: str = "dapo"  # dapo | grpo | dr_grpo: how token losses are averaged
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    mask_truncated_completions: bool = False  # completions cut at max_completion_length get no loss (DAPO)
    regression_tolerance: float = 2.0  # points a task metric may drop (before -> after) before the run is flagged
    # --- what trains -------------------------------------------------------------------------
    # lora: adapters on a frozen base (output adapter/) | full: every weight (or those `trainable` names), fp32
    # master weights and AdamW (output model/: a whole model folder, no merge step)
    finetune: str = "lora"
    # finetune=full: parameter-name patterns that train (fnmatch, e.g. ["model.layers.1?.*", "*.mlp.*"]: quote a
    # pattern that starts with * in YAML); []: all
    trainable: list[str] = field(default_factory=list)
    # finetune=full: where the fp32 master weights, gradients and AdamW state live. host: in host RAM, the card
    # holds a working copy in the profile's dtype (train/host_optim.py); auto: host only when the plan says the
    # resident run does not fit on the card and the offloaded one does
    optimizer_offload: str = "auto"  # auto | none | host
    # --- LoRA / QLoRA ------------------------------------------------------------------------
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # all linear projections
    qlora: bool = False  # 4-bit NF4 base through bitsandbytes, where the profile allows it
    # --- schedule ----------------------------------------------------------------------------
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    learning_rate: float = 2e-4
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes; a quarter of AdamW's state memory)
    lr_schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 4  # examples per forward pass (grpo: completions, default num_generations)
    gradient_accumulation: int = 1
    batching: str = "auto"  # auto | packed | length_grouped | padded (see batching.py)
    gradient_checkpointing: bool = False
    # auto: stream the frozen base from host RAM only when the plan says it does not fit resident and does streamed
    offload: str = "auto"  # auto | none | layers: decoder layers' frozen weights in pinned host memory (stream.py)
    offload_prefetch: int = 1  # offload=layers: layers copied ahead of compute (device slots = this + 1)
    # --- eval / checkpoints ------------------------------------------------------------------
    eval_every: int = 0  # optimizer steps between evals; 0: only at the end
    eval_at_start: bool = True  # task metrics of the base model, for a before/after comparison
    eval_metrics: str = "auto"  # auto | exact | json | label | none
    eval_max_rows: int = 64  # rows generated for task metrics (eval loss uses all rows)
    eval_max_new_tokens: int = 0  # 0: longest reference + 16
    checkpoint_every: int = 0  # optimizer steps; 0: only on interrupt and at the end
    keep_checkpoints: int = 2
    seed: int = 42
    output_dir: str = "runs/latest"
    # --- hardware (default: the device profile; set only to override, validated) -------------
    dtype: str | None = None  # float32 | float16 | bfloat16
    attention: str | None = None  # eager | sdpa | flash_attention_2
    compile_backend: str | None = None  # eager | inductor
    num_threads: int = 0  # CPU threads; 0: all cores this process may use
    cpu_allocator: str = "auto"  # auto | tcmalloc | system: a CPU run's malloc (auto: tcmalloc where installed)
    # GPU: use at most this much of the card (torch's per-process memory fraction) and plan for that much;
    # rehearse a smaller card on a bigger one, or leave room for another job. 0: the whole card
    memory_limit_gib: float = 0.0
    # a GPU's kernels checked against float64 on the CPU before the first step (train/numerics.py; seconds)
    numerics_check: bool = True
    # --- after training -------------------------------------------------------------------------
    # experiment trackers, any of tensorboard | trackio | mlflow | wandb, each offline in the run folder unless your
    # environment points it elsewhere (hwcompat[track]); [] : none
    report_to: list[str] = field(default_factory=list)
    export: str = "none"  # none | gguf: merge the adapter into the base and write model.gguf + Modelfile
    export_type: str = "f16"  # f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m | q5_0 | q4_0 (hwcompat[gguf])
    # with a llama.cpp type: weight its rounding by an importance matrix measured on the training rows
    # (model.imatrix.gguf; `hwcompat export --imatrix`)
    export_imatrix: bool = False
    force: bool = False  # run even when a setting contradicts the hardware or the plan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ORIGIN_DEFAULT = "default"
ORIGIN_PROFILE = "profile"
ORIGIN_FILE = "config file"
ORIGIN_CLI = "command line"


@dataclass
class LoadedConfig:
    config: TrainConfig
    origins: dict[str, str]  # field -> where its value came from
    path: Path | None
    planned_peak_bytes: int | None = None  # the launcher's plan of this config on its device (pipeline/fit.py)
    planned_allocated_bytes: int | None = None  # the same without the runtime context and allocator slack


def _fields() -> dict[str, Any]:
    hints = get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


@functools.lru_cache(maxsize=1)
def keys() -> Any:
    """Every config key's Field (kind, vocabulary, interval): a schema.Shape made from TrainConfig's annotations."""
    return key_table(_fields())


def effective_beta(cfg: "TrainConfig") -> float:
    """``beta`` as the method reads it: the user's value, else DPO's 0.1 or GRPO's 0.0 (TRL's defaults)."""
    if cfg.beta is not None:
        return cfg.beta
    return 0.0 if cfg.method == Method.grpo else 0.1


def grpo_problem(cfg: "TrainConfig") -> str | None:
    """What cannot work in a GRPO config, said before anything loads (train and plan alike): a G of 1 (every
    advantage is 0), a micro-batch that does not hold whole groups, no room for the prompt."""
    g = cfg.num_generations
    if g < 2:
        return (f"num_generations={g}: GRPO compares each completion with its group's others; with one there is "
                "nothing to compare (every advantage is 0). Use 2 or more (TRL: 8)")
    if cfg.micro_batch_size % g:
        return (f"micro_batch_size={cfg.micro_batch_size} counts completions and must hold whole groups of "
                f"num_generations={g}: use a multiple of {g}, e.g. micro_batch_size={g}")
    if cfg.max_completion_length >= cfg.max_seq_len:
        return (f"max_completion_length={cfg.max_completion_length} leaves no room for the prompt in "
                f"max_seq_len={cfg.max_seq_len}; raise max_seq_len or lower max_completion_length")
    return None


def full_problem(cfg: "TrainConfig") -> str | None:
    """What cannot go with finetune (said before anything loads): LoRA-only knobs on a full run, host offload on a
    LoRA run, the combinations not built yet."""
    if cfg.finetune == Finetune.lora:
        if cfg.optimizer_offload == OptimizerOffload.host:
            return ("optimizer_offload=host keeps a full fine-tune's fp32 master weights and AdamW state in host RAM; "
                    "a LoRA run's optimizer state is a few MB: set finetune=full, or optimizer_offload=auto")
        if cfg.trainable:
            return ("trainable= selects the weights a full fine-tune trains; with finetune=lora use "
                    "lora_target_modules, or set finetune=full")
        return None
    if cfg.qlora:
        return ("finetune=full with qlora=true: a 4-bit base cannot be trained weight by weight; set qlora=false "
                "(optimizer_offload=host keeps the optimizer in host RAM instead)")
    if cfg.init_adapter:
        return ("finetune=full with init_adapter: merge the adapter first (hwcompat merge RUN --out FOLDER) and set "
                "model= to the merged folder")
    if cfg.offload == Offload.layers and cfg.optimizer_offload != OptimizerOffload.host:
        return ("offload=layers with finetune=full streams the working copy of a model whose fp32 masters and "
                "optimizer live in host RAM: set optimizer_offload=host too")
    if cfg.optimizer_offload == OptimizerOffload.host and cfg.optimizer != Optimizer.adamw:
        return (f"optimizer_offload=host steps torch's AdamW on the CPU; optimizer={cfg.optimizer} runs on the card: "
                "set optimizer=adamw, or optimizer_offload=none")
    return None


def _unknown(key: Any, where: str) -> InputError:
    names = list(_fields())
    near = closest(key, names, cutoff=0.5) if isinstance(key, str) else None
    hint = f"; did you mean {near!r}?" if near else ""
    return InputError(f"{where}: unknown key {excerpt(key)}{hint} (`hwcompat train --help` lists every key)")


def keys_help() -> str:
    """Every config key with its default, for ``hwcompat train --help`` (the field comments in this file say more)."""
    import textwrap

    defaults = dataclasses.asdict(TrainConfig())
    items = [f"{name}={value!r}".replace("'", "") for name, value in defaults.items()]
    return "config keys (KEY=VALUE or YAML), with their defaults:\n" + textwrap.fill(
        ", ".join(items), width=100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)


#: Settings that are paths: each must be text a file system and a JSON record can both hold.
PATH_KEYS = ("model", "tokenizer", "output_dir", "init_adapter", "train_data", "eval_data")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _validate(cfg: TrainConfig, where: str, origins: dict[str, str] | None = None) -> None:
    """Every numeric key finite and in its interval, paths and text sound; messages name the key, where it was
    set (the config file or the command line), the interval and the bad value."""

    from hwcompat.textcheck import text_problem

    file_where = where

    def at(key: str) -> str:
        return "command line" if origins and origins.get(key) == ORIGIN_CLI else file_where

    for key in PATH_KEYS:
        values = getattr(cfg, key)
        for value in (values if isinstance(values, list) else [values]):
            if value and text_problem(value):
                raise InputError(f"{at(key)}: {key}: the path {value.encode('utf-8', 'replace').decode()!r} holds a "
                                 "byte that is not UTF-8 (or a NUL); hwcompat records every path as text: rename "
                                 "the file or folder")
    if not cfg.output_dir.strip():
        raise InputError(f"{at('output_dir')}: output_dir is empty; give the run a folder, e.g. output_dir=runs/NAME "
                         "(an empty value would silently mean the current folder)")
    if cfg.system_prompt is not None and text_problem(cfg.system_prompt):
        raise InputError(f"{at('system_prompt')}: system_prompt: {text_problem(cfg.system_prompt)}")
    for key in RANGES:
        try:
            check(getattr(cfg, key), keys().fields[key], (key,))
        except Problem as p:
            raise InputError(f"{at(key)}: {key}: {p.why}") from None
    if cfg.num_threads > usable_cores():
        raise InputError(f"{at('num_threads')}: num_threads={cfg.num_threads}, but this process may use "
                         f"{usable_cores()} core(s); more threads than cores make every step many times slower. "
                         f"Set num_threads to at most {usable_cores()}, or 0 for all of them")
    unknown = [t for t in cfg.report_to if t not in TRACKERS]
    if unknown:
        raise InputError(f"{at('report_to')}: report_to: {', '.join(map(repr, unknown))} is not a tracker; use any of "
                         f"{', '.join(TRACKERS)}, e.g. report_to=[tensorboard]")
    where = file_where
    if not (cfg.epochs > 0 or cfg.max_steps > 0):
        raise InputError(f"{where}: set epochs > 0 or max_steps > 0")
    if cfg.method == Method.grpo and grpo_problem(cfg):
        raise InputError(f"{where}: {grpo_problem(cfg)}")
    if cfg.method == Method.dpo and effective_beta(cfg) == 0:
        raise InputError(f"{where}: beta=0 with method dpo: the loss would not depend on the model (DPO's beta "
                         "scales every log-ratio); use a beta in (0, 100], e.g. 0.1")
    if full_problem(cfg):
        raise InputError(f"{where}: {full_problem(cfg)}")
    if cfg.offload == Offload.layers and cfg.qlora:
        raise InputError(f"{where}: offload=layers streams a plain LoRA base from host memory; a 4-bit QLoRA base "
                         "is already small: set offload=none with qlora=true (or qlora=false to stream)")


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, require_data: bool = True) -> LoadedConfig:
    """Defaults <- ``base`` (e.g. the demo's) <- the YAML file <- ``key=value`` overrides.

    ``require_data=False``: `hwcompat plan` plans a model without data (the worst-case response share)."""
    kinds = _fields()
    cfg = TrainConfig()
    origins = {k: ORIGIN_DEFAULT for k in kinds}
    raw_layers: list[tuple[dict[str, Any], str, str, bool]] = []
    if base:
        raw_layers.append((base, "demo config", "demo", False))
    p = Path(path) if path else None
    if p is not None:
        data = load_yaml(p, "config") or {}
        if not isinstance(data, dict):
            raise InputError(f"config {p}: expected a mapping of key: value, got {type(data).__name__}")
        raw_layers.append((data, f"config {p}", ORIGIN_FILE, False))
    cli: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"override {item!r}: expected key=value, e.g. learning_rate=1e-4")
        cli[key.strip()] = value.strip()
    raw_layers.append((cli, "command line", ORIGIN_CLI, True))
    for data, where, origin, from_text in raw_layers:
        for key, value in data.items():
            if key not in kinds:
                raise _unknown(key, where)
            setattr(cfg, key, coerce(key, value, keys().fields[key], where, from_text))
            origins[key] = origin
    # Paths in a config file are relative to that file, so a config travels with its data.
    if p is not None:
        if origins["output_dir"] == ORIGIN_FILE and cfg.output_dir.strip():
            from hwcompat import container

            cfg.output_dir = container.output_dir(cfg.output_dir, p.parent, container.output_root())
        for key in ("model", "tokenizer", "init_adapter"):
            val = getattr(cfg, key)
            # model / tokenizer may be hub ids, so only an existing relative path is the config's (output_dir is
            # always a path: above, by the container contract)
            local = (p.parent / val).exists() if val else False
            if origins[key] == ORIGIN_FILE and val and not Path(val).is_absolute() and local:
                setattr(cfg, key, os.path.abspath(p.parent / val))
        if origins["rewards"] == ORIGIN_FILE:  # a reward module beside the config travels with it
            from hwcompat.train.rewards import local_spec

            cfg.rewards = [local_spec(v, p.parent) for v in cfg.rewards]
        for key in ("train_data", "eval_data"):
            if origins[key] == ORIGIN_FILE:
                setattr(cfg, key, [os.path.abspath(p.parent / v) if not Path(v).is_absolute() else v
                                   for v in getattr(cfg, key)])
    if cfg.method == Method.grpo and origins["micro_batch_size"] == ORIGIN_DEFAULT:
        cfg.micro_batch_size = cfg.num_generations  # a micro-batch counts completions: one prompt's group
        origins["micro_batch_size"] = "default (grpo: num_generations)"
    _validate(cfg, f"config {p}" if p else "config", origins)
    if not cfg.model:
        raise InputError("config: model: missing; set model: /path/to/model in the YAML or model=PATH")
    if not cfg.train_data and require_data:
        raise InputError("config: train_data: missing; set train_data: [train.jsonl] in the YAML or train_data=PATH")
    return LoadedConfig(cfg, origins, p)


def apply_overrides(cfg: TrainConfig, overrides: list[str], where: str = "command line") -> TrainConfig:
    """``key=value`` items onto a config, typed and range-checked as in ``load_config``."""
    kinds = _fields()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"{where}: {item!r}: expected key=value, e.g. max_seq_len=2048")
        if key not in kinds:
            raise _unknown(key, where)
        setattr(cfg, key, coerce(key, value.strip(), keys().fields[key], where, from_text=True))
    _validate(cfg, where)
    return cfg


def config_from_dict(data: Any, where: str) -> TrainConfig:
    """A TrainConfig from a mapping written earlier (run.json): every key known, typed and in range again,
    so a renamed or hand-edited field is a clear error in the process that reads it, not a TypeError."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    kinds = _fields()
    cfg = TrainConfig()
    for key, value in data.items():
        if key not in kinds:
            raise _unknown(key, where)
        setattr(cfg, key, coerce(key, value, keys().fields[key], where, from_text=False))
    _validate(cfg, where)
    return cfg


def save_yaml(data: dict[str, Any], path: Path) -> None:
    from hwcompat.fsutil import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
