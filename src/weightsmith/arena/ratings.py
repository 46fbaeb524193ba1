"""Ratings from arena outcomes: Bradley–Terry on the Elo-like scale, with bootstrap intervals.

Method (as Chatbot Arena publishes it, Chiang et al. 2024 §4–5): a Bradley–Terry model fit by
maximum likelihood (bradley_terry.py), a tie or both-bad counting as half a win for each side;
strengths shown on the Elo-like scale ``rating = 1000 + 400 · log10(strength)``, anchored so
that the mean rating is 1000 or a named contestant has exactly 1000; 95% intervals are
percentile bootstrap intervals over battles (outcomes resampled with replacement, refit,
re-anchored, seeded). A bootstrap resample is drawn as multinomial counts over the distinct
(A, B, score) kinds of battle, which is the same distribution as resampling battles one by one
and keeps the work independent of the number of battles. The percentile bootstrap cannot see
uncertainty where the outcomes do not vary (every battle a tie: every resample refits the same
ratings, an interval of one point), so each interval is widened, where narrower, to the Wald
interval of the fit: the rating's variance from the Bradley–Terry observed information
``H = Σ m_ij p_ij (1 − p_ij) (e_i − e_j)(e_i − e_j)ᵀ`` (+ λI under the penalty), a rating being
a contrast of the strengths against their mean or the anchor. The anchor keeps [1000, 1000].

Each vote is one outcome: a battle voted on by two voters counts twice. The tables beside the
ratings: observed win rates (ties as half), the win probabilities the fitted ratings predict,
battle counts per pair and per model, and the same per category. `cohen_kappa` measures how
often humans and judges agree on the same battles (agreement.py).

Not here: the fit itself (bradley_terry.py), reading votes (the store), the page (report.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from weightsmith.arena.agreement import Agreement
from weightsmith.arena.bradley_terry import (
    FALLBACK_L2,
    fit_strengths,
    groups,
    pair_tables,
    strongly_connected,
)
from weightsmith.arena.records import Outcome
from weightsmith.config.fields import did_you_mean
from weightsmith.errors import UsageError, WeightsmithError

#: The Elo-like scale: 400 points per factor of 10 in strength, 1000 at the anchor.
SCALE, BASE = 400.0, 1000.0
_SCORES = (0.0, 0.5, 1.0)


@dataclass
class ModelRating:
    """One contestant's line of a ratings table."""

    name: str
    rating: float
    lower: float  # the bootstrap interval
    upper: float
    battles: int
    score: float  # wins, ties counted as half
    win_rate: float  # score / battles


