"""#39: closed vocabularies are typed (choices.py ``Vocabulary`` enums): the config's checks, the CLI's choices and
the objectives' registry read them, and no code compares a config field with a bare string of its vocabulary."""

import ast
from pathlib import Path

import pytest

from hwcompat import choices
from hwcompat.choices import Vocabulary

PACKAGE = Path(__file__).resolve().parents[1] / "hwcompat"

#: config field (or planner input field) -> its vocabulary
TYPED = {"method": (choices.Method, choices.PlanMethod), "finetune": (choices.Finetune,),
         "offload": (choices.Offload,), "optimizer_offload": (choices.OptimizerOffload,),
         "loss_type": (choices.LossType,), "scale_rewards": (choices.ScaleRewards,),
         "importance_sampling_level": (choices.ISLevel,), "lr_schedule": (choices.Schedule,),
         "export": (choices.Export,), "optimizer": (choices.Optimizer,), "vendor": (choices.Vendor,)}


def _vocabularies():
    return [v for v in vars(choices).values() if isinstance(v, type) and issubclass(v, Vocabulary) and v is not
            Vocabulary]


@pytest.mark.parametrize("vocab", _vocabularies(), ids=lambda v: v.__name__)
def test_each_member_is_its_text(vocab):
    for m in vocab:
        assert m == m.value and str(m) == m.value and f"{m}" == m.value and f"{m:>9}" == f"{m.value:>9}"
    assert len(set(vocab.values())) == len(vocab)


def test_the_config_the_cli_and_the_registry_read_the_same_vocabularies():
    from hwcompat.train.config_values import CHOICES
    from hwcompat.train.objectives import REGISTRY

    assert tuple(REGISTRY) == choices.Method.values()
    for key, vocab in {"method": choices.Method, "finetune": choices.Finetune, "offload": choices.Offload,
                       "optimizer_offload": choices.OptimizerOffload, "batching": choices.Batching,
                       "data_format": choices.DataFormat, "lr_schedule": choices.Schedule,
                       "loss_type": choices.LossType, "scale_rewards": choices.ScaleRewards,
                       "importance_sampling_level": choices.ISLevel, "export": choices.Export,
                       "optimizer": choices.Optimizer}.items():
        assert tuple(CHOICES[key]) == vocab.values(), key


def _bare_comparisons(tree: ast.AST) -> list[tuple[int, str, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        fields = [o.attr for o in operands if isinstance(o, ast.Attribute) and o.attr in TYPED]
        texts = [o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)]
        for o in operands:
            if isinstance(o, (ast.Tuple, ast.List, ast.Set)):
                texts += [e.value for e in o.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        for f in fields:
            words = {w for v in TYPED[f] for w in v.values()}
            found += [(node.lineno, f, t) for t in texts if t in words]
    return found


def test_no_config_field_is_compared_with_a_bare_string():
    """`cfg.finetune == "full"` reads the same as `cfg.finetune == Finetune.full`, but a renamed value breaks
    only the typed one loudly (AttributeError at import), so comparisons name the member."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        bad += [f"{path.relative_to(PACKAGE.parent)}:{line}: .{f} compared with {t!r}"
                for line, f, t in _bare_comparisons(ast.parse(path.read_text(encoding="utf-8")))]
    assert not bad, "compare with the choices.py member instead:\n" + "\n".join(bad)


def test_the_check_sees_a_bare_comparison():
    tree = ast.parse('if cfg.finetune == "full" or inp.method in ("lora", "qlora") or x.offload != Offload.none:\n'
                     '    pass\n')
    assert _bare_comparisons(tree) == [(1, "finetune", "full"), (1, "method", "lora"), (1, "method", "qlora")]
