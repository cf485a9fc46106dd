"""The model a recipe trains: base weights in the profile's dtype and attention kernel, LoRA on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwcompat.errors import InputError
from hwcompat.resolve import ResolvedProfile
from hwcompat.train.config import TrainConfig


def load_model(cfg: TrainConfig, profile: ResolvedProfile, device):
    """Base model in the profile's dtype and attention kernel, LoRA on top (adapters in fp32)."""
    import warnings

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    # peft calls a transformers property deprecated in v5; the warning is theirs, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    dtype = getattr(torch, profile.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": profile.attention,
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


def streaming(cfg: TrainConfig) -> bool:
    """The launcher resolved ``offload: auto`` to none or layers before the run started (launch.decide_offload)."""
    return cfg.offload == "layers"


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
    import torch
    from peft import LoraConfig, get_peft_model

    if cfg.init_adapter:  # continue from an adapter (SFT -> DPO); the launcher checked its shape
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        return _adapters_in_fp32(model)
    targets = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise InputError(f"lora_target_modules={cfg.lora_target_modules}: {exc}") from None
    return _adapters_in_fp32(model)


def _adapters_in_fp32(model):
    """Adapters train in fp32 whatever the base dtype (peft's autocast_adapter_dtype does this for
    fp16/bf16); make sure, so fp16 loss scaling never sees fp16 master weights."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def autocast(device, dtype_name: str):
    """Mixed precision in the profile's dtype; fp32 runs without autocast."""
    import contextlib

    import torch

    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype_name))
