"""A row's statistics over its seeds, with scipy: a Student-t confidence interval of the mean,
and Welch's t-test between rows, which decides whether two rows are told apart or tied.

The rule for ranks (`tie_ranks`): rows are taken best mean first. Each row is tested against
the best row of the current group (its leader); when Welch's test cannot tell them apart at
ALPHA, the row shares the leader's rank and both are marked tied; otherwise it starts a new
group with its own position as rank (competition ranking). Rows of one seed cannot be tested:
they are ordered by their means, as before seeds existed, and equal means share a rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

CONFIDENCE = 0.95
ALPHA = 0.05  # two rows whose Welch p-value is at least this are tied


def ci_halfwidths(std: Any, n: Any, confidence: float = CONFIDENCE) -> Any:
    """Half-widths of the Student-t intervals of means, element-wise over arrays of sample
    standard deviations (ddof 1) and counts: t((1 + confidence) / 2, n - 1) · std / sqrt(n);
    NaN where n < 2."""
    import numpy as np
    from scipy import stats

    n = np.asarray(n, dtype=float)
    std = np.asarray(std, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = stats.t.ppf((1 + confidence) / 2, n - 1)
        return np.where(n >= 2, t * std / np.sqrt(n), np.nan)


def seeds_line(name: str, values: Sequence[float], runs: int) -> str:
    """One line over the seeds of one submission: the mean ± the 95% interval of `values`
    (the succeeded seeds' metric), saying how many of `runs` seeds did not succeed."""
    import statistics

    failed = runs - len(values)
    tail = f"; {failed} of {runs} seeds did not succeed" if failed else ""
    if not values:
        return f"{name}: no seed succeeded{tail}"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{name}: {mean:.4f} (1 seed){tail}"
    (half,) = ci_halfwidths([statistics.stdev(values)], [len(values)])
    return f"{name}: {mean:.4f} ± {half:.4f} (95% CI, {len(values)} seeds){tail}"


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of two samples; None when it is undefined (a
    sample under two values, or two equal samples without spread)."""
    if len(a) < 2 or len(b) < 2:
        return None
    import numpy as np
    from scipy import stats

    # Without spread scipy warns of cancellation, then answers 0 (means apart) or NaN.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


@dataclass(frozen=True)
class Ranked:
    rank: int
    tied: bool  # shares its rank with another row: the test could not tell them apart
    p_best: float | None  # Welch p-value against the best row (None for the best itself)


def tie_ranks(scores: Mapping[K, Sequence[float]], alpha: float = ALPHA) -> dict[K, Ranked]:
    """Ranks of rows by their scores over seeds (lower is better; a metric to maximise comes
    negated), with the tie rule of the module's docstring. Ties of equal means break by key
    order for the leader, which does not change any rank."""
    means = {k: sum(v) / len(v) for k, v in scores.items() if len(v)}
    order = sorted(means, key=lambda k: (means[k], str(k)))
    out: dict[K, Ranked] = {}
    if not order:
        return out
    best = order[0]
    leader, leader_rank = best, 1
    tied: set[K] = set()
    ranks: dict[K, int] = {best: 1}
    for position, key in enumerate(order[1:], start=2):
        p = welch_p(scores[key], scores[leader])
        if means[key] == means[leader] or (p is not None and p >= alpha):
            ranks[key] = leader_rank
            tied |= {key, leader}
        else:
            leader, leader_rank = key, position
            ranks[key] = position
    for key in order:
        out[key] = Ranked(rank=ranks[key], tied=key in tied,
                          p_best=None if key == best else welch_p(scores[key], scores[best]))
    return out
