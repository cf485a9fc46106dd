"""Task metrics on generated outputs: exact match, JSON field F1, label accuracy.

Our users train extraction (text -> JSON), classification (text -> label)
and QA adapters; eval loss alone does not tell them whether the adapter
works, these do. Pure functions over strings, no torch.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LABELS = 20  # at most this many distinct short references -> a classification task
MAX_LABEL_WORDS = 4


def _norm(s: str) -> str:
    return " ".join(s.strip().split())


def _parse_json(s: str) -> Any:
    s = s.strip()
    if s.startswith("```"):
        s = s.strip("`")
        s = s[s.find("\n") + 1:] if "\n" in s else s
    try:
        return json.loads(s)
    except (json.JSONDecodeError, ValueError):
        # Models often add text after the object; take the first balanced object.
        start = s.find("{")
        if start < 0:
            return None
        depth = 0
        for i, ch in enumerate(s[start:], start):
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                try:
                    return json.loads(s[start:i + 1])
                except (json.JSONDecodeError, ValueError):
                    return None
        return None


def _pairs(obj: Any, prefix: str = "") -> set[tuple[str, str]]:
    """Flatten JSON to (field path, value) pairs; list items become separate pairs."""
    out: set[tuple[str, str]] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= _pairs(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for v in obj:
            out |= _pairs(v, prefix)
    else:
        out.add((prefix, _norm(str(obj)).lower()))
    return out


def detect_kind(references: list[str]) -> str:
    """json when every reference is a JSON object; label for few short classes; else exact."""
    if references and all(isinstance(_parse_json(r), dict) and r.strip().startswith("{") for r in references):
        return "json"
    distinct = {_norm(r).lower() for r in references}
    if references and len(distinct) <= MAX_LABELS and all(len(r.split()) <= MAX_LABEL_WORDS for r in distinct):
        return "label"
    return "exact"


def score(predictions: list[str], references: list[str], kind: str = "auto") -> dict[str, float]:
    """Micro-averaged metrics; keys depend on the task kind."""
    if kind == "auto":
        kind = detect_kind(references)
    n = len(references)
    out: dict[str, float] = {"n": float(n)}
    if n == 0:
        return out
    out["exact_match"] = sum(_norm(p) == _norm(r) for p, r in zip(predictions, references)) / n
    if kind == "label":
        out["accuracy"] = sum(_norm(p).lower() == _norm(r).lower() for p, r in zip(predictions, references)) / n
    if kind == "json":
        tp = fp = fn = valid = 0
        for p, r in zip(predictions, references):
            pred = _parse_json(p)
            valid += isinstance(pred, dict)
            pp = _pairs(pred) if isinstance(pred, dict) else set()
            rr = _pairs(_parse_json(r))
            tp += len(pp & rr)
            fp += len(pp - rr)
            fn += len(rr - pp)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        out.update(json_valid=valid / n, field_precision=prec, field_recall=rec,
                   field_f1=2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return out


def row_score(name: str, prediction: str, reference: str | None) -> float:
    """One row's value of a task metric, in [0, 1]: what ``score`` averages, per row (a GRPO reward, a row of
    ``eval --predictions``). ``json_valid`` needs no reference; the others score 0 without one."""
    if name == "json_valid":
        return float(isinstance(_parse_json(prediction), dict))
    if reference is None:
        return 0.0
    if name == "exact_match":
        return float(_norm(prediction) == _norm(reference))
    if name in ("accuracy", "label_accuracy"):
        return float(_norm(prediction).lower() == _norm(reference).lower())
    if name in ("field_f1", "field_precision", "field_recall"):
        pred = _parse_json(prediction)
        pp = _pairs(pred) if isinstance(pred, dict) else set()
        rr = _pairs(_parse_json(reference))
        tp = len(pp & rr)
        prec = tp / len(pp) if pp else 0.0
        rec = tp / len(rr) if rr else 0.0
        return {"field_precision": prec, "field_recall": rec}.get(
            name, 2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    raise KeyError(name)


#: The task metrics a row can be scored on (``row_score``), the built-in GRPO rewards.
ROW_METRICS = ("exact_match", "label_accuracy", "accuracy", "json_valid", "field_f1", "field_precision",
               "field_recall")


def headline(metrics: dict[str, float]) -> str:
    """The one number users look for first."""
    for key in ("field_f1", "accuracy", "exact_match"):
        if key in metrics:
            return f"{key}={metrics[key]:.3f}"
    return ""


#: The task metrics the regression guard watches (all in [0, 1]; a "point" is 0.01).
TASK_METRICS = ("exact_match", "accuracy", "json_valid", "field_precision", "field_recall", "field_f1")
#: What the regression guard watches: the headline metrics the issue names (exact match, field F1, accuracy) and
#: JSON validity. Precision and recall trade against each other inside F1 (a DPO stage that stops inventing
#: entities gains precision and may drop a few real ones); both are reported before/after, F1 is guarded.
GUARDED = ("exact_match", "accuracy", "json_valid", "field_f1")


def regressions(before: dict[str, float], after: dict[str, float], tolerance_points: float) -> list[dict[str, Any]]:
    """Task metrics that fell by more than ``tolerance_points`` from before training to after.

    Preference tuning can make a good SFT model worse at its task (pairs that are not diverse enough), and any
    fine-tune can forget; a drop bigger than the tolerance is reported, not averaged away."""
    out = []
    for key in GUARDED:
        if key in before and key in after:
            drop = (before[key] - after[key]) * 100
            if drop > tolerance_points:
                out.append({"metric": key, "before": before[key], "after": after[key], "drop_points": round(drop, 2)})
    return out
