"""The profile schema, declared as data: each part of a profile is a ``schema.Shape`` (its keys, their kinds, closed
vocabularies, further rules), walked by ``schema.check``; every error names the file and the key path
(``profile FILE: a.b[0].c: what is wrong``). The builders below only turn checked mappings into typed values, and
hold the rules between fields (the match's keys depend on the vendor; the name must equal the file's)."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

from hwcompat import envvars
from hwcompat.choices import Attention, CompileBackend, Dtype, Vendor
from hwcompat.errors import ProfileError
from hwcompat.profiles.model import (QUANT_KINDS, Caveat, Choice, EnvVar, Evidence, Fp16Rate, Hardware, Image, Match,
                                     Profile, Quant, TorchBuild, Variant)
from hwcompat.readings import TRAINING_FLAGS, VENDORS, XE_ARCHS, Capability, is_gfx_target
from hwcompat.schema import Field, Problem, Shape, check


def _words(kind: type[enum.Enum]) -> tuple[str, ...]:
    return tuple(m.value for m in kind)


def _rule(ok, why: str):
    """A further rule: ``ok(value)`` or the problem ``why`` (formatted with the value)."""
    return lambda value: None if ok(value) else why.format(value=value)


def _capability(value: Any) -> str | None:
    try:
        Capability.of(value)
    except ValueError as exc:
        return str(exc)
    return None


_TEXT = Field("text", required=True)
_SOURCE = Field("string", null=True)
_GIB = Field("number", required=True, rule=_rule(lambda v: v > 0, "{value!r} is not a positive number of GiB"))


def _choice(vocabulary: tuple[str, ...] | None, rule=None) -> Shape:
    """A value hwcompat picks, with why and where from: one of a vocabulary, or what ``rule`` allows."""
    value = (Field(required=True, choices=vocabulary) if vocabulary else Field(required=True, rule=rule))
    return Shape({"value": value, "reason": _TEXT, "source": _SOURCE})


_CHOICES = {"dtype": _choice(_words(Dtype)), "attention": _choice(_words(Attention)),
            "compile_backend": _choice(_words(CompileBackend))}
_SUPPORTED = _choice(None, _rule(lambda v: v in (True, False, "true", "false"),
                                 "expected true or false, got {value!r}"))
_HARDWARE = Shape({
    "bf16": Field("bool", True), "fp16": Field(required=True, choices=_words(Fp16Rate)),
    "flash_attention_2": Field("bool", True), "triton": Field("bool", True), "source": Field("text"),
    "fused_sdpa": Field("bool"),
    "max_allocation_gib": Field("number", rule=_rule(lambda v: v >= 0, "expected a number of GiB >= 0, got {value!r}")),
})
_ENV = Field(each=Shape({
    "name": Field("text", True, rule=_rule(lambda v: v in envvars.SETS,
                                           "{value!r} is not in hwcompat.envvars.SETS; register it there first")),
    "value": Field("string", True, hint=" (quote it)"), "reason": _TEXT, "source": _SOURCE}))
_QUANT = Shape({k: Field(required=True, shape=Shape({"supported": Field("bool", True), "reason": _TEXT,
                                                     "source": _SOURCE})) for k in QUANT_KINDS})
_CAVEATS = Field(each=Shape({"text": _TEXT, "source": _SOURCE}), null=True)
_PEAK = Shape({"float32": Field("number"), "float16": Field("number"), "bfloat16": Field("number"),
               "source": _SOURCE, "card": Field("string")})
_TORCH = Shape({"build": _TEXT, "index_url": _TEXT, "max_version": Field("text", null=True),
                "min_version": Field("text", null=True), "reason": _TEXT, "source": _SOURCE,
                "extra": Field("text", null=True)})
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9.+-]+")
_PACKAGES = _rule(lambda v: isinstance(v, list) and all(isinstance(x, str) and _PACKAGE.fullmatch(x) for x in v),
                  "expected a list of distribution package names, got {value!r}")
_IMAGE = Shape({"tag": _TEXT, "base": _TEXT, "family": _TEXT, "source": _SOURCE,
                "packages": Field(null=True, rule=_PACKAGES)})
_PATH_VERIFIED = Shape({"level": Field(required=True, rule=_rule(lambda v: v == Evidence.path_verified.value,
                                                                   "{value!r}: only path-verified takes a mapping")),
                        "card": _TEXT, "memory_limit_gib": _GIB, "date": Field(required=True), "source": _TEXT})
_MATCH = {
    Vendor.nvidia: Shape({"compute_capability": Field(required=True, shape=Shape({
        "min": Field(required=True, rule=_capability), "max": Field(required=True, rule=_capability)})),
        "tegra": Field("bool")}),
    Vendor.amd: Shape({"gfx_targets": Field(required=True, rule=_rule(
        lambda v: isinstance(v, list) and v and all(isinstance(t, str) and is_gfx_target(t) for t in v),
        "expected a list like [gfx1030, gfx1031], got {value!r}"))}),
    Vendor.intel: Shape({"xe_archs": Field(required=True, rule=_rule(
        lambda v: isinstance(v, list) and v and all(a in XE_ARCHS for a in v),
        f"expected a list of {', '.join(XE_ARCHS)}, got {{value!r}}"))}),
    Vendor.cpu: Shape({"cpu_flags_any": Field(null=True, rule=_rule(
        lambda v: isinstance(v, list) and all(f in TRAINING_FLAGS for f in v),
        f"expected a list of {', '.join(TRAINING_FLAGS)}, got {{value!r}}"))}),
}
_OVERRIDES = {  # what a variant may replace, each checked like the profile's own
    "hardware": Field(shape=_HARDWARE.loose()), "env": _ENV, "quantization": Field(shape=_QUANT.loose()),
    "caveats": _CAVEATS, "supported": Field(shape=_SUPPORTED), "peak_tflops": Field(shape=_PEAK), "torch":
    Field(shape=_TORCH), **{k: Field(shape=s) for k, s in _CHOICES.items()}}
_VARIANT = Shape({"match": Field(required=True, null=True), "note": _TEXT, **_OVERRIDES})
_PROFILE = Shape({
    "name": _TEXT, "vendor": Field(required=True, choices=VENDORS), "title": _TEXT,
    "match": Field(required=True, null=True), "hardware": Field(required=True, shape=_HARDWARE),
    **{k: Field(required=True, shape=s) for k, s in _CHOICES.items()}, "env": Field(each=_ENV.each, null=True),
    "quantization": Field(required=True, shape=_QUANT), "torch": Field(required=True, shape=_TORCH),
    "driver": Field(null=True, shape=Shape({"min_version": _TEXT, "reason": _TEXT, "source": _SOURCE})),
    "image": Field(required=True, shape=_IMAGE), "evidence": Field(required=True),
    "peak_tflops": Field(null=True, shape=_PEAK), "caveats": _CAVEATS, "supported": Field(shape=_SUPPORTED),
    "variants": Field(null=True, each=_VARIANT),
})


def _evidence(raw: Any) -> tuple[Evidence, str]:
    """``emulated`` / ``verified``, or path-verified with its card, limit, date and result file (all required)."""
    if not isinstance(raw, dict):
        check(raw, Field(choices=_words(Evidence)), ("evidence",))
        if raw == Evidence.path_verified.value:
            raise Problem(("evidence",), "path-verified needs {level, card, memory_limit_gib, date, source}: the "
                                         "card it ran on, the limit, the date and the committed result file")
        return Evidence(raw), ""
    check(raw, _PATH_VERIFIED, ("evidence",))
    return Evidence.path_verified, (f"{raw['card']} under a {raw['memory_limit_gib']:g} GiB limit, {raw['date']} "
                                    f"({raw['source']})")


def _match(where: tuple, raw: Any, vendor: str) -> Match:
    raw = {} if raw is None and vendor == Vendor.cpu else raw
    check(raw, _MATCH[Vendor(vendor)], where)
    if vendor == Vendor.nvidia:
        cc = raw["compute_capability"]
        lo, hi = Capability.of(cc["min"]), Capability.of(cc["max"])
        if lo > hi:
            raise Problem(where + ("compute_capability",), "min is above max")
        return Match(vendor, cc_min=lo, cc_max=hi, tegra=raw.get("tegra", False))
    if vendor == Vendor.amd:
        return Match(vendor, gfx_targets=tuple(t.lower() for t in raw["gfx_targets"]))
    if vendor == Vendor.intel:
        return Match(vendor, xe_archs=tuple(raw["xe_archs"]))
    return Match(vendor, cpu_flags_any=tuple(raw.get("cpu_flags_any") or ()))


def _choice_of(raw: dict) -> Choice:
    value = raw["value"]
    return Choice(str(value).lower() if isinstance(value, bool) else value, raw["reason"], raw.get("source") or "")


def _hardware(raw: dict) -> dict[str, Any]:
    return {k: Fp16Rate(v) if k == "fp16" else float(v) if k == "max_allocation_gib" else v for k, v in raw.items()}


def _env(raw: list | None) -> tuple[EnvVar, ...]:
    return tuple(EnvVar(i["value"], i["reason"], i.get("source") or "", name=i["name"]) for i in raw or ())


def _quant(raw: dict) -> dict[str, Quant]:
    return {k: Quant(i["supported"], i["reason"], i.get("source") or "") for k, i in raw.items()}


def _caveats(raw: list | None) -> tuple[Caveat, ...]:
    return tuple(Caveat(i["text"], i.get("source") or "") for i in raw or ())


def _peak(raw: dict | None) -> tuple[dict[str, float], str]:
    raw = raw or {}
    return {k: float(v) for k, v in raw.items() if k not in ("source", "card")}, str(raw.get("card", ""))


def _torch(raw: dict) -> TorchBuild:
    return TorchBuild(raw["build"], raw["index_url"], raw.get("max_version"), raw.get("min_version"), raw["reason"],
                      raw.get("source") or "", raw.get("extra"))


def _image(raw: dict) -> Image:
    return Image(raw["tag"], raw["base"], raw["family"], raw.get("source") or "", tuple(raw.get("packages") or ()))


_BUILD = {"hardware": _hardware, "env": _env, "quantization": _quant, "caveats": _caveats, "supported": _choice_of,
          "torch": _torch, **{k: _choice_of for k in _CHOICES}}


def _variant(where: tuple, raw: dict, vendor: str) -> Variant:
    """One ``variants[i]``: a narrower match and the fields it replaces."""
    f: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "peak_tflops":
            f["peak_tflops"], f["peak_card"] = _peak(value)
        elif key in _BUILD:
            f[key] = _BUILD[key](value)
    return Variant(_match(where + ("match",), raw["match"], vendor), raw["note"], f)


def parse_profile(raw: Any, path: str) -> Profile:
    """Validate one profile mapping; every error names the file and the key path."""
    try:
        return _build(raw, path)
    except Problem as p:
        raise ProfileError(f"profile {path}: {p.dotted('top level')}: {p.why}") from None


def _build(raw: Any, path: str) -> Profile:
    check(raw, _PROFILE)
    if path and Path(path).stem != raw["name"]:
        raise Problem(("name",), f"{raw['name']!r} must equal the file name {Path(path).stem!r}")
    vendor = raw["vendor"]
    peak_tflops, peak_card = _peak(raw.get("peak_tflops"))
    evidence, evidence_note = _evidence(raw["evidence"])
    drv = raw.get("driver")
    return Profile(
        name=raw["name"], vendor=vendor, title=raw["title"], match=_match(("match",), raw["match"], vendor),
        hardware=Hardware(**_hardware(raw["hardware"])),
        **{k: _choice_of(raw[k]) for k in _CHOICES}, env=_env(raw.get("env")),
        quantization=_quant(raw["quantization"]), torch=_torch(raw["torch"]),
        driver_min=Choice(drv["min_version"], drv["reason"], drv.get("source") or "") if drv else None,
        image=_image(raw["image"]), evidence=evidence, evidence_note=evidence_note,
        peak_tflops=peak_tflops, peak_card=peak_card, caveats=_caveats(raw.get("caveats")),
        supported=(_choice_of(raw["supported"]) if "supported" in raw else
                   Choice("true", "a profile covers this device")),
        variants=tuple(_variant(("variants", i), v, vendor) for i, v in enumerate(raw.get("variants") or [])),
        path=path,
    )
