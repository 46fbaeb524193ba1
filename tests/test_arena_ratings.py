"""Arena ratings: Bradley–Terry parity with choix, interval coverage, ties, anchoring,
pair tables, categories and Cohen's kappa (expected values worked out by hand here)."""

from __future__ import annotations

import json
import math

import choix
import numpy as np
import pytest

from weightsmith.arena.agreement import cohen_kappa
from weightsmith.arena.ratings import bradley_terry, rate, rating_table
from weightsmith.arena.records import Outcome, Vote, judge_voter
from weightsmith.errors import UsageError, WeightsmithError

NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]


def _elo(theta: np.ndarray, anchor: int | None = None) -> np.ndarray:
    """Natural-log strengths on the Elo-like scale, computed here from the definition."""
    zero = theta.mean() if anchor is None else theta[anchor]
    return 1000.0 + 400.0 * (theta - zero) / math.log(10.0)


def _simulate(rng: np.random.Generator, theta: np.ndarray, battles: int) -> list[tuple[int, int, bool]]:
    """(i, j, i won) battles between random distinct pairs under Bradley–Terry with strengths theta."""
    n = len(theta)
    i = rng.integers(0, n, battles)
    j = (i + rng.integers(1, n, battles)) % n  # never i itself
    won = rng.random(battles) < 1.0 / (1.0 + np.exp(-(theta[i] - theta[j])))
    return list(zip(i.tolist(), j.tolist(), won.tolist(), strict=True))


def _outcomes(battles: list[tuple[int, int, bool]], names: list[str] = NAMES) -> list[Outcome]:
    return [Outcome(names[i], names[j], 1.0 if won else 0.0) for i, j, won in battles]


