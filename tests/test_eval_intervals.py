"""Intervals for rates (weightsmith.eval.intervals) against published values, scipy and coverage.

Reference values are the published worked examples of Newcombe (1998): "Interval estimation
for the difference between independent proportions", Stat Med 17:873, Table II, method 10,
and "Improved confidence intervals for the difference between binomial proportions based on
paired data", Stat Med 17:2635, Table II, method 10 (four decimals, as printed). scipy (a
test-only reference, not a weightsmith dependency) checks Wilson and Clopper–Pearson.
"""

from __future__ import annotations

import math
import random

import pytest

from weightsmith.eval import intervals as iv
from weightsmith.report.interval_names import method_line

# (both, first only, second only, neither) -> method 10 interval for p1 - p2
PAIRED = [
    ((36, 12, 2, 0), (0.0569, 0.3404)),
    ((18, 12, 2, 18), (0.0562, 0.3290)),
    ((53, 0, 0, 1), (-0.0729, 0.0729)),
    ((0, 30, 0, 0), (0.8395, 1.0)),
]
# (k1, n1, k2, n2) -> method 10 interval for k1/n1 - k2/n2
INDEPENDENT = [
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ((0, 10, 0, 20), (-0.1611, 0.2775)),
    ((0, 10, 0, 10), (-0.2775, 0.2775)),
    ((10, 10, 0, 20), (0.6791, 1.0)),
    ((10, 10, 0, 10), (0.6075, 1.0)),
]


@pytest.mark.parametrize(("table", "expected"), PAIRED)
def test_newcombe_paired_matches_published_examples(table, expected):
    lo, hi = iv.newcombe_paired(*table)
    assert (round(lo, 4), round(hi, 4)) == expected


@pytest.mark.parametrize(("counts", "expected"), INDEPENDENT)
def test_newcombe_independent_matches_published_examples(counts, expected):
    lo, hi = iv.newcombe_independent(*counts)
    assert (round(lo, 4), round(hi, 4)) == expected


CASES = [
    (k, n)
    for n in (1, 2, 3, 5, 15, 20, 57, 100, 1000, 20000)
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n})
]


def test_wilson_and_clopper_pearson_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in CASES:
        for level in (0.9, 0.95, 0.99):
            ref = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
            assert iv.wilson(k, n, level) == pytest.approx((ref.low, ref.high), abs=1e-12), (k, n, level)
            ref = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
            assert iv.clopper_pearson(k, n, level) == pytest.approx((ref.low, ref.high), abs=1e-10), (k, n)


def test_betainc_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b in ((0.5, 0.5), (1, 1), (2, 30), (30, 2), (150.5, 80), (1, 5000)):
        for x in (1e-6, 0.01, 0.3, 0.5, 0.65, 0.99, 1 - 1e-9):
            assert iv.betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), abs=1e-11)


@pytest.mark.parametrize("method", iv.PROPORTION_METHODS)
def test_no_interval_claims_certainty_at_the_edges(method):
    for n in (1, 3, 15, 100):
        lo, hi = iv.proportion_interval(0, n, method)
        assert lo == 0.0 and 0 < hi < 1
        lo, hi = iv.proportion_interval(n, n, method)
        assert hi == 1.0 and 0 < lo < 1
    # The two examples: 0/3 refusals and 15/15.
    assert iv.proportion_interval(0, 3, method)[1] > 0.5
    assert iv.proportion_interval(15, 15, method)[0] < 0.8
    for k, n in CASES:
        lo, hi = iv.proportion_interval(k, n, method)
        assert 0 <= lo <= k / n <= hi <= 1


def _coverage(bounds: list[tuple[float, float]], p: float) -> float:
    """Exact coverage: the binomial probability of the k whose interval (bounds[k]) holds p."""
    n = len(bounds) - 1
    return sum(
        math.comb(n, k) * p**k * (1 - p) ** (n - k) for k, (lo, hi) in enumerate(bounds) if lo <= p <= hi
    )


def test_wilson_coverage_averages_to_its_level_and_clopper_pearson_never_falls_short():
    grid = [i / 50 for i in range(1, 50)]
    for n in (20, 40, 100):
        wil = [iv.wilson(k, n) for k in range(n + 1)]
        cov = [_coverage(wil, p) for p in grid]
        assert abs(sum(cov) / len(cov) - 0.95) < 0.01, n
        assert min(cov) > 0.80  # Wilson dips below its level near 0 and 1, but not far
        cp = [iv.clopper_pearson(k, n) for k in range(n + 1)]
        assert min(_coverage(cp, p) for p in grid) >= 0.95 - 1e-9


def test_newcombe_paired_coverage_is_near_its_level():
    rng = random.Random(7)
    hits = total = 0
    for cells in ((0.4, 0.1, 0.1, 0.4), (0.7, 0.15, 0.05, 0.1), (0.05, 0.05, 0.02, 0.88)):
        theta = cells[1] - cells[2]
        for _ in range(800):
            counts = [0, 0, 0, 0]
            for _ in range(40):
                counts[rng.choices(range(4), weights=cells)[0]] += 1
            lo, hi = iv.newcombe_paired(*counts)
            hits += lo <= theta <= hi
            total += 1
    assert abs(hits / total - 0.95) < 0.025


def test_paired_difference_counts_the_table_from_outcomes():
    ref = [1] * 36 + [1] * 2 + [0] * 12  # the second run's view: 36 both, 12 second only, 2 first only
    new = [1] * 36 + [0] * 2 + [1] * 12
    d = iv.paired_difference(ref, new)
    assert d["delta"] == pytest.approx(0.2)
    assert (round(d["ci_low"], 4), round(d["ci_high"], 4)) == (0.0569, 0.3404)
    assert (d["method"], d["level"]) == ("newcombe-paired", 0.95)
    same = iv.paired_difference([True, False, True], [True, False, True])
    assert same["delta"] == 0 and same["ci_low"] < 0 < same["ci_high"]  # not [0, 0]


def test_bad_inputs_are_refused():
    for bad in ((1, 0), (4, 3), (-1, 3)):
        with pytest.raises(iv.IntervalError):
            iv.wilson(*bad)
    with pytest.raises(iv.IntervalError, match="level"):
        iv.wilson(1, 3, level=1.0)
    with pytest.raises(iv.IntervalError, match="unknown"):
        iv.proportion_interval(1, 3, "wald")
    with pytest.raises(iv.IntervalError, match="0 or 1"):
        iv.paired_difference([0.5], [1])
    with pytest.raises(iv.IntervalError, match="pair"):
        iv.paired_difference([0, 1], [1])
    with pytest.raises(iv.IntervalError, match="unknown interval method"):
        iv.describe("wald")
    assert method_line(iv.describe("wilson")) == "95% Wilson score"
    assert method_line(iv.describe("newcombe-paired", 0.9)).startswith("90% Newcombe")
