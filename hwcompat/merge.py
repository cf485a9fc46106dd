"""Merge a LoRA adapter into its base model, streaming one tensor at a time.

``peft``'s ``merge_and_unload()`` needs the whole model in memory (often
more than training needed, with QLoRA). Here each base tensor is read from
its safetensors shard, gets its delta ``scaling * B @ A`` (transposed for
``fan_in_fan_out``; ``alpha/sqrt(r)`` for rsLoRA; per-module rank/alpha
patterns honoured) and is written straight into the output shard, whose
header is computed up front. Peak memory: the largest tensor plus the
adapter. The output folder is built beside the target and renamed into
place, so an interrupted merge leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat.userfile import read_json_object
from hwcompat.errors import HwcompatError, InputError, excerpt
from hwcompat.fsutil import atomic_dir, output_target, require_space
from hwcompat import weights
from hwcompat.choices import DTYPE_BYTES
from hwcompat.weights import TORCH_TO_ST, read_header

#: Files copied from the base (tokenizer files prefer the adapter folder's copy: that is what trained).
COPY_FROM_BASE = ("generation_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict[str, Any]
    lora: dict[str, tuple[Any, Any]]  # base weight key -> (A, B) tensors
    replace: dict[str, Any]  # base key -> full tensor (modules_to_save)

    def scaling(self, module: str) -> float:
        r = self.config["r"]
        alpha = self.config["lora_alpha"]
        for pattern, value in (self.config.get("rank_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
                r = value
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
                alpha = value
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def find_adapter(path: str | Path) -> Path:
    p = Path(path)
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").exists():
            return cand
    raise InputError(f"{p}: no adapter_config.json here or in {p / 'adapter'}; give a run folder or an adapter folder")


def adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``, every field merge relies on checked, each error naming file and field."""
    f = path / "adapter_config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{f}: cannot read it ({exc})") from None
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{f}: not valid JSON ({str(exc)[:80]}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{f}: expected a JSON object, got {type(cfg).__name__}; re-save the adapter")

    def positive(value: Any, field: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{f}: {field}: expected a positive number, got {excerpt(value)}")

    if "r" not in cfg:
        raise InputError(f"{f}: r: missing (the LoRA rank)")
    positive(cfg["r"], "r")
    positive(cfg.get("lora_alpha"), "lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise InputError(f"{f}: {key}: expected an object of pattern: value, got {excerpt(patterns)}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"{f}: {key}: {excerpt(pattern)} is not a valid regular expression ({exc})") from None
            positive(value, f"{key}[{pattern!r}]")
    return cfg


def load_adapter(path: Path) -> Adapter:
    from safetensors.torch import load_file

    cfg = adapter_config(path)
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise InputError(f"{path}: adapter type {kind!r} is not LoRA; only LoRA adapters can be merged here")
    if cfg.get("use_dora"):
        raise InputError(f"{path}: DoRA adapters rescale each weight's norm and are not merged by hwcompat; "
                         "use peft's merge_and_unload() for DoRA")
    files = [path / "adapter_model.safetensors"]
    if not files[0].exists():
        if (path / "adapter_model.bin").exists():
            raise InputError(f"{path}: adapter_model.bin is a pickle; hwcompat only reads safetensors. Re-save the "
                             "adapter with safe_serialization=True")
        raise InputError(f"{path}: adapter_model.safetensors missing")
    read_header(files[0])  # a damaged file is an error naming it, before safetensors parses it
    stored = load_file(str(files[0]))
    pairs: dict[str, dict[str, Any]] = {}
    replace: dict[str, Any] = {}
    for key, t in stored.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if m:
            pairs.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = t
        elif ".lora_" in name:
            raise InputError(f"{path}: unsupported adapter tensor {key} (LoRA embeddings / biases are not handled)")
        else:
            replace[name.replace(".modules_to_save.default", "")] = t
    incomplete = [k for k, v in pairs.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise InputError(f"{path}: adapter tensor {incomplete[0]} has lora_A or lora_B but not both")
    return Adapter(path, cfg, {k: (v["A"], v["B"]) for k, v in pairs.items()}, replace)


def _shards(base: Path) -> dict[str, list[str]]:
    """shard file -> tensor names, from the index or the single file."""
    index = base / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, list[str]] = {}
        for name, f in weight_map.items():
            out.setdefault(f, []).append(name)
        return out
    single = base / "model.safetensors"
    if single.exists():
        return {"model.safetensors": [k for k in weights.read_header(single) if k != "__metadata__"]}
    if list(base.glob("*.bin")):
        raise InputError(f"{base}: the base weights are pickle .bin files; hwcompat reads safetensors only. "
                         "Convert once with transformers: from_pretrained(...).save_pretrained(..., safe_serialization=True)")
    raise InputError(f"{base}: no model.safetensors or model.safetensors.index.json; --base must be the "
                     "unquantised model folder")


def _recorded_base(adapter: Adapter) -> str:
    """The base weights' digest the adapter's run recorded (run.json beside adapter/), or "" when unknown."""
    run_json = adapter.path.parent / "run.json"
    try:
        inputs = json.loads(run_json.read_text(encoding="utf-8")).get("inputs") or {}
        return str(inputs.get("base") or "") if isinstance(inputs, dict) else ""
    except (OSError, ValueError, AttributeError):
        return ""


def _same_base(adapter: Adapter, base: Path) -> None:
    """The adapter goes into the model it was trained on: by what identifies the model (config + weights digest,
    recorded by the run), not by the folder's name; an already-merged model is never a base."""
    from hwcompat.fingerprint import weights_digest

    record = base / "hwcompat_merge.json"
    if record.exists():
        raise InputError(f"--base {base} is a merged model ({record.name}: an adapter is already in its weights); "
                         "merging again would add the adapter's change twice. Give the original base model "
                         "(--force merges anyway)")
    recorded = _recorded_base(adapter)
    if recorded:
        if weights_digest(base) != recorded:
            raise InputError(f"--base {base} is not the model the adapter was trained on: its config.json or weights "
                             "differ from what the run recorded (run.json inputs.base). Give the run's own base "
                             "model (--force merges anyway)")
        return
    named = str(adapter.config.get("base_model_name_or_path") or "")
    if named and Path(named).name != base.resolve().name and Path(named).resolve() != base.resolve():
        raise InputError(f"the adapter was trained on {named!r} but --base is {base}; if that is the same model "
                         "under another name, pass --force")


def validate(adapter: Adapter, base: Path, force: bool = False) -> dict[str, list[str]]:
    """Every check that can fail, before anything is written."""
    cfg_path = base / "config.json"
    if not cfg_path.exists():
        raise InputError(f"--base {base}: no config.json; give the base model folder")
    base_cfg = read_json_object(cfg_path, "--base config")
    q = base_cfg.get("quantization_config") or {}
    if q.get("load_in_4bit") or q.get("load_in_8bit") or q.get("quant_method") in ("bitsandbytes", "gptq", "awq"):
        raise InputError(f"--base {base} is a quantised checkpoint ({q.get('quant_method', 'bitsandbytes')}); merge "
                         "into the unquantised base model (a QLoRA run trained on 4-bit weights, but its adapter "
                         "belongs to the full-precision model)")
    if not force:
        _same_base(adapter, base)
    shards = _shards(base)
    shapes: dict[str, list[int]] = {}
    for f, names in shards.items():
        h = read_header(base / f)
        for n in names:
            shapes[n] = h[n]["shape"]
    for key, (a, b) in adapter.lora.items():
        if key not in shapes:
            raise InputError(f"adapter targets {key}, which the base model does not have: adapter and base do not "
                             f"match (adapter from {adapter.config.get('base_model_name_or_path') or adapter.path})")
        out_f, in_f = (shapes[key][1], shapes[key][0]) if adapter.config.get("fan_in_fan_out") else shapes[key]
        if list(b.shape)[0] != out_f or list(a.shape)[1] != in_f or a.shape[0] != b.shape[1]:
            raise InputError(f"{key}: base weight is {shapes[key]} but the adapter's B x A is "
                             f"{list(b.shape)} x {list(a.shape)}: adapter and base do not match")
    for key, t in adapter.replace.items():
        if key not in shapes or list(t.shape) != shapes[key]:
            raise InputError(f"adapter replaces {key} with shape {list(t.shape)}, base has {shapes.get(key)}")
    return shards


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder path for the merged model")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} exists and is not empty; choose a new folder")


def _merge_shard(src: Path, dst: Path, names: list[str], adapter: Adapter, lora: dict[str, tuple[Any, Any]],
                 dtype: str, dev) -> int:
    """One shard: each base tensor read, its delta added (fp32), cast and written as it comes; returns how many
    adapter tensors were merged into it."""
    import torch

    target, fan = getattr(torch, dtype), bool(adapter.config.get("fan_in_fan_out"))
    h = read_header(src)
    entries = [(n, TORCH_TO_ST[dtype] if h[n]["dtype"] in ("F32", "F16", "BF16") else h[n]["dtype"], h[n]["shape"])
               for n in names]
    merged = [0]

    def tensors():
        for n, t in weights.read_tensors(src, names):
            t = adapter.replace.get(n, t)
            if n in lora:
                a, b = lora[n]
                delta = (b @ a) * adapter.scaling(n[: -len(".weight")])
                t = (t.to(dev, torch.float32) + (delta.T if fan else delta)).cpu()
                merged[0] += 1
            yield n, (t.to(target) if t.is_floating_point() else t)

    weights.write_streaming(dst, entries, tensors(), {"format": "pt"})
    return merged[0]


def _write_model_files(tmp: Path, base: Path, base_cfg: dict[str, Any], adapter: Adapter, dtype: str, merged: int,
                       weight_map: dict[str, str] | None, flags: list[str]) -> None:
    """Beside the weights: the shard index, config.json in the new dtype, the tokenizer that trained, a record."""
    if weight_map is not None:
        index = json.loads((base / "model.safetensors.index.json").read_text())
        index["weight_map"] = weight_map
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = {k: v for k, v in base_cfg.items() if k not in ("quantization_config", "torch_dtype")}
    cfg["dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in COPY_FROM_BASE:
        if (base / name).exists():
            shutil.copy2(base / name, tmp / name)
    source = adapter.path if (adapter.path / "tokenizer_config.json").exists() else base
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, tmp / name)
    (tmp / "hwcompat_merge.json").write_text(json.dumps({
        "adapter": str(adapter.path), "base": str(base), "dtype": dtype, "merged_tensors": merged,
        "lora_r": adapter.config["r"], "lora_alpha": adapter.config["lora_alpha"],
        "use_rslora": bool(adapter.config.get("use_rslora")), "regressed": flags}, indent=2))


def guard_flags(adapter_path: str | Path) -> list[str]:
    """The metrics the run's regression guard flagged (summary.json ``regressed``), for a run folder, its
    adapter/ or a full fine-tune's model/; [] for anything else. A flagged model is worse than its base on the user's own task."""
    from hwcompat import summary as summary_file

    p = Path(adapter_path)
    run = p if (p / summary_file.NAME).is_file() else p.parent if p.name in ("adapter", "model") else None
    try:
        summary = summary_file.read(run) if run is not None else None
    except InputError:
        return []
    return summary.flags() if summary is not None else []


def merged_flags(model: str | Path) -> list[str]:
    """The guard's flags a merged folder carries (hwcompat_merge.json ``regressed``, written by a forced merge)."""
    record = Path(model) / "hwcompat_merge.json"
    if not record.is_file():
        return []
    try:
        flags = read_json_object(record, "merge record").get("regressed") or []
    except InputError:
        return []
    return [str(f) for f in flags]


def refuse_flagged(flags: list[str], what: str, force: bool) -> None:
    if flags and not force:
        raise InputError(f"{what}: the run's regression guard flagged it ({'; '.join(flags)}): it is worse than its "
                         "base on your task, so shipping it would ship that. Fix the data and train again, or pass "
                         "--force to go on anyway (nothing was written)")


def merge(adapter_path: str | Path, base: str | Path, out: str | Path, dtype: str | None = None,
          device: str = "cpu", force: bool = False, log=print, allow_flagged: bool | None = None) -> Path:
    """Stream-merge; returns the output folder. Raises InputError before writing on any mismatch, and for a run
    the regression guard flagged unless ``allow_flagged`` (default: ``force``; the merged folder records the
    flags, so its export asks again)."""
    import torch

    flags = guard_flags(adapter_path)
    refuse_flagged(flags, f"merge {adapter_path}", force if allow_flagged is None else allow_flagged)
    adapter = load_adapter(find_adapter(adapter_path))
    base, out = Path(base), Path(out)
    _check_out(out)
    shards = validate(adapter, base, force)
    base_cfg = read_json_object(base / "config.json", "--base config")
    base_dtype = str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32")
    dtype = base_dtype if dtype is None else dtype
    if dtype not in TORCH_TO_ST:
        raise InputError(f"--dtype {dtype}: use float32, float16 or bfloat16")
    if device != "cpu" and not torch.cuda.is_available():
        raise HwcompatError(f"--device {device}: torch sees no GPU here; merge on the CPU (the default)")
    dev = torch.device(device)
    lora = {k: (a.to(dev, torch.float32), b.to(dev, torch.float32)) for k, (a, b) in adapter.lora.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    source_bytes = sum((base / s).stat().st_size for s in shards)
    require_space(out.parent, source_bytes * DTYPE_BYTES[dtype] // DTYPE_BYTES.get(base_dtype, 4), "the merged model")
    # output_target: locked, a killed merge's temp folder removed, SIGTERM -> Terminated (exit 143), which
    # unwinds through atomic_dir and removes the partial output.
    with output_target(out, "hwcompat merge", overwrite=True, kind="folder"), atomic_dir(out) as tmp:
        merged, weight_map = 0, {}
        for shard, names in shards.items():
            merged += _merge_shard(base / shard, tmp / shard, names, adapter, lora, dtype, dev)
            weight_map.update({n: shard for n in names})
            log(f"merged {shard}")
        _write_model_files(tmp, base, base_cfg, adapter, dtype, merged, weight_map if len(shards) > 1 else None,
                           flags)
        if merged != len(lora):  # inside the temp folder: an incomplete merge is never renamed into place
            raise HwcompatError(f"merged {merged} of {len(lora)} adapter tensors; nothing was written")
    return out