def _choix_data(battles: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    return [(i, j) if won else (j, i) for i, j, won in battles]  # (winner, loser)


def test_parity_with_choix_maximum_likelihood() -> None:
    rng = np.random.default_rng(7)
    truth = np.array([0.0, 0.4, -0.3, 1.1, -0.8])
    battles = _simulate(rng, truth, 1500)
    ours = bradley_terry(_outcomes(battles))
    theta = np.array([ours[name] for name in NAMES])
    for reference in (
        choix.ilsr_pairwise(len(NAMES), _choix_data(battles), alpha=0.0, tol=1e-12, max_iter=10_000),
        choix.opt_pairwise(len(NAMES), _choix_data(battles), alpha=0.0, tol=1e-12),
    ):
        np.testing.assert_allclose(_elo(theta), _elo(reference), atol=1e-4, rtol=0)
        # anchored on a named contestant, through the whole rating path
        table = rate(_outcomes(battles), anchor="charlie", rounds=5).overall
        got = {r.name: r.rating for r in table.ratings}
        want = _elo(reference, anchor=NAMES.index("charlie"))
        np.testing.assert_allclose([got[name] for name in NAMES], want, atol=1e-4, rtol=0)
    assert got["charlie"] == 1000.0


def test_ties_count_as_half_a_win_like_choix_on_doubled_data() -> None:
    # Chatbot Arena's rule: a tie is half a win for each side. Doubling every decisive battle
    # and entering a tie as one win each way gives choix the same likelihood (times 2).
    rng = np.random.default_rng(3)
    outcomes, data = [], []
    for _ in range(900):
        i, j = rng.choice(4, 2, replace=False)
        score = rng.choice([0.0, 0.5, 1.0], p=[0.35, 0.2, 0.45] if i < j else [0.45, 0.2, 0.35])
        outcomes.append(Outcome(NAMES[i], NAMES[j], float(score)))
        data += [(i, j), (j, i)] if score == 0.5 else [(i, j)] * 2 if score == 1.0 else [(j, i)] * 2
    ours = bradley_terry(outcomes)
    ref = choix.ilsr_pairwise(4, data, alpha=0.0, tol=1e-12, max_iter=10_000)
    np.testing.assert_allclose(_elo(np.array([ours[n] for n in NAMES[:4]])), _elo(ref), atol=1e-4, rtol=0)


def test_ties_by_hand() -> None:
    # two models: A scored 2 wins + 1 tie out of 4 -> strength ratio 2.5 : 1.5
    outs = [Outcome("a", "b", s) for s in (1.0, 1.0, 0.5, 0.0)]
    table = rate(outs, rounds=20).overall
    got = {r.name: r.rating for r in table.ratings}
    assert got["a"] - got["b"] == pytest.approx(400 * math.log10(2.5 / 1.5), abs=1e-9)
    assert got["a"] + got["b"] == pytest.approx(2000.0, abs=1e-9)  # the mean is 1000
    assert {r.name: r.score for r in table.ratings} == {"a": 2.5, "b": 1.5}
    # only ties (and both-bad, recorded as 0.5 too): everyone is 1000
    even = rate([Outcome("a", "b", 0.5), Outcome("b", "c", 0.5), Outcome("c", "a", 0.5)], rounds=10)
    assert all(r.rating == pytest.approx(1000.0, abs=1e-9) for r in even.overall.ratings)


def test_recovery_true_rating_inside_the_interval() -> None:
    """In 100 simulated tournaments the true rating lies in its 95% interval in >= 90 of them."""
    rng = np.random.default_rng(2024)
    true_elo = np.array([850.0, 960.0, 1040.0, 1150.0])  # mean 1000
    theta = (true_elo - 1000.0) * math.log(10.0) / 400.0
    names = NAMES[:4]
    inside = np.zeros(4, dtype=int)
    for t in range(100):
        battles = _simulate(rng, theta, 1000)
        table = rate(_outcomes(battles, names), rounds=200, seed=t, by_category=False).overall
        for r in table.ratings:
            k = names.index(r.name)
            inside[k] += r.lower <= true_elo[k] <= r.upper
    print("coverage per model (of 100):", inside.tolist())
    assert (inside >= 90).all(), inside


def test_anchor_and_intervals() -> None:
    rng = np.random.default_rng(5)
    battles = _simulate(rng, np.array([0.0, 0.5, -0.5]), 400)
    mean = rate(_outcomes(battles, NAMES[:3]), rounds=50, seed=1).overall
    anchored = rate(_outcomes(battles, NAMES[:3]), anchor="bravo", rounds=50, seed=1).overall
    by_mean = {r.name: r for r in mean.ratings}
    by_anchor = {r.name: r for r in anchored.ratings}
    assert by_anchor["bravo"].rating == 1000.0
    assert (by_anchor["bravo"].lower, by_anchor["bravo"].upper) == (1000.0, 1000.0)
    shift = by_mean["bravo"].rating - 1000.0
    for name in NAMES[:3]:
        assert by_anchor[name].rating == pytest.approx(by_mean[name].rating - shift, abs=1e-9)
        assert by_mean[name].lower < by_mean[name].rating < by_mean[name].upper
    assert sum(r.rating for r in mean.ratings) / 3 == pytest.approx(1000.0)
    assert [r.name for r in mean.ratings] == sorted(by_mean, key=lambda n: -by_mean[n].rating)
    # seeded: the same seed gives the same intervals, another seed others
    again = rate(_outcomes(battles, NAMES[:3]), rounds=50, seed=1).overall
    other = rate(_outcomes(battles, NAMES[:3]), rounds=50, seed=2).overall
    assert [r.lower for r in again.ratings] == [r.lower for r in mean.ratings]
    assert [r.lower for r in other.ratings] != [r.lower for r in mean.ratings]
    with pytest.raises(UsageError, match=r"anchor 'brav' has no battles \(did you mean 'bravo'\?\)"):
        rate(_outcomes(battles, NAMES[:3]), anchor="brav")


def test_pair_tables() -> None:
    outs = [Outcome("a", "b", 1.0)] * 3 + [Outcome("b", "a", 1.0), Outcome("a", "c", 0.5)]
    outs += [Outcome("c", "b", 1.0), Outcome("b", "c", 1.0), Outcome("c", "a", 0.0)]
    table = rate(outs, rounds=10).overall
    idx = {name: i for i, name in enumerate(table.names)}
    a, b, c = idx["a"], idx["b"], idx["c"]
    assert table.battles[a][b] == table.battles[b][a] == 4
    assert table.battles[a][c] == 2 and table.battles[b][c] == 2
    assert table.win_rate[a][b] == pytest.approx(3 / 4) and table.win_rate[b][a] == pytest.approx(1 / 4)
    assert table.win_rate[a][c] == pytest.approx((0.5 + 1.0) / 2)
    assert table.win_rate[a][a] is None
    rating = {r.name: r.rating for r in table.ratings}
    for x, y in [("a", "b"), ("b", "c"), ("c", "a")]:
        want = 1.0 / (1.0 + 10 ** ((rating[y] - rating[x]) / 400.0))
        assert table.predicted[idx[x]][idx[y]] == pytest.approx(want)
    per_model = {r.name: (r.battles, r.score) for r in table.ratings}
    assert per_model == {"a": (6, 4.5), "b": (6, 2.0), "c": (4, 1.5)}
    assert table.total == 8 and table.l2 == 0.0
    json.dumps(rate(outs, rounds=10).to_dict())  # plain JSON


def test_infinite_maximum_and_disconnected_groups() -> None:
    outs = [Outcome("a", "b", 1.0), Outcome("a", "c", 1.0), Outcome("b", "c", 1.0), Outcome("c", "b", 1.0)]
    with pytest.raises(WeightsmithError, match="infinite: a never lost"):
        bradley_terry(outs)
    table = rate(outs, rounds=20).overall
    assert table.l2 > 0 and "a never lost" in table.note
    assert table.ratings[0].name == "a" and all(math.isfinite(r.rating) for r in table.ratings)
    split = [Outcome("a", "b", 1.0), Outcome("b", "a", 1.0), Outcome("c", "d", 1.0), Outcome("d", "c", 0.0)]
    with pytest.raises(WeightsmithError, match=r"2 groups that never met.*\{a, b\}; \{c, d\}"):
        rate(split)
    with pytest.raises(WeightsmithError, match="no battles to rate"):
        rate([])


def test_per_category_tables() -> None:
    rng = np.random.default_rng(11)
    outs = []
    for k, (i, j, won) in enumerate(_simulate(rng, np.array([0.2, 0.0, -0.2]), 300)):
        outs.append(Outcome(NAMES[i], NAMES[j], float(won), category="code" if k % 3 else "chat"))
    outs += [Outcome("alpha", "zulu", 1.0, "lonely"), Outcome("zulu", "alpha", 1.0, "lonely")]
    outs += [Outcome("alpha", "bravo", 1.0, "split"), Outcome("charlie", "delta", 1.0, "split")]
    outs += [Outcome("charlie", "delta", 0.0, "split"), Outcome("bravo", "alpha", 1.0, "split")]
    result = rate(outs, anchor="bravo", rounds=30, seed=4)
    assert sorted(result.categories) == ["chat", "code", "lonely"]
    code = [o for o in outs if o.category == "code"]
    want = rating_table(code, anchor="bravo", rounds=30, seed=4)
    assert result.categories["code"].to_dict() == want.to_dict()
    assert result.categories["code"].total == len(code)
    assert "bravo has no battles in this category" in result.categories["lonely"].note
    assert "never met" in result.skipped_categories["split"]


def _votes(pairs: list[tuple[str, str]]) -> list[Vote]:
    out = []
    for k, (human, judge) in enumerate(pairs):
        out += [Vote(f"b{k}", human, "human", "h"), Vote(f"b{k}", judge, judge_voter("j"), "j")]
    return out


def test_cohen_kappa_by_hand() -> None:
    pairs = (
        [("a", "a")] * 4 + [("b", "b")] * 2 + [("tie", "tie"), ("a", "b"), ("b", "tie"), ("both_bad", "a")]
    )
    votes = _votes(pairs)
    votes.append(Vote("only-human", "a", "human"))  # not shared: left out
    # one battle two humans split a/b (an even split is a tie) against a judge's tie: agreement
    votes += [
        Vote("split", "a", "human", "h1"),
        Vote("split", "b", "human", "h2"),
        Vote("split", "tie", "judge:k"),
    ]
    # verdicts, human then judge, over 11 shared battles:
    #   agree: a 4, b 2, tie 2 (incl. the split)  -> p_o = 8/11
    #   human margins: a 5, b 3, tie 3;  judge margins: a 5, b 3, tie 3
    p_o = 8 / 11
    p_e = (5 * 5 + 3 * 3 + 3 * 3) / 11**2
    got = cohen_kappa(votes, "human", "judge", rounds=300, seed=0)
    assert got is not None and got.battles == 11
    assert got.observed == pytest.approx(p_o)
    assert got.kappa == pytest.approx((p_o - p_e) / (1 - p_e))
    assert got.lower < got.kappa < got.upper
    assert got.confusion == [[4, 1, 0], [0, 2, 1], [1, 0, 2]]
    # undefined when both said the same one thing every time; None when nothing is shared
    same = cohen_kappa(_votes([("a", "a")] * 3))
    assert same is not None and same.kappa is None and "undefined" in same.note
    assert cohen_kappa([Vote("x", "a", "human")]) is None


def test_all_ties_still_give_an_interval_of_the_right_width() -> None:
    """Every battle a tie: every bootstrap resample refits equal ratings, so the percentile
    interval alone would be one point. The interval is the Wald one instead: for two models and
    n ties (p = 1/2, information n/4 on their difference), each rating against the mean has
    standard error (400 / ln 10) / sqrt(n), derived by hand."""
    n = 6
    ties = [Outcome("alpha", "bravo", 0.5) for _ in range(n)]
    table = rating_table(ties, rounds=50, seed=0)
    half = 1.959963984540054 * (400.0 / math.log(10.0)) / math.sqrt(n)
    for r in table.ratings:
        assert r.rating == pytest.approx(1000.0)
        assert (r.lower, r.upper) == (pytest.approx(1000.0 - half), pytest.approx(1000.0 + half))
    anchored = {r.name: r for r in rating_table(ties, anchor="alpha", rounds=50).ratings}
    assert (anchored["alpha"].lower, anchored["alpha"].upper) == (1000.0, 1000.0)
    assert anchored["bravo"].upper - anchored["bravo"].lower == pytest.approx(
        4 * half
    )  # sqrt(4) x: a difference


def test_kappa_intervals_never_collapse_to_a_point() -> None:
    """Full agreement and a voter that gave one verdict every time leave every bootstrap resample
    at the same kappa; the interval is then Wilson's for p_o mapped through kappa (by hand)."""
    z = 1.959963984540054
    # Full agreement on 10 battles, margins a 5, b 3, tie 2: kappa 1; p_o's Wilson low at 10/10 is
    # n / (n + z^2), and the bound maps through kappa at p_e = (25 + 9 + 4) / 100.
    full = cohen_kappa(_votes([("a", "a")] * 5 + [("b", "b")] * 3 + [("tie", "tie")] * 2), rounds=200)
    p_e = 0.38
    assert full.kappa == pytest.approx(1.0) and full.upper == pytest.approx(1.0)
    assert full.lower == pytest.approx((10 / (10 + z * z) - p_e) / (1 - p_e), abs=1e-9)
    # The judge always ties: p_o = p_e = the humans' tie share (3/9), kappa 0, interval around it.
    constant = cohen_kappa(_votes([("a", "tie")] * 4 + [("b", "tie")] * 2 + [("tie", "tie")] * 3), rounds=200)
    assert constant.kappa == pytest.approx(0.0, abs=1e-12)
    assert constant.lower < -0.2 and constant.upper > 0.2
    assert constant.note.startswith("judge gave one verdict on every shared battle")
