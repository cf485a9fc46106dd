"""How one config value is read: its type (a file's YAML value or a command line's text), its closed
vocabulary, its interval. train/config.py holds the keys and checks the config as a whole; `hwcompat data check`
reads the same intervals and column mappings.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any, get_args, get_origin

import yaml

from hwcompat.schema import Field, Problem, Shape, check
from hwcompat.choices import (BATCHING, CHAT_TEMPLATE, CPU_ALLOCATORS, DATA_FORMATS, EXPORT_TYPES, EXPORTS, FINETUNE,
                              IS_LEVELS, LOSS_TYPES, METRICS, OBJECTIVES, OFFLOAD, OPTIMIZER_OFFLOAD, OPTIMIZERS,
                              OVERLONG, SCALE_REWARDS, SCHEDULES, Attention, CompileBackend, Dtype)
from hwcompat.errors import InputError, excerpt


CHOICES = {"data_format": DATA_FORMATS, "lr_schedule": SCHEDULES, "eval_metrics": METRICS, "overlong": OVERLONG,
           "batching": BATCHING, "offload": OFFLOAD, "cpu_allocator": CPU_ALLOCATORS, "chat_template": CHAT_TEMPLATE,
           "dtype": tuple(d.value for d in Dtype), "attention": tuple(a.value for a in Attention),
           "compile_backend": tuple(c.value for c in CompileBackend), "export": EXPORTS,
           "export_type": EXPORT_TYPES, "method": OBJECTIVES, "scale_rewards": SCALE_REWARDS, "loss_type": LOSS_TYPES,
           "importance_sampling_level": IS_LEVELS, "finetune": FINETUNE,
           "optimizer_offload": OPTIMIZER_OFFLOAD,
           "optimizer": OPTIMIZERS}  # the hardware and export vocabularies are defined once, imported here


def _text_list(key: str, text: str, where: str) -> list[str]:
    """A list typed on the command line: ``a,b`` or a YAML flow list ``[a.jsonl, "b c.jsonl"]`` (as Hydra and
    torchtune users type them); either way a list of strings, never a nested value."""
    text = text.strip()
    a, b = LIST_EXAMPLES.get(key, ("a.jsonl", "b.jsonl"))
    if not text.startswith("["):
        return [v.strip() for v in text.split(",") if v.strip()]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:  # a ReaderError (a control character, a byte not UTF-8) has no .problem
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{where}: {key}: {excerpt(text)} is not a YAML flow list ({why}); write "
                         f"{key}=[{a},{b}] or {key}={a},{b} (quote the whole argument in the shell)") from None
    except RecursionError:
        value = None  # nested past what the parser walks: not a flat list either way
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise InputError(f"{where}: {key}: expected a list of strings, e.g. {key}=[{a},{b}], got "
                         f"{excerpt(text)}")
    return [str(v) for v in value]


#: Two values of each list key, for the examples its errors give.
LIST_EXAMPLES = {"report_to": ("tensorboard", "mlflow"), "lora_target_modules": ("q_proj", "v_proj"),
                 "trainable": ("model.layers.1?.*", "lm_head.weight")}


#: The fields a ``columns`` mapping may fill: every row format's keys (SFT and preference pairs).
ROW_FIELDS = ("prompt", "completion", "messages", "conversations", "instruction", "input", "output", "chosen",
              "rejected")


def columns_mapping(key: str, value: Any, where: str, from_text: bool) -> dict[str, str]:
    """``columns``: YAML ``{prompt: question}`` in a file, or the same flow mapping on the command line."""
    if from_text:
        try:
            value = yaml.safe_load(str(value)) if str(value).strip() else {}
        except yaml.YAMLError:
            value = str(value)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in
                                              value.items()):
        raise InputError(f"{where}: {key}: expected a mapping of field: column, e.g. {key}={{prompt: question, "
                         f"completion: answer}}, got {excerpt(value)}")
    unknown = [k for k in value if k not in ROW_FIELDS]
    if unknown:
        raise InputError(f"{where}: {key}: {', '.join(map(repr, unknown))} is not a row field; the fields are "
                         f"{', '.join(ROW_FIELDS)} (the mapping reads field: the file's column)")
    return dict(value)


def key_table(kinds: dict[str, Any]) -> Shape:
    """The config's keys as one ``schema.Shape``: each key's kind from TrainConfig's annotation, its closed
    vocabulary (CHOICES) and its interval (RANGES) — the table the profiles and emulate files have too."""
    return Shape({key: _field(key, kind) for key, kind in kinds.items()})


def _field(key: str, kind: Any) -> Field:
    args = get_args(kind)
    null = type(None) in args
    if null:
        kind = next(a for a in args if a is not type(None))
    origin, args = get_origin(kind), get_args(kind)
    rule = _within(RANGES[key], RANGE_HINT.get(key, "")) if key in RANGES else None
    if origin is dict:
        return Field("mapping", null=null)
    if origin is list:
        return Field(each=Field("number", rule=_finite)) if args == (float,) else Field("strings", null=null)
    name = {int: "integer", float: "number", bool: "bool", str: "string"}[kind]
    return Field(name, choices=CHOICES.get(key), rule=rule, null=null)


def _finite(value: float) -> str | None:
    import math

    return None if math.isfinite(value) else f"must be a finite number, got {value}"


def _within(interval: str, hint: str):
    """The rule of a key with an interval: finite (a float) and inside it."""
    def rule(value: Any) -> str | None:
        if isinstance(value, float) and _finite(value):
            return _finite(value)
        return None if inside(value, interval) else f"must be in {interval}, got {excerpt(value)}{hint}"
    return rule


def coerce(key: str, value: Any, spec: Field, where: str, from_text: bool) -> Any:
    """Read one value (``from_text``: typed on the command line, so converted first) and check its kind and
    vocabulary against the key's Field. Its interval is checked once the layers are merged (config._validate), so a
    file's value that an override replaces is not refused."""
    if spec.null and (value is None or (from_text and str(value).lower() in ("none", "null", ""))):
        return None
    if spec.kind == "mapping":
        return columns_mapping(key, value, where, from_text)
    value = _read(key, value, spec, where, from_text)
    try:
        check(value, replace(spec, rule=None), (key,))
    except Problem as p:
        raise InputError(f"{where}: {p.dotted()}: {p.why}") from None
    return float(value) if spec.kind == "number" else value


