"""GRPO's rewards: the task metrics the eval already computes, or the user's own function, weighted.

``rewards:`` in the config is a list; each entry is a built-in metric scored against the row's reference answer
(``data.metrics.ROW_METRICS``: ``field_f1``, ``json_valid``, ``exact_match``, ``label_accuracy`` …) or a user
function ``module:function``. A module is looked up beside the config file first (``load_config`` rewrites such
an entry to ``/abs/path/module.py:function``, so the worker finds it wherever it runs), else imported from the
environment. The function is called with keywords, as TRL calls its reward functions::

    def my_reward(prompts: list[str], completions: list[str], references: list[str | None], **kwargs) -> list[float]

one float per completion (a prompt's G completions are consecutive; ``references[i]`` is the row's answer, None
for a prompt-only row). A function that raises, returns the wrong count, a non-number, NaN or inf is a
``RewardError`` naming the function and the row: exit 2, and the checkpoint of the steps done is kept.
This module never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hwcompat.data import metrics
from hwcompat.errors import InputError, excerpt

SIGNATURE = "fn(prompts, completions, references, **kwargs) -> list[float], one per completion"


class RewardError(InputError):
    """A reward function failed on the run's data: the user's code or data to fix (exit 2)."""


@dataclass(frozen=True)
class Reward:
    name: str  # as configured: "field_f1", "rewards:length_bonus", "/abs/rewards.py:length_bonus"
    weight: float
    fn: Callable


def _builtin(name: str) -> Callable:
    def score(prompts, completions, references, **_):
        return [metrics.row_score(name, c, r) for c, r in zip(completions, references)]

    return score


def local_spec(entry: str, folder: Path) -> str:
    """``module:function`` -> ``/folder/module.py:function`` when that file is beside the config, else unchanged."""
    module, sep, fn = entry.partition(":")
    if not sep or module.endswith(".py") or "/" in module:
        return entry
    path = folder / (module.replace(".", "/") + ".py")
    return f"{path.resolve()}:{fn}" if path.is_file() else entry


def _load_module(module: str, where: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise InputError(f"{where}: rewards: {excerpt(module)} does not exist")
        name = f"hwcompat_user_rewards_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def _user(entry: str, where: str) -> Callable:
    module, _, fn_name = entry.rpartition(":")
    try:
        mod = _load_module(module, where)
    except InputError:
        raise
    except Exception as exc:  # the user's module failed to import: their code, said as theirs
        raise InputError(f"{where}: rewards: {entry}: importing {module} failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); put {module}.py beside the config "
                         "or on PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise InputError(f"{where}: rewards: {entry}: {module} has no function {fn_name!r} (expected {SIGNATURE})")
    return fn


def resolve(names: list[str], weights: list[float], where: str = "config") -> list[Reward]:
    """The configured rewards, each callable; an unknown metric, a missing module or function, or weights that do
    not match is an InputError before any model loads."""
    if not names:
        raise InputError(f"{where}: rewards: method grpo needs at least one reward, e.g. rewards: [field_f1, "
                         f"json_valid] (built-in: {', '.join(metrics.ROW_METRICS)}) or rewards: [my_rewards:score] "
                         f"(a function {SIGNATURE}, in my_rewards.py beside the config)")
    if weights and len(weights) != len(names):
        raise InputError(f"{where}: reward_weights has {len(weights)} value(s) for {len(names)} reward(s); give one "
                         "per reward, in order, or none (all 1.0)")
    out = []
    for i, name in enumerate(names):
        if ":" in name:
            fn = _user(name, where)
        elif name in metrics.ROW_METRICS:
            fn = _builtin(name)
        else:
            raise InputError(f"{where}: rewards: {excerpt(name)} is not a built-in reward ({', '.join(metrics.ROW_METRICS)})"
                             f" nor a function module:function")
        out.append(Reward(name, float(weights[i]) if weights else 1.0, fn))
    return out


def short(name: str) -> str:
    """The name a log line and a metric key show: ``length_bonus`` for ``/a/b/rewards.py:length_bonus``."""
    return name.rpartition(":")[2] if ":" in name else name


def score(rewards: list[Reward], prompts: list[str], completions: list[str], references: list[str | None],
          where: list[str]) -> list[list[float]]:
    """Each reward's value per completion (``[reward][completion]``); ``where[i]`` is completion i's data row."""
    out = []
    for r in rewards:
        try:
            values = r.fn(prompts=prompts, completions=completions, references=references)
        except Exception as exc:
            raise RewardError(f"reward {r.name} raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                              f" (on the completions of {_rows(where)}); fix the function ({SIGNATURE})") from None
        out.append(_checked(r, values, completions, where))
    return out


def _rows(where: list[str]) -> str:
    seen = list(dict.fromkeys(where))
    return ", ".join(seen[:4]) + (f" and {len(seen) - 4} more" if len(seen) > 4 else "")


def _checked(r: Reward, values, completions: list[str], where: list[str]) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {r.name} returned {type(values).__name__}, not a list of floats ({SIGNATURE})") from None
    if len(values) != len(completions):
        raise RewardError(f"reward {r.name} returned {len(values)} value(s) for {len(completions)} completions "
                          f"(of {_rows(where)}); it must return one float per completion")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"reward {r.name} returned {excerpt(v)} for completion {i} of {where[i]}: expected a "
                              "float")
        if not math.isfinite(v):
            raise RewardError(f"reward {r.name} returned {v} for completion {i} of {where[i]} (completion: "
                              f"{excerpt(completions[i])}); rewards must be finite")
        out.append(float(v))
    return out
