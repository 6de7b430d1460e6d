"""The leaderboard's statistics: Student-t intervals and Welch's test, checked against scipy's
own functions and the textbook formulas on known data, and the tie rule on synthetic rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.leaderboard.stats import ALPHA, Ranked, ci_halfwidths, tie_ranks, welch_p

SAMPLES = [[2.91, 2.95, 3.02], [3.10, 3.00, 3.05, 2.97], [4.2, 4.4], [7.1, 7.0, 7.3, 7.2, 6.9]]


@pytest.mark.parametrize("values", SAMPLES)
def test_interval_is_scipys_student_t_interval(values: list[float]) -> None:
    (half,) = ci_halfwidths([np.std(values, ddof=1)], [len(values)])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                 scale=stats.sem(values))
    assert half == pytest.approx((high - low) / 2, rel=1e-12, abs=1e-15)


def test_interval_of_three_values_by_hand() -> None:
    # t(0.975, 2) = 4.303 in any printed table; the sd of 1, 2, 3 is 1.
    (half,) = ci_halfwidths([1.0], [3])
    assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)


def test_no_interval_for_one_value_and_none_wide_without_spread() -> None:
    assert np.isnan(ci_halfwidths([0.0, 0.5], [1, 0])).all()
    assert list(ci_halfwidths([0.0], [3])) == [0.0]


def test_welch_matches_scipy_and_the_satterthwaite_formula() -> None:
    a, b = [2.91, 2.95, 3.02], [3.10, 3.00, 3.05, 2.97]
    p = welch_p(a, b)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)


def test_welch_is_undefined_for_one_seed_or_identical_constant_samples() -> None:
    assert welch_p([3.0], [3.1, 3.2]) is None
    assert welch_p([3.0, 3.0], [3.0, 3.0]) is None
    assert welch_p([3.0, 3.0], [3.1, 3.1]) == 0.0  # no spread, different means: apart


def test_rows_inside_each_others_interval_tie_and_outside_are_ordered() -> None:
    close_a, close_b = [3.00, 3.02, 2.98], [3.01, 2.99, 3.03]
    far = [3.50, 3.52, 3.48]
    ranked = tie_ranks({"a": close_a, "b": close_b, "far": far})
    assert welch_p(close_a, close_b) >= ALPHA > welch_p(far, close_a)  # type: ignore[operator]
    assert ranked["a"] == Ranked(rank=1, tied=True, p_best=None)
    assert (ranked["b"].rank, ranked["b"].tied) == (1, True)
    assert ranked["b"].p_best == pytest.approx(welch_p(close_b, close_a))
    assert (ranked["far"].rank, ranked["far"].tied) == (3, False)


def test_a_tie_is_with_the_group_leader_not_a_chain() -> None:
    # b cannot be told from a, c cannot be told from b, but c is clearly worse than a.
    a, b, c = [1.00, 1.10, 0.90], [1.25, 1.45, 1.05], [1.60, 1.62, 1.58]
    assert welch_p(b, a) >= ALPHA and welch_p(c, b) >= ALPHA  # type: ignore[operator]
    assert welch_p(c, a) < ALPHA  # type: ignore[operator]
    ranked = tie_ranks({"a": a, "b": b, "c": c})
    assert [ranked[k].rank for k in "abc"] == [1, 1, 3]


def test_one_seed_rows_are_ordered_by_mean_with_equal_means_sharing_a_rank() -> None:
    ranked = tie_ranks({"d": [2.0], "a": [2.5], "b": [2.5], "c": [3.0]})
    assert {k: r.rank for k, r in ranked.items()} == {"d": 1, "a": 2, "b": 2, "c": 4}
    assert ranked["d"].p_best is None and not ranked["d"].tied