def _read(key: str, value: Any, spec: Field, where: str, from_text: bool) -> Any:
    """The value converted to the key's kind where the writer's form allows (command-line text; YAML's 1e-4, which
    it reads as a string; a whole float for an integer; one item for a list); else as written, for check to name."""
    kind = "numbers" if spec.each is not None else spec.kind
    if kind in ("strings", "numbers"):
        if from_text:
            value = _text_list(key, str(value), where)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        return _numbers(key, value, where) if kind == "numbers" else value
    if kind == "bool" and from_text:
        return {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                "off": False}.get(str(value).lower(), value)
    if kind == "integer" and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
            return int(value)
        text = value.strip() if isinstance(value, str) else ""
        return int(text) if from_text and len(text) <= 40 and text.lstrip("-").isdigit() else value
    if kind == "number" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if kind == "string" and isinstance(value, (bool, int, float)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _numbers(key: str, value: Any, where: str) -> list[float]:
    """A list of numbers (``reward_weights: [1.0, 0.5]``, or ``reward_weights=1,0.5``); finite is its Field's rule."""
    try:
        if not isinstance(value, list) or any(isinstance(v, bool) for v in value):
            raise ValueError
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key}: expected a list of numbers, e.g. {key}=[1.0,0.5], got "
                         f"{excerpt(value)}") from None


#: Numeric keys and their allowed interval, in interval notation. Every float must also be finite.
RANGES: dict[str, str] = {
    "lora_r": "(0, 4096]", "lora_alpha": "(0, 1e6]", "lora_dropout": "[0, 1)", "micro_batch_size": "(0, 65536]",
    "gradient_accumulation": "(0, 1e6]", "max_seq_len": "[8, 1048576]", "learning_rate": "(0, 1]",
    "epochs": "[0, 10000]", "max_steps": "[0, 1e8]", "eval_fraction": "(0, 1)", "warmup_ratio": "[0, 1)",
    "weight_decay": "[0, 10]", "max_grad_norm": "(0, 1e6]", "keep_checkpoints": "[1, 10000]",
    "eval_every": "[0, 1e8]", "checkpoint_every": "[0, 1e8]", "eval_max_rows": "[1, 1e7]",
    "eval_max_new_tokens": "[0, 1048576]", "beta": "[0, 100]", "num_generations": "[1, 4096]",
    "max_completion_length": "[1, 1048576]", "temperature": "(0, 100]", "top_p": "(0, 1]", "epsilon": "[0, 1]",
    "epsilon_high": "[0, 100]", "num_iterations": "[1, 1024]", "rpo_alpha": "[0, 100]",
    "regression_tolerance": "[0, 100]", "offload_prefetch": "[1, 16]", "num_threads": "[0, 4096]",
    "memory_limit_gib": "[0, 1e6]", "seed": "[0, 4294967295]",
}


RANGE_HINT = {"max_grad_norm": " (the clipping threshold: 0 would zero every update, a negative one would run "
                                "gradient ascent)",
               "learning_rate": " (LoRA learning rates are usually 1e-5 to 1e-3)"}


def inside(value: float, interval: str) -> bool:
    """``value`` in ``interval`` ("(0, 1]"): each interval's bounds are read once."""
    low, high = _bounds(interval)
    return (low <= value if interval[0] == "[" else low < value) and (value <= high if interval[-1] == "]"
                                                                      else value < high)



@lru_cache(maxsize=None)
def _bounds(interval: str) -> tuple[float, float]:
    low, high = (float(x) for x in interval[1:-1].split(","))
    return low, high
