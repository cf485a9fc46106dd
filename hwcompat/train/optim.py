"""The optimizer a config names: torch's AdamW, or bitsandbytes' 8-bit AdamW where the profile has its kernels.

8-bit AdamW keeps both moment estimates as uint8 with a float32 scale per 256-value block (tensors under
4,096 values keep float32 states): about a quarter of AdamW's 8 bytes per trainable parameter
(``hwcompat.plan.optimizer_state_bytes`` counts it exactly). The paged variant lets the states spill to
host memory under pressure (CUDA unified memory; on the CPU it is the plain 8-bit optimizer).
"""

from __future__ import annotations

from hwcompat.errors import InputError
from hwcompat.resolve import ResolvedProfile

EIGHT_BIT = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def check_supported(name: str, profile: ResolvedProfile, where: str = "optimizer") -> None:
    """Refuse an 8-bit optimizer, with the profile's reason, where bitsandbytes has no kernels for the card."""
    if name in EIGHT_BIT and "optim8bit" not in profile.quantization:
        raise InputError(f"{where}={name}: the {profile.name} profile has no bitsandbytes 8-bit optimizer "
                         f"({profile.reasons.get('quantization.optim8bit', 'not supported')}); use optimizer=adamw")


def make_optimizer(name: str, params, lr: float, weight_decay: float, profile: ResolvedProfile,
                   fused_cpu: bool = False):
    """``fused_cpu``: a full fine-tune's parameters on the CPU (the CPU recipe, or host masters) step with torch's
    fused CPU AdamW, its vectorised kernel; both paths use the same one, so they agree to the bit."""
    import torch

    check_supported(name, profile)
    if name not in EIGHT_BIT:
        params = list(params)
        fused = fused_cpu and all(p.device.type == "cpu" for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise InputError(f"optimizer={name} needs bitsandbytes: pip install bitsandbytes") from None
    return getattr(bnb_optim, EIGHT_BIT[name])(params, lr=lr, weight_decay=weight_decay)
