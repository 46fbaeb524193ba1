"""Confidence intervals for rates: one proportion, and the difference of two proportions.

A rate k/n gets a Wilson score interval (the default) or a Clopper–Pearson exact one. A
difference of two rates gets Newcombe's hybrid score interval (his method 10, built from
the two Wilson intervals): on paired items (the same probes or documents scored twice;
Newcombe 1998, Stat Med 17:2635, with the phi correlation term) or on two independent
groups (Newcombe 1998, Stat Med 17:873). Unlike a percentile bootstrap, none of these
shrinks to a point at 0/n or n/n: 0 of 3 is [0, 0.56], not [0, 0].

Every interval is (low, high) at `level` (0.95 unless given); `describe` is the
{"method", "level"} record a report carries so that it names its method (the words for each
method are `report.interval_names`). Pure Python.
Not here: bootstrap intervals for statistics that are not proportions (`eval.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.report.interval_names import METHOD_NAMES

LEVEL = 0.95
PROPORTION_METHODS = ("wilson", "clopper-pearson")


class IntervalError(WeightsmithError, ValueError):
    """Counts or a level no interval can be computed for."""


def describe(method: str, level: float = LEVEL) -> dict[str, Any]:
    """The record a report carries for its intervals: {"method": ..., "level": ...}."""
    if method not in METHOD_NAMES:
        raise IntervalError(f"unknown interval method {method!r}; known: {', '.join(METHOD_NAMES)}")
    return {"method": method, "level": level}


def is_binary(values: Sequence[Any]) -> bool:
    """True when every value is 0 or 1 (booleans included): a proportion, not a mean."""
    return all(isinstance(v, (int, float)) and v in (0, 1) for v in values)


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise IntervalError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _check(k: int, n: int) -> None:
    if n < 1:
        raise IntervalError(f"an interval for {k} of {n} needs at least one trial")
    if not 0 <= k <= n:
        raise IntervalError(f"an interval for {k} of {n}: successes must be between 0 and {n}")


# --- one proportion -----------------------------------------------------------------------


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's (1927) score interval for k successes in n trials."""
    _check(k, n)
    z = _z(level)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At k = 0 (k = n) the bound is 0 (1) exactly; rounding would leave a 1e-17 sliver.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (DLMF 8.17.22), by Lentz's method."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return f


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b) = P(Beta(a, b) <= x), for a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_quantile(q: float, a: float, b: float) -> float:
    """x with I_x(a, b) = q, by bisection (I is increasing in x); accurate to ~1e-15."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Clopper and Pearson's (1934) exact interval: the beta quantiles of the binomial tails."""
    _check(k, n)
    alpha = 1 - level
    _z(level)  # checks the level
    low = 0.0 if k == 0 else beta_quantile(alpha / 2, k, n - k + 1)
    high = 1.0 if k == n else beta_quantile(1 - alpha / 2, k + 1, n - k)
    return low, high


def proportion_interval(k: int, n: int, method: str = "wilson", level: float = LEVEL) -> tuple[float, float]:
    """The `method` ("wilson" or "clopper-pearson") interval for k of n."""
    if method == "wilson":
        return wilson(k, n, level)
    if method == "clopper-pearson":
        return clopper_pearson(k, n, level)
    raise IntervalError(
        f"unknown proportion interval {method!r}; choose one of {', '.join(PROPORTION_METHODS)}"
    )


# --- differences of two proportions ----------------------------------------------------------


def newcombe_independent(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> tuple[float, float]:
    """Newcombe's method 10 for k1/n1 - k2/n2 from two independent groups (Wilson-based)."""
    p1, p2 = k1 / max(n1, 1), k2 / max(n2, 1)
    l1, u1 = wilson(k1, n1, level)
    l2, u2 = wilson(k2, n2, level)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, low), min(1.0, high)


def newcombe_paired(both: int, first_only: int, second_only: int, neither: int, level: float = LEVEL):
    """Newcombe's method 10 for p1 - p2 on paired items, from the 2x2 table of outcomes.

    p1 = (both + first_only) / n and p2 = (both + second_only) / n. The two Wilson intervals
    are combined with phi, the correlation of the pairs, which Newcombe's method 10 takes
    with its numerator shrunk by n/2 toward 0 when positive (the paper's definition).
    """
    a, b, c, d = both, first_only, second_only, neither
    if min(a, b, c, d) < 0:
        raise IntervalError(f"newcombe_paired: counts must not be negative, got {(a, b, c, d)}")
    n = a + b + c + d
    p1, p2 = (a + b) / max(n, 1), (a + c) / max(n, 1)
    l1, u1 = wilson(a + b, n, level)
    l2, u2 = wilson(a + c, n, level)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    det = a * d - b * c
    num = max(det - n / 2, 0.0) if det > 0 else det
    phi = num / math.sqrt(margins) if margins else 0.0
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    low = (p1 - p2) - math.sqrt(max(0.0, dl1**2 - 2 * phi * dl1 * du2 + du2**2))
    high = (p1 - p2) + math.sqrt(max(0.0, du1**2 - 2 * phi * du1 * dl2 + dl2**2))
    return max(-1.0, low), min(1.0, high)


def paired_difference(a: Sequence[Any], b: Sequence[Any], level: float = LEVEL) -> dict[str, Any]:
    """mean(b) - mean(a) for 0/1 outcomes of the same items, with Newcombe's paired interval."""
    if len(a) != len(b):
        raise IntervalError(
            f"paired_difference: {len(a)} outcomes for A but {len(b)} for B; pair the same items"
        )
    if not a:
        raise IntervalError("paired_difference: no paired items")
    if not (is_binary(a) and is_binary(b)):
        raise IntervalError("paired_difference: outcomes must be 0 or 1 (a proportion)")
    table = {(1, 1): 0, (1, 0): 0, (0, 1): 0, (0, 0): 0}
    for x, y in zip(a, b, strict=True):
        table[(int(y), int(x))] += 1  # (second run, reference): b is the "first" proportion
    low, high = newcombe_paired(table[(1, 1)], table[(1, 0)], table[(0, 1)], table[(0, 0)], level)
    delta = (table[(1, 0)] - table[(0, 1)]) / len(a)
    return {"delta": delta, "ci_low": low, "ci_high": high, **describe("newcombe-paired", level)}
