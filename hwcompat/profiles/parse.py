"""The profile schema: every key checked, every error naming the file and the key path (``profile FILE: a.b:
what is wrong``); unknown keys are errors and vocabularies closed."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

from hwcompat import envvars, schema
from hwcompat.choices import Attention, CompileBackend, Dtype, Vendor
from hwcompat.errors import ProfileError
from hwcompat.profiles.model import (QUANT_KINDS, Caveat, Choice, EnvVar, Evidence, Fp16Rate, Hardware, Image, Match,
                                     Profile, Quant, TorchBuild, Variant)
from hwcompat.readings import TRAINING_FLAGS, VENDORS, XE_ARCHS, Capability, is_gfx_target


_TOP_KEYS = {
    "name": True, "vendor": True, "title": True, "match": True, "hardware": True, "dtype": True,
    "attention": True, "compile_backend": True, "env": False, "quantization": True, "torch": True,
    "driver": False, "image": True, "evidence": True, "peak_tflops": False, "caveats": False,
    "supported": False, "variants": False,
}
_VARIANT_KEYS = {"match", "note", "hardware", "dtype", "attention", "compile_backend", "env",
                 "quantization", "caveats", "supported", "peak_tflops", "torch"}
_TORCH_KEYS = {"build", "index_url", "max_version", "min_version", "reason", "source", "extra"}


class _Ctx:
    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, msg: str) -> ProfileError:
        return ProfileError(f"profile {self.path}: {where}: {msg}")


def _keys(ctx: _Ctx, where: str, raw: Any, allowed: set[str] | dict[str, bool], required: set[str] = frozenset()):
    if not isinstance(raw, dict):
        raise ctx.fail(where, f"expected a mapping, got {type(raw).__name__}")
    unknown = schema.unknown_key(raw, allowed)
    if unknown:
        raise ctx.fail(f"{where}.{unknown[0]}" if where else str(unknown[0]), f"unknown key{unknown[1]}")
    missing = schema.missing_key(raw, sorted(required), empty_is_missing=False)
    if missing:
        raise ctx.fail(where or "top level", f"missing required key {missing!r}")
    return raw


def _str(ctx: _Ctx, where: str, value: Any, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    why = schema.kind_problem(value, "text")
    if why:
        raise ctx.fail(where, why)
    return value


def _bool(ctx: _Ctx, where: str, value: Any) -> bool:
    why = schema.kind_problem(value, "bool")
    if why:
        raise ctx.fail(where, why)
    return value


def _enum(ctx: _Ctx, where: str, value: Any, kind: type[enum.Enum]):
    why = schema.choice_problem(value, [m.value for m in kind])
    if why:
        raise ctx.fail(where, why)
    return kind(value)


_PATH_KEYS = {"level", "card", "memory_limit_gib", "date", "source"}


def _evidence(ctx: _Ctx, raw: Any) -> tuple[Evidence, str]:
    """``emulated`` / ``verified``, or path-verified with its card, limit, date and result file (all required)."""
    if not isinstance(raw, dict):
        level = _enum(ctx, "evidence", raw, Evidence)
        if level is Evidence.path_verified:
            raise ctx.fail("evidence", "path-verified needs {level, card, memory_limit_gib, date, source}: the card "
                                       "it ran on, the limit, the date and the committed result file")
        return level, ""
    _keys(ctx, "evidence", raw, _PATH_KEYS, _PATH_KEYS)
    if raw["level"] != Evidence.path_verified.value:
        raise ctx.fail("evidence.level", f"{raw['level']!r}: only path-verified takes a mapping")
    limit = raw["memory_limit_gib"]
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise ctx.fail("evidence.memory_limit_gib", f"{limit!r} is not a positive number of GiB")
    return Evidence.path_verified, (f"{_str(ctx, 'evidence.card', raw['card'])} under a {limit:g} GiB limit, "
                                    f"{_str(ctx, 'evidence.date', str(raw['date']))} "
                                    f"({_str(ctx, 'evidence.source', raw['source'])})")


def _choice(ctx: _Ctx, where: str, raw: Any, kind: type[enum.Enum] | None) -> Choice:
    _keys(ctx, where, raw, {"value", "reason", "source"}, {"value", "reason"})
    value = raw["value"]
    if kind is not None:
        value = _enum(ctx, f"{where}.value", value, kind).value
    else:
        value = str(value).lower() if isinstance(value, bool) else _str(ctx, f"{where}.value", value)
    return Choice(value, _str(ctx, f"{where}.reason", raw["reason"]), raw.get("source", "") or "")


def _match(ctx: _Ctx, where: str, raw: Any, vendor: str) -> Match:
    if vendor == Vendor.nvidia:
        _keys(ctx, where, raw, {"compute_capability", "tegra"}, {"compute_capability"})
        tegra = raw.get("tegra", False)
        if not isinstance(tegra, bool):
            raise ctx.fail(f"{where}.tegra", f"expected true or false, got {tegra!r}")
        cc = _keys(ctx, f"{where}.compute_capability", raw["compute_capability"], {"min", "max"}, {"min", "max"})
        try:
            lo, hi = Capability.of(cc["min"]), Capability.of(cc["max"])
        except ValueError as exc:
            raise ctx.fail(f"{where}.compute_capability", str(exc)) from None
        if lo > hi:
            raise ctx.fail(f"{where}.compute_capability", "min is above max")
        return Match(vendor, cc_min=lo, cc_max=hi, tegra=tegra)
    if vendor == Vendor.amd:
        _keys(ctx, where, raw, {"gfx_targets"}, {"gfx_targets"})
        targets = raw["gfx_targets"]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and is_gfx_target(t)
                                                                   for t in targets):
            raise ctx.fail(f"{where}.gfx_targets", f"expected a list like [gfx1030, gfx1031], got {targets!r}")
        return Match(vendor, gfx_targets=tuple(t.lower() for t in targets))
    if vendor == Vendor.intel:
        _keys(ctx, where, raw, {"xe_archs"}, {"xe_archs"})
        archs = raw["xe_archs"]
        if not isinstance(archs, list) or not archs or not all(a in XE_ARCHS for a in archs):
            raise ctx.fail(f"{where}.xe_archs", f"expected a list of {', '.join(XE_ARCHS)}, got {archs!r}")
        return Match(vendor, xe_archs=tuple(archs))
    _keys(ctx, where, raw or {}, {"cpu_flags_any"})
    flags = (raw or {}).get("cpu_flags_any", [])
    if not isinstance(flags, list) or not all(f in TRAINING_FLAGS for f in flags):
        raise ctx.fail(f"{where}.cpu_flags_any", f"expected a list of {', '.join(TRAINING_FLAGS)}, got {flags!r}")
    return Match(vendor, cpu_flags_any=tuple(flags))


def _hardware(ctx: _Ctx, where: str, raw: Any, partial: bool) -> Any:
    allowed = {"bf16", "fp16", "flash_attention_2", "triton", "source", "fused_sdpa", "max_allocation_gib"}
    _keys(ctx, where, raw, allowed, set() if partial else allowed - {"source", "fused_sdpa", "max_allocation_gib"})
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "fp16":
            out[key] = _enum(ctx, f"{where}.fp16", value, Fp16Rate)
        elif key == "source":
            out[key] = _str(ctx, f"{where}.source", value)
        elif key == "max_allocation_gib":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ctx.fail(f"{where}.{key}", f"expected a number of GiB >= 0, got {value!r}")
            out[key] = float(value)
        else:
            out[key] = _bool(ctx, f"{where}.{key}", value)
    return out if partial else Hardware(**out)


def _env(ctx: _Ctx, where: str, raw: Any) -> tuple[EnvVar, ...]:
    if not isinstance(raw, list):
        raise ctx.fail(where, f"expected a list of {{name, value, reason, source}}, got {type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        _keys(ctx, w, item, {"name", "value", "reason", "source"}, {"name", "value", "reason"})
        name = _str(ctx, f"{w}.name", item["name"])
        if name not in envvars.SETS:
            raise ctx.fail(f"{w}.name", f"{name!r} is not in hwcompat.envvars.SETS; register it there first")
        if not isinstance(item["value"], str):
            raise ctx.fail(f"{w}.value", f"expected a string (quote it), got {item['value']!r}")
        out.append(EnvVar(item["value"], _str(ctx, f"{w}.reason", item["reason"]), item.get("source", ""), name=name))
    return tuple(out)


def _quant(ctx: _Ctx, where: str, raw: Any, partial: bool) -> dict[str, Quant]:
    _keys(ctx, where, raw, set(QUANT_KINDS), set() if partial else set(QUANT_KINDS))
    out = {}
    for key, item in raw.items():
        w = f"{where}.{key}"
        _keys(ctx, w, item, {"supported", "reason", "source"}, {"supported", "reason"})
        supported = _bool(ctx, f"{w}.supported", item["supported"])
        out[key] = Quant(supported, _str(ctx, f"{w}.reason", item["reason"]), item.get("source", ""))
    return out


def _caveats(ctx: _Ctx, where: str, raw: Any) -> tuple[Caveat, ...]:
    if not isinstance(raw, list):
        raise ctx.fail(where, "expected a list of {text, source}")
    out = []
    for i, item in enumerate(raw):
        _keys(ctx, f"{where}[{i}]", item, {"text", "source"}, {"text"})
        out.append(Caveat(_str(ctx, f"{where}[{i}].text", item["text"]), item.get("source", "")))
    return tuple(out)


def _supported(ctx: _Ctx, where: str, raw: Any) -> Choice:
    c = _choice(ctx, where, raw, None)
    if c.value not in ("true", "false"):
        raise ctx.fail(f"{where}.value", f"expected true or false, got {raw['value']!r}")
    return c


def _peak(ctx: _Ctx, where: str, raw: Any) -> tuple[dict[str, float], str]:
    _keys(ctx, where, raw, {"float32", "float16", "bfloat16", "source", "card"})
    for k, v in raw.items():
        if k not in ("source", "card") and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ctx.fail(f"{where}.{k}", f"expected a number, got {v!r}")
    return {k: float(v) for k, v in raw.items() if k not in ("source", "card")}, str(raw.get("card", ""))


def _torch(ctx: _Ctx, where: str, raw: Any) -> TorchBuild:
    tb = _keys(ctx, where, raw, _TORCH_KEYS, {"build", "index_url", "reason"})
    return TorchBuild(_str(ctx, f"{where}.build", tb["build"]), _str(ctx, f"{where}.index_url", tb["index_url"]),
                      _str(ctx, f"{where}.max_version", tb.get("max_version"), allow_none=True),
                      _str(ctx, f"{where}.min_version", tb.get("min_version"), allow_none=True),
                      _str(ctx, f"{where}.reason", tb["reason"]), tb.get("source", ""),
                      _str(ctx, f"{where}.extra", tb.get("extra"), allow_none=True))


def _image(ctx: "_Ctx", raw: Any) -> Image:
    img = _keys(ctx, "image", raw, {"tag", "base", "family", "source", "packages"}, {"tag", "base", "family"})
    packages = img.get("packages") or []
    if not isinstance(packages, list) or not all(isinstance(x, str) and re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", x)
                                                 for x in packages):
        raise ctx.fail("image.packages", f"expected a list of distribution package names, got {packages!r}")
    return Image(_str(ctx, "image.tag", img["tag"]), _str(ctx, "image.base", img["base"]),
                 _str(ctx, "image.family", img["family"]), img.get("source", ""), tuple(packages))


_CHOICE_KINDS = {"dtype": Dtype, "attention": Attention, "compile_backend": CompileBackend}


def _variant(ctx: "_Ctx", w: str, vraw: Any, vendor: str) -> Variant:
    """One ``variants[i]``: a narrower match and the fields it replaces, each checked like the profile's own."""
    _keys(ctx, w, vraw, _VARIANT_KEYS, {"match", "note"})
    parse = {"hardware": lambda k, v: _hardware(ctx, f"{w}.{k}", v, partial=True),
             "env": lambda k, v: _env(ctx, f"{w}.{k}", v),
             "quantization": lambda k, v: _quant(ctx, f"{w}.{k}", v, partial=True),
             "caveats": lambda k, v: _caveats(ctx, f"{w}.{k}", v),
             "supported": lambda k, v: _supported(ctx, f"{w}.{k}", v),
             "torch": lambda k, v: _torch(ctx, f"{w}.{k}", v),
             **{k: (lambda k, v: _choice(ctx, f"{w}.{k}", v, _CHOICE_KINDS[k])) for k in _CHOICE_KINDS}}
    f: dict[str, Any] = {}
    for key, value in vraw.items():
        if key == "peak_tflops":
            f["peak_tflops"], f["peak_card"] = _peak(ctx, f"{w}.peak_tflops", value)
        elif key in parse:
            f[key] = parse[key](key, value)
    return Variant(_match(ctx, f"{w}.match", vraw["match"], vendor), _str(ctx, f"{w}.note", vraw["note"]), f)