@dataclass
class RatingTable:
    """Ratings and pair tables of one set of outcomes; matrices are in `names` order (best first)."""

    ratings: list[ModelRating]
    names: list[str]
    battles: list[list[int]]  # battles[i][j]: battles between names[i] and names[j]
    win_rate: list[list[float | None]]  # observed share of i's score against j (None: never met)
    predicted: list[list[float]]  # P(i beats j) from the fitted ratings
    total: int  # outcomes
    anchor: str | None  # None: the mean is 1000
    l2: float = 0.0  # 0: the plain maximum-likelihood fit; else the penalty that kept it finite
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Ratings:
    """Everything `rate` computed; `to_dict()` is the ratings.json body."""

    overall: RatingTable
    categories: dict[str, RatingTable] = field(default_factory=dict)
    skipped_categories: dict[str, str] = field(default_factory=dict)  # category -> why no table
    agreement: Agreement | None = None
    rounds: int = 200
    seed: int = 0
    level: float = 0.95
    source: dict[str, Any] = field(default_factory=dict)  # which votes were used (the caller's words)

    @property
    def method(self) -> dict[str, Any]:
        return {
            "model": "bradley-terry",
            "fit": "maximum likelihood (Newton)",
            "ties": "half a win for each side (tie and both-bad)",
            "scale": f"{BASE:g} + {SCALE:g}·log10(strength)",
            "interval": {
                "method": "bootstrap",
                "level": self.level,
                "rounds": self.rounds,
                "seed": self.seed,
                "at_least": "wald",  # widened where narrower to the fit's Wald interval
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "source": self.source,
            "overall": self.overall.to_dict(),
            "categories": {k: v.to_dict() for k, v in self.categories.items()},
            "skipped_categories": dict(self.skipped_categories),
            "agreement": self.agreement.to_dict() if self.agreement else None,
        }


def to_rating(theta: np.ndarray, anchor_index: int | None = None) -> np.ndarray:
    """Natural-log strengths (…, n) on the Elo-like scale, anchored on the mean or one model."""
    theta = np.asarray(theta, dtype=float)
    zero = (
        theta.mean(-1, keepdims=True) if anchor_index is None else theta[..., anchor_index : anchor_index + 1]
    )
    return BASE + SCALE * (theta - zero) / math.log(10.0)


def bradley_terry(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """Maximum-likelihood strengths (natural log, mean 0) by contestant name; no intervals.

    WeightsmithError when the strengths are not all finite (a model won or lost every
    battle against the rest) or the contestants fall into groups that never met."""
    names, a, b, s = _arrays(outcomes)
    w, m = pair_tables(a, b, s, len(names))
    _check_connected(names, m)
    if not strongly_connected(w):
        raise WeightsmithError(f"the maximum-likelihood strengths are infinite: {_unbounded(names, w)}")
    return dict(zip(names, fit_strengths(w, m).tolist(), strict=True))


def rate(
    outcomes: Iterable[Outcome],
    *,
    anchor: str | None = None,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.95,
    by_category: bool = True,
    source: dict[str, Any] | None = None,
) -> Ratings:
    """Ratings, intervals and tables of `outcomes`, overall and per category.

    `anchor` names the contestant rated exactly 1000 (None: the mean is 1000); `rounds`
    bootstrap resamples with `seed` give the `level` intervals; `source` says which votes
    were used and is kept verbatim for the report."""
    outcomes = list(outcomes)
    if rounds < 1:
        raise UsageError(f"bootstrap rounds must be at least 1, got {rounds}")
    if not 0.0 < level < 1.0:
        raise UsageError(f"the interval level is a fraction between 0 and 1, got {level}")
    result = Ratings(
        overall=rating_table(outcomes, anchor=anchor, rounds=rounds, seed=seed, level=level),
        rounds=rounds,
        seed=seed,
        level=level,
        source=dict(source or {}),
    )
    if by_category:
        _add_categories(result, outcomes, anchor)
    return result


def _add_categories(result: Ratings, outcomes: list[Outcome], anchor: str | None) -> None:
    for category in sorted({o.category for o in outcomes if o.category}):
        subset = [o for o in outcomes if o.category == category]
        here = anchor if anchor in {o.model_a for o in subset} | {o.model_b for o in subset} else None
        try:
            table = rating_table(
                subset, anchor=here, rounds=result.rounds, seed=result.seed, level=result.level
            )
        except WeightsmithError as exc:
            result.skipped_categories[category] = str(exc)
            continue
        if anchor is not None and here is None:
            table.note = f"{anchor} has no battles in this category: the mean is 1000. {table.note}".strip()
        result.categories[category] = table


def rating_table(
    outcomes: Sequence[Outcome],
    *,
    anchor: str | None = None,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> RatingTable:
    """The ratings table and pair tables of one set of outcomes (see `rate`)."""
    names, a, b, s = _arrays(outcomes)
    if anchor is not None and anchor not in names:
        raise UsageError(
            f"anchor {anchor!r} has no battles{did_you_mean(anchor, names)}; anchor on one of: {', '.join(names)}"
        )
    n = len(names)
    w, m = pair_tables(a, b, s, n)
    _check_connected(names, m)
    l2, note = 0.0, ""
    if not strongly_connected(w):
        l2 = FALLBACK_L2
        note = (
            f"The maximum-likelihood ratings are infinite ({_unbounded(names, w)}); they are shown "
            f"with an L2 penalty (λ = {l2:g}) on the natural-log strengths, which keeps them finite."
        )
    at = None if anchor is None else names.index(anchor)
    theta = fit_strengths(w, m, l2)
    point = to_rating(theta, at)
    low, high = _bootstrap(a, b, s, n, at, rounds, seed, level)
    half = _wald_half_widths(theta, m, l2, at, level)
    low, high = np.minimum(low, point - half), np.maximum(high, point + half)
    order = sorted(range(n), key=lambda i: (-point[i], names[i]))
    played, scored = m.sum(1), w.sum(1)
    rows = [
        ModelRating(
            names[i], float(point[i]), float(low[i]), float(high[i]), int(played[i]), float(scored[i]),
            float(scored[i] / played[i]),
        )
        for i in order
    ]  # fmt: skip
    diff = (point[:, None] - point[None, :]) / SCALE
    predicted = 1.0 / (1.0 + 10.0 ** (-diff))
    return RatingTable(
        ratings=rows,
        names=[names[i] for i in order],
        battles=[[int(m[i, j]) for j in order] for i in order],
        win_rate=[[float(w[i, j] / m[i, j]) if m[i, j] else None for j in order] for i in order],
        predicted=[[float(predicted[i, j]) for j in order] for i in order],
        total=len(s),
        anchor=anchor,
        l2=l2,
        note=note,
    )


def _arrays(outcomes: Sequence[Outcome]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, index of A, index of B, A's score) of the outcomes; names sorted."""
    if not outcomes:
        raise WeightsmithError("no battles to rate; vote on some battles (or import a battle log) first")
    for o in outcomes:
        if o.model_a == o.model_b:
            raise WeightsmithError(f"a battle of {o.model_a!r} against itself cannot be rated; drop it")
        if o.score_a not in _SCORES:
            raise WeightsmithError(f"an outcome's score is 0, 0.5 or 1, not {o.score_a!r}")
    names = sorted({o.model_a for o in outcomes} | {o.model_b for o in outcomes})
    index = {name: i for i, name in enumerate(names)}
    a = np.array([index[o.model_a] for o in outcomes])
    b = np.array([index[o.model_b] for o in outcomes])
    return names, a, b, np.array([o.score_a for o in outcomes], dtype=float)


def _check_connected(names: list[str], m: np.ndarray) -> None:
    parts = groups(m)
    if len(parts) > 1:
        shown = "; ".join("{" + ", ".join(names[i] for i in part) + "}" for part in parts[:5])
        raise WeightsmithError(
            f"the contestants fall into {len(parts)} groups that never met, not even through others: "
            f"{shown}; ratings across groups are not comparable: add battles between the groups "
            "or rate each group alone"
        )


def _unbounded(names: list[str], w: np.ndarray) -> str:
    """Words for why the strengths are infinite: who never lost or never won a point."""
    n = len(names)
    lost = [names[i] for i in range(n) if w[:, i].sum() == 0]
    won = [names[i] for i in range(n) if w[i, :].sum() == 0]
    parts = [f"{', '.join(lost)} never lost" if lost else "", f"{', '.join(won)} never won" if won else ""]
    said = " and ".join(p for p in parts if p)
    return said or "some group of models won every battle against the rest"


def _bootstrap(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, n: int, at: int | None, rounds: int, seed: int, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals of the ratings over `rounds` resamples of the outcomes."""
    code = (a * n + b) * 3 + np.round(s * 2).astype(int)  # the distinct (A, B, score) kinds
    kinds, freq = np.unique(code, return_counts=True)
    ka, kb, ks = kinds // 3 // n, kinds // 3 % n, (kinds % 3) / 2.0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(s), freq / len(s), size=rounds)  # (R, K)
    w, m = pair_tables(ka, kb, ks, n, counts)
    # A resample whose plain maximum is infinite (a pair whose few battles all went one way
    # left out) gets the same penalty the point estimate would get; one that split the
    # models into groups (never connected: strongly connected implies connected) too.
    l2 = np.where(strongly_connected(w), 0.0, FALLBACK_L2)
    ratings = to_rating(fit_strengths(w, m, l2), at)  # (R, n)
    tail = 100.0 * (1.0 - level) / 2.0
    return np.percentile(ratings, tail, axis=0), np.percentile(ratings, 100.0 - tail, axis=0)


def _wald_half_widths(
    theta: np.ndarray, m: np.ndarray, l2: float, at: int | None, level: float
) -> np.ndarray:
    """Half-widths (n,) of the ratings' Wald intervals at `level`: z · sqrt(cᵀ H⁺ c), H the fit's
    observed information (module doc), c rating i's contrast of the strengths (against their
    mean, or the anchor `at`, whose own half-width is 0)."""
    n = len(theta)
    p = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
    weight = m * p * (1.0 - p)  # each pair's information, m symmetric
    info = np.diag(weight.sum(1)) - weight + l2 * np.eye(n)
    cov = np.linalg.pinv(info)
    base = np.full((n, n), 1.0 / n) if at is None else np.eye(n)[[at] * n]
    c = (np.eye(n) - base) * (SCALE / math.log(10.0))  # row i: rating i's contrast
    var = np.einsum("ij,jk,ik->i", c, cov, c)
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    return z * np.sqrt(np.maximum(var, 0.0))
