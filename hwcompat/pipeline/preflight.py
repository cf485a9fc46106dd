"""Preflight: the data, the plan, the model, the adapter to start from and the export, each checked before the
run folder is touched and before any load, so a mistake is said in seconds, not after the model loads.

Runs in the CLI process and never imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hwcompat.errors import InputError
from hwcompat.pipeline.fit import apply_plan
from hwcompat.resolve import HostPlan, ResolvedDevice, ResolvedProfile
from hwcompat.train.config import LoadedConfig
from hwcompat.choices import Export, Method


def preflight(loaded: LoadedConfig, device: ResolvedDevice, profile: ResolvedProfile, plan: HostPlan) -> None:
    """The data, the plan, the model, the adapter to start from and the export: each checked before any load."""
    cfg = loaded.config
    report, logit_fraction = check_data(loaded)
    _say(report)
    _say(apply_plan(loaded, device, profile, plan, logit_fraction, strict=True))  # config.json only
    check_model(cfg.model, cfg.allow_network)
    check_init_adapter(cfg)
    check_export(cfg)
    if cfg.tokenizer:
        check_model(cfg.tokenizer, cfg.allow_network, what="tokenizer")


def check_optimizer(name: str, profile: ResolvedProfile, have_bitsandbytes: bool) -> None:
    """An 8-bit optimizer needs the card's bitsandbytes kernels and the package itself; said before any load."""
    from hwcompat.train.optim import EIGHT_BIT, check_supported

    check_supported(name, profile)
    if name in EIGHT_BIT and not have_bitsandbytes:
        raise InputError(f"optimizer={name} needs bitsandbytes, which is not installed here: pip install bitsandbytes")


def check_data(loaded: LoadedConfig) -> tuple[str, float]:
    """The objective's text-level data checks (no tokenizer, no torch): report text, worst logit share."""
    from hwcompat.train.objectives import objective_class

    return objective_class(loaded.config.method).check(loaded.config)


def is_hub_id(model: str) -> bool:
    """"org/name" that is not a path on this machine."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)) and not Path(model).exists()


def check_model(model: str, allow_network: bool, what: str = "model") -> None:
    """A local folder with config.json and safetensors weights, or a hub id the user allowed; before any load."""
    path = Path(model)
    if not path.exists():
        if is_hub_id(model) and allow_network:
            return
        hint = (" It looks like a Hugging Face Hub id: hwcompat downloads only with allow_network: true "
                "(or download it once and point model= at the folder)") if is_hub_id(model) else ""
        raise InputError(f"{what} {model}: cannot load it: no such folder.{hint}")
    if not path.is_dir():
        raise InputError(f"{what} {model}: not a folder; point {what}= at a model folder (config.json + weights)")
    if what == "model" and not (path / "config.json").exists():
        raise InputError(f"model {model}: no config.json here; point model= at the folder that holds it")
    if what == "model" and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise InputError(
                f"model {model}: only {', '.join(pickles[:3])} (pickle) weights, and hwcompat loads safetensors only "
                "(unpickling can run code). Convert once, if you trust the file: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{model}').save_pretrained('{model}-safetensors')\"")
        raise InputError(f"model {model}: no *.safetensors weights in this folder")
    if what == "model":
        from hwcompat.weights import read_header

        for f in sorted(path.glob("*.safetensors")):
            read_header(f)  # a truncated download is an error naming the file, not a crash in the loader


def check_export(cfg) -> None:
    """A k-quant export needs llama.cpp's quantizer: found missing now, not after the training it follows."""
    import importlib.util

    from hwcompat.choices import LLAMA_TYPES
    from hwcompat.export.quantize import missing

    if cfg.export == Export.gguf and cfg.export_type in LLAMA_TYPES and importlib.util.find_spec("llama_cpp") is None:
        raise missing(cfg.export_type)
    if cfg.export_imatrix and cfg.export == Export.gguf and cfg.export_type not in LLAMA_TYPES:
        raise InputError(f"export_imatrix: true weights llama.cpp's quantizer (export_type {', '.join(LLAMA_TYPES)}); "
                         f"export_type {cfg.export_type} rounds every weight alike: set export_type or drop it")
    if cfg.export_imatrix and cfg.method != Method.sft:
        raise InputError(f"export_imatrix: true measures on SFT training rows; this run is {cfg.method}: export "
                         "afterwards with `hwcompat export MERGED --imatrix --imatrix-data ROWS.jsonl`")


def check_init_adapter(cfg) -> None:
    """init_adapter: a PEFT LoRA folder (safetensors) whose shape is the config's, checked before any load."""
    if not cfg.init_adapter:
        return
    folder = Path(cfg.init_adapter)
    meta = folder / "adapter_config.json"
    if not meta.exists() or not (folder / "adapter_model.safetensors").exists():
        raise InputError(f"init_adapter {folder}: expected a PEFT adapter folder (adapter_config.json and "
                         "adapter_model.safetensors), e.g. an earlier run's adapter/")
    try:
        saved = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"init_adapter {meta}: cannot read it ({str(exc)[:100]})") from None
    if not isinstance(saved, dict):
        raise InputError(f"init_adapter {meta}: expected a JSON object (PEFT's adapter config), got "
                         f"{type(saved).__name__}; use an adapter folder that PEFT wrote")
    for key in ("r", "lora_alpha"):
        value = saved.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"init_adapter {meta}: {key}: expected a number, got {json.dumps(value)[:40]}; the file "
                             "was edited by hand or not written by PEFT")
    targets = saved.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets
    ours = "all-linear" if cfg.lora_target_modules == ["all-linear"] else sorted(cfg.lora_target_modules)
    differ = {k: v for k, v, mine in (("lora_r", saved.get("r"), cfg.lora_r), ("lora_alpha", saved.get("lora_alpha"),
                                                                              cfg.lora_alpha))
              if v != mine}
    if differ:
        raise InputError(f"init_adapter {folder} was trained with {', '.join(f'{k}={v}' for k, v in differ.items())}; "
                         "set the same in this config (the adapter keeps its shape)")
    if ours != "all-linear" and targets != ours:
        raise InputError(f"init_adapter {folder} targets {targets}; set lora_target_modules to the same")
    from hwcompat.weights import read_header

    read_header(folder / "adapter_model.safetensors")  # truncated: an error naming the file, not a crash
    _same_base_as(folder, cfg.model)


def _same_base_as(adapter: Path, model: str) -> None:
    """An adapter continues only on the model it was trained on (its run's recorded digest, else PEFT's name)."""
    from hwcompat.fingerprint import weights_digest

    try:
        recorded = (json.loads((adapter.parent / "run.json").read_text(encoding="utf-8")).get("inputs") or {}).get("base")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded:
        if weights_digest(model) != recorded:
            raise InputError(f"init_adapter {adapter} was trained on another base model than model={model} (its "
                             "run's run.json records the base's config + weights digest, and this model differs); "
                             "train from the adapter's own base model")
        return
    try:
        named = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named and Path(named).name != Path(model).name and \
            os.path.abspath(named) != os.path.abspath(model):
        raise InputError(f"init_adapter {adapter} was trained on {named!r}, not model={model}; train from that base "
                         "model (if it is the same model under another name, copy the adapter and fix "
                         "base_model_name_or_path in its adapter_config.json)")



def _say(msg: str) -> None:
    print(msg, file=sys.stderr)