def parse_profile(raw: Any, path: str) -> Profile:
    """Validate one profile mapping; every error names the file and the key path."""
    ctx = _Ctx(path)
    _keys(ctx, "", raw, _TOP_KEYS, {k for k, req in _TOP_KEYS.items() if req})
    name = _str(ctx, "name", raw["name"])
    stem = Path(path).stem
    if path and stem != name:
        raise ctx.fail("name", f"{name!r} must equal the file name {stem!r}")
    vendor = raw["vendor"]
    if vendor not in VENDORS:
        raise ctx.fail("vendor", f"{vendor!r} is not one of: {', '.join(VENDORS)}")
    image = _image(ctx, raw["image"])
    drv = None
    if raw.get("driver") is not None:
        d = _keys(ctx, "driver", raw["driver"], {"min_version", "reason", "source"}, {"min_version", "reason"})
        drv = Choice(_str(ctx, "driver.min_version", d["min_version"]), _str(ctx, "driver.reason", d["reason"]),
                     d.get("source", ""))
    peak_tflops, peak_card = _peak(ctx, "peak_tflops", raw.get("peak_tflops") or {})
    variants = tuple(_variant(ctx, f"variants[{i}]", vraw, vendor) for i, vraw in enumerate(raw.get("variants") or []))
    evidence, evidence_note = _evidence(ctx, raw["evidence"])
    return Profile(
        name=name, vendor=vendor, title=_str(ctx, "title", raw["title"]),
        match=_match(ctx, "match", raw["match"], vendor),
        hardware=_hardware(ctx, "hardware", raw["hardware"], partial=False),
        dtype=_choice(ctx, "dtype", raw["dtype"], Dtype),
        attention=_choice(ctx, "attention", raw["attention"], Attention),
        compile_backend=_choice(ctx, "compile_backend", raw["compile_backend"], CompileBackend),
        env=_env(ctx, "env", raw.get("env") or []),
        quantization=_quant(ctx, "quantization", raw["quantization"], partial=False),
        torch=_torch(ctx, "torch", raw["torch"]),
        driver_min=drv,
        image=image,
        evidence=evidence, evidence_note=evidence_note,
        peak_tflops=peak_tflops, peak_card=peak_card,
        caveats=_caveats(ctx, "caveats", raw.get("caveats") or []),
        supported=_supported(ctx, "supported", raw["supported"]) if "supported" in raw else Choice(
            "true", "a profile covers this device"),
        variants=variants, path=path,
    )
