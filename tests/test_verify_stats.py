"""#40 §2: a --verify verdict sized to mean something: top-1 agreement judged by its 95% Wilson bounds, enough
answer positions to bound it near the limit, and the task metric on the user's rows deciding an inconclusive share."""

import math

import pytest

from hwcompat.export import verify as V


def test_wilson_bounds_match_the_textbook_values():
    low, high = V.wilson(17, 20, z=1.96)  # Wilson 1927 / Newcombe 1998's worked example scale
    assert math.isclose(low, 0.6396, abs_tol=1e-3) and math.isclose(high, 0.9476, abs_tol=1e-3)
    assert V.wilson(0, 0) == (0.0, 1.0)
    low, high = V.wilson(100, 100)
    assert high == 1.0 and 0.97 < low < 1.0


def test_positions_needed_bound_the_share_within_the_margin():
    n = V.positions_needed(0.9)
    assert n == math.ceil(1.645 ** 2 * 0.9 * 0.1 / 0.03 ** 2) == 271
    low, high = V.wilson(round(0.9 * n), n)
    assert high - 0.9 <= V.TOP1_MARGIN + 0.005 and 0.9 - low <= V.TOP1_MARGIN + 0.005


def _verdict(agree, positions, metrics=None, identical=8, prompts=8, qtype="q4_k_m", kl=0.02):
    limits, _ = V.limits_for(qtype)
    v = V.Verdict("m.gguf", qtype, {})
    v.distributions = {"positions": positions, "mean_kl": kl, "max_kl": 0.5, "top1_agreement": agree / positions,
                       "top1_bounds_95": list(V.wilson(agree, positions))}
    v.generations = {"prompts": prompts, "identical": identical, "identical_share": identical / prompts,
                     "identical_bounds_95": list(V.wilson(identical, prompts)), "first_difference": None}
    if metrics:
        v.generations["metrics_hf"], v.generations["metrics_gguf"] = metrics
    V._judge(v, limits)
    return v


def test_the_issues_case_passes_on_the_users_task_metric():
    """The user's report: q4_k_m top-1 85.0% over 20 positions (limit 90%) while exact match equalled the merged
    model's: one token decided that verdict. Now the share is inconclusive at 95% and the task metric decides."""
    v = _verdict(17, 20, metrics=({"exact_match": 0.75}, {"exact_match": 0.75}))
    assert v.passed and any("inconclusive at 95%, and the task metrics on your rows" in n for n in v.notes)
    v = _verdict(114, 128, metrics=({"exact_match": 0.68}, {"exact_match": 0.66}))  # 89.1% over 128
    assert v.passed


def test_an_inconclusive_share_without_a_task_metric_asks_for_more_rows():
    v = _verdict(17, 20)
    assert not v.passed and "inconclusive at 95%" in v.failures[0] and "--data" in v.failures[0]


def test_a_share_below_the_limit_with_confidence_fails_whatever_the_metric():
    v = _verdict(240, 300, metrics=({"exact_match": 0.75}, {"exact_match": 0.75}))  # 80%: bounds ~76-84%
    assert not v.passed and "below the limit with 95% confidence" in v.failures[0]


def test_a_lost_task_metric_still_fails_and_makes_the_share_count():
    v = _verdict(17, 20, metrics=({"exact_match": 0.75}, {"exact_match": 0.50}))
    assert len(v.failures) == 2 and "exact_match" in v.failures[0] and "inconclusive" in v.failures[1]


@pytest.mark.parametrize("identical, prompts, passes", [(3, 8, True), (1, 8, False), (0, 30, False)])
def test_identical_answers_are_judged_by_their_bounds_too(identical, prompts, passes):
    """q8_0 asks 60% identical answers: 3 of 8 is inconclusive (its bounds reach 60%) and the metric decides; 1 of 8
    and 0 of 30 are below it with confidence."""
    v = _verdict(300, 300, metrics=({"exact_match": 0.5}, {"exact_match": 0.5}), identical=identical,
                 prompts=prompts, qtype="q8_0", kl=0.001)
    assert v.passed is passes
