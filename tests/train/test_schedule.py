"""#39 §1: the learning-rate schedule against transformers' own (a schedule returning 1.0 must fail here).

After the warmup and up to the last step, `lr_lambda` is transformers' `get_{cosine,linear,constant}_schedule_with_warmup`
to the float (past the last step ours stays at 0 where their cosine would rise again). In
the warmup it runs one step ahead of theirs on purpose: theirs gives step 0 a learning rate of 0 (a step that moves
nothing, on runs of a few dozen steps), ours (step + 1) / warmup, so the last warmup step reaches the full rate.
"""

import math

import pytest

from hwcompat.train.recipe import lr_lambda


def _theirs(schedule, warmup, total):
    import torch
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if schedule == "constant":
        return get_constant_schedule_with_warmup(opt, warmup).lr_lambdas[0]
    make = get_cosine_schedule_with_warmup if schedule == "cosine" else get_linear_schedule_with_warmup
    return make(opt, warmup, total).lr_lambdas[0]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 40), (3, 40), (10, 100), (1, 7)])
def test_the_schedule_is_transformers_after_warmup_and_one_step_ahead_in_it(schedule, warmup, total):
    ours, theirs = lr_lambda(schedule, warmup, total), _theirs(schedule, warmup, total)
    for step in range(total + 1):
        expected = theirs(step + 1) if step < warmup else theirs(step)
        assert math.isclose(ours(step), expected, rel_tol=1e-12, abs_tol=1e-15), (schedule, warmup, step)
    if schedule != "constant":  # past the end (a resume with more steps): ours stays at 0, theirs' cosine rises again
        assert ours(total + 5) == pytest.approx(0.0, abs=1e-15)
    if warmup:
        assert ours(warmup - 1) == 1.0 and ours(0) == 1 / warmup  # full rate at the last warmup step, never 0


def test_the_schedule_moves():
    f = lr_lambda("cosine", 2, 20)
    assert f(0) == 0.5 and f(2) == 1.0 and 0 < f(11) < 1 and f(20) == pytest.approx(0.0)
