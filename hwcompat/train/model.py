"""The model a recipe trains: base weights in the profile's dtype and attention kernel, LoRA on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwcompat.errors import InputError
from hwcompat.resolve import ResolvedProfile
from hwcompat.train import cpu_attention
from hwcompat.train.config import TrainConfig
from hwcompat.choices import Finetune, Offload, OptimizerOffload


def load_model(cfg: TrainConfig, profile: ResolvedProfile, device):
    """Base model in the profile's dtype and attention kernel, LoRA on top (adapters in fp32); or, with
    ``finetune: full``, the model itself to train (``full_model``)."""
    if cfg.finetune == Finetune.full:
        return full_model(cfg, profile, device)
    import warnings

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    # peft calls a transformers property deprecated in v5; the warning is theirs, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    dtype = getattr(torch, profile.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cpu_attention.implementation(profile.attention),
                              "trust_remote_code": cfg.trust_remote_code,
                              "use_safetensors": True}  # never unpickle weights (the launcher refused .bin-only)
    if cfg.qlora:
        kwargs.update(_nf4(profile, dtype, device))
    if Path(cfg.model).exists():
        from hwcompat.hfload import check_folder

        check_folder(cfg.model, "model", cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except OSError as exc:
        raise InputError(f"model {cfg.model}: cannot load it ({str(exc).splitlines()[0]}); "
                         "point model= at a local folder with config.json and weights") from None
    streamed = streaming(cfg)
    if not cfg.qlora and not streamed:
        model.to(device)
    model.config.use_cache = False
    if cfg.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing and not streamed:  # streaming checkpoints each layer itself (stream.py)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = _with_lora(model, cfg)
    if streamed:  # the base stayed on the host: its decoder layers visit the card one at a time
        from hwcompat.train import stream

        stream.install(model, device, cfg.offload_prefetch)
    return model


def full_model(cfg: TrainConfig, profile: ResolvedProfile, device):
    """A full fine-tune's model: loaded in fp32, the master weights. Resident, they train on the card under the
    profile's autocast (torch AMP: fp32 weights, gradients and AdamW state, fp16/bf16 compute); with
    ``optimizer_offload: host`` they stay in host RAM and the card gets a working copy in the profile's dtype
    (train/host_optim.py). Weights not named by ``trainable`` are frozen (kept in the profile's dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    if Path(cfg.model).exists():
        from hwcompat.hfload import check_folder

        check_folder(cfg.model, "model", cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32,
                                                     attn_implementation=cpu_attention.implementation(
                                                         profile.attention),
                                                     trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    except OSError as exc:
        raise InputError(f"model {cfg.model}: cannot load it ({str(exc).splitlines()[0]}); "
                         "point model= at a local folder with config.json and weights") from None
    model.hwcompat_source_dtype = source_dtype(cfg.model)
    model.config.use_cache = False
    frozen_dtype = getattr(torch, profile.dtype)
    for p in _select(model, cfg.trainable):
        p.requires_grad_(False)
        p.data = p.data.to(frozen_dtype)
    streamed = streaming(cfg)
    if cfg.gradient_checkpointing and not streamed:  # streaming recomputes each layer itself (stream.py)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.optimizer_offload == OptimizerOffload.host:
        from hwcompat.train import host_optim

        host_optim.install(model, device, frozen_dtype, streamed, cfg.offload_prefetch)
    if not streamed:  # streamed, stream.install moved what does not stream
        model.to(device)  # the rest (frozen weights, buffers); the working copy is there already
    return model


def _select(model, patterns: list[str]) -> list:
    """The parameters ``trainable`` does not name (all train when it is empty); a pattern naming nothing is an
    error, since a typo would otherwise train nothing or everything silently."""
    import fnmatch

    if not patterns:
        return []
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise InputError(f"trainable: {pat!r} names no parameter of {type(model).__name__} (e.g. {names[0]}, "
                             f"{names[len(names) // 2]}); patterns are fnmatch-style over parameter names")
    return [p for n, p in model.named_parameters() if not any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


def source_dtype(model: str) -> str:
    """The dtype the model's own folder stores (config.json ``dtype`` / ``torch_dtype``): a full fine-tune is saved
    in it, as the model it started from."""
    import json

    try:
        conf = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    dtype = conf.get("dtype") or conf.get("torch_dtype") if isinstance(conf, dict) else None
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def streaming(cfg: TrainConfig) -> bool:
    """The launcher resolved ``offload: auto`` to none or layers before the run started (pipeline/fit.py, apply_plan)."""
    return cfg.offload == Offload.layers


def _nf4(profile: ResolvedProfile, dtype, device) -> dict[str, Any]:
    """from_pretrained arguments for a 4-bit NF4 base (bitsandbytes), where the profile allows it."""
    import torch

    if "nf4" not in profile.quantization:
        raise InputError(f"qlora=true: the {profile.name} profile has no NF4 support "
                         f"({profile.reasons.get('quantization.nf4', '')}); use plain LoRA (qlora=false)")
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError("qlora=true needs bitsandbytes: pip install bitsandbytes") from None
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float16)
    # the device this process trains on: the CPU under --cpu-emulation (bitsandbytes has CPU NF4 kernels), else the
    # local accelerator's index (a bare 0 would mean "accelerator 0" even where there is none)
    return {"quantization_config": quant, "device_map": {"": "cpu" if device.type == "cpu" else device.index or 0}}


def _with_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    if cfg.init_adapter:  # continue from an adapter (SFT -> DPO); the launcher checked its shape
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        return _cast_once(_adapters_in_fp32(model))
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise InputError(f"lora_target_modules={cfg.lora_target_modules}: {exc}") from None
    return _cast_once(_adapters_in_fp32(model))


def _adapters_in_fp32(model):
    """Adapters train in fp32 whatever the base dtype (peft's autocast_adapter_dtype does this for
    fp16/bf16); make sure, so fp16 loss scaling never sees fp16 master weights."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _cast_once(model):
    """Under autocast, skip peft's cast of a LoRA layer's input to the adapter's fp32: autocast casts it straight
    back to bf16/fp16 for the matmul, so every adapted layer copied its input twice and kept one copy for backward
    (measured on the CPU in bf16: 0.86x the SFT run's peak RSS, 1.02x its tokens/s; bench/results/
    ab-41-cast-once.json). bf16 -> fp32 -> bf16 is exact, so the result is the same to the bit. Only where the
    layer has no dropout: torch's bf16 dropout rounds its 1/(1-p) scale to bf16, so with ``lora_dropout`` > 0
    peft's fp32 path stays, as it does outside autocast (fp32 runs)."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and all(isinstance(d, torch.nn.Identity)
                                                 for d in module.lora_dropout.values()):
            def cast(x, dtype, _peft=module._cast_input_dtype):
                if x is not None and torch.is_autocast_enabled(x.device.type):
                    return x
                return _peft(x, dtype)
            module._cast_input_dtype = cast
    return model


def autocast(device, dtype_name: str):
    """Mixed precision in the profile's dtype; fp32 runs without autocast."""
    import contextlib

    import torch

    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype_name))


def accelerator(kind: str):
    """torch's module for a device kind ("cuda" covers ROCm builds too); None for the CPU or a torch without it."""
    import torch

    return getattr(torch, kind, None) if kind in ("cuda", "xpu") else None
