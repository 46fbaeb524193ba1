"""weightsmith.eval.stats against independent references: scipy's binomial test, the
chi-square survival function, statistics.stdev, lm-eval's own mean_stderr."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from weightsmith.errors import WeightsmithError
from weightsmith.eval import stats as ws
from weightsmith.eval.intervals import newcombe_paired


def _pairs(a_only: int, b_only: int, both: int = 7, neither: int = 5) -> tuple[list[int], list[int]]:
    a = [1] * a_only + [0] * b_only + [1] * both + [0] * neither
    b = [0] * a_only + [1] * b_only + [1] * both + [0] * neither
    return a, b


# --- mean_stderr / bootstrap_stderr ------------------------------------------------------


@pytest.mark.parametrize("xs", [[0, 1, 1, 0, 1], [0.25, -3.5, 7.0, 2.0], list(np.linspace(-1, 4, 101))])
def test_mean_stderr_matches_stdev_and_lm_eval(xs):
    from lm_eval.api.metrics import mean_stderr as lm_mean_stderr

    assert ws.mean_stderr(xs) == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)), rel=1e-12)
    assert ws.mean_stderr(xs) == pytest.approx(lm_mean_stderr(xs), rel=1e-12)


def test_mean_stderr_is_nan_below_two_items():
    assert math.isnan(ws.mean_stderr([]))
    assert math.isnan(ws.mean_stderr([0.7]))


def test_bootstrap_stderr_approximates_mean_stderr_and_is_seeded():
    xs = list(np.random.default_rng(0).normal(size=400))
    se = ws.bootstrap_stderr(ws.mean, xs, iters=2000)
    assert se == pytest.approx(ws.mean_stderr(xs), rel=0.1)
    assert ws.bootstrap_stderr(ws.mean, xs, iters=500, seed=7) == ws.bootstrap_stderr(
        ws.mean, xs, iters=500, seed=7
    )
    assert ws.bootstrap_stderr(ws.mean, xs, iters=500, seed=7) != ws.bootstrap_stderr(
        ws.mean, xs, iters=500, seed=8
    )


def test_bootstrap_stderr_vectorized_path_equals_per_resample_path():
    xs = list(np.random.default_rng(1).normal(size=50))
    fast = ws.bootstrap_stderr(ws.mean, xs, iters=300)
    slow = ws.bootstrap_stderr(lambda s: sum(s) / len(s), xs, iters=300)  # not in the batched table
    assert fast == pytest.approx(slow, rel=1e-9)


# --- mcnemar -----------------------------------------------------------------------------


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (0, 1), (3, 0), (2, 2), (5, 9), (1, 12), (20, 4), (0, 24)])
def test_mcnemar_exact_matches_scipy_binomtest(a_only, b_only):
    a, b = _pairs(a_only, b_only)
    r = ws.mcnemar(a, b)
    assert r["method"] == "exact"
    assert (r["n"], r["a_only"], r["b_only"]) == (len(a), a_only, b_only)
    d = a_only + b_only
    expected = 1.0 if d == 0 else sps.binomtest(a_only, d, 0.5, alternative="two-sided").pvalue
    assert r["p_value"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("a_only,b_only", [(25, 0), (13, 12), (20, 30), (5, 40), (100, 130)])
def test_mcnemar_chi2_with_continuity_correction(a_only, b_only):
    try:  # statsmodels is the usual reference; fall back to the formula written out here
        from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

        table = [[7, a_only], [b_only, 5]]
        expected = sm_mcnemar(table, exact=False, correction=True).pvalue
    except ImportError:
        stat = (abs(a_only - b_only) - 1) ** 2 / (a_only + b_only)
        expected = sps.chi2.sf(stat, df=1)
    r = ws.mcnemar(*_pairs(a_only, b_only))
    assert r["method"] == "chi2-cc"
    assert r["p_value"] == pytest.approx(expected, rel=1e-9)


def test_mcnemar_accepts_floats_and_bools():
    a, b = _pairs(4, 1)
    assert ws.mcnemar([float(x) for x in a], [bool(x) for x in b]) == ws.mcnemar(a, b)


@pytest.mark.parametrize(
    "a,b", [([1, 0, 1], [1, 0]), ([1, 0.5], [1, 0]), ([1, 0], [2, 0]), ([1], [math.nan])]
)
def test_mcnemar_rejects_bad_input(a, b):
    with pytest.raises(ValueError):
        ws.mcnemar(a, b)
    with pytest.raises(WeightsmithError):
        ws.mcnemar(a, b)


# --- paired_bootstrap --------------------------------------------------------------------


def _synthetic(delta: float, n: int = 500, noise: float = 0.5, seed: int = 3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = a + delta + rng.normal(scale=noise, size=n)
    return a.tolist(), b.tolist()


def test_paired_bootstrap_ci_covers_true_delta_and_p_is_small():
    a, b = _synthetic(0.3)
    r = ws.paired_bootstrap(a, b)
    assert r["delta"] == pytest.approx(statistics.fmean(b) - statistics.fmean(a))
    assert r["ci_low"] < 0.3 < r["ci_high"]
    assert r["ci_low"] < r["delta"] < r["ci_high"]
    assert r["p_value"] < 0.001
    assert r["iters"] == 10000


def test_paired_bootstrap_identical_runs_and_null_effect():
    a, _ = _synthetic(0.0)
    r = ws.paired_bootstrap(a, a)
    assert (r["delta"], r["ci_low"], r["ci_high"], r["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    a, b = _synthetic(0.0, noise=1.0, seed=11)
    r = ws.paired_bootstrap(a, b)
    assert r["ci_low"] < 0.0 < r["ci_high"]
    assert r["p_value"] > 0.05


def test_paired_bootstrap_is_deterministic_in_its_seed():
    a, b = _synthetic(0.05, n=100)
    assert ws.paired_bootstrap(a, b, iters=2000, seed=5) == ws.paired_bootstrap(a, b, iters=2000, seed=5)
    assert ws.paired_bootstrap(a, b, iters=2000, seed=5) != ws.paired_bootstrap(a, b, iters=2000, seed=6)


def test_paired_bootstrap_over_pairs_matches_per_resample_statistic():
    rng = np.random.default_rng(4)
    words = rng.integers(5, 50, size=80)
    a = [[float(-2.0 * w + rng.normal()), int(w)] for w in words]
    b = [[ll + 0.5 * w, w] for ll, w in a]  # higher loglikelihood: lower perplexity
    r = ws.paired_bootstrap(a, b, ws.weighted_perplexity, iters=500)
    ref = ws.paired_bootstrap(
        a, b, lambda items: math.exp(-sum(x for x, _ in items) / sum(w for _, w in items)), iters=500
    )
    assert r["delta"] == pytest.approx(
        math.exp(-sum(x for x, _ in b) / words.sum()) - math.exp(-sum(x for x, _ in a) / words.sum())
    )
    assert r["delta"] < 0
    for k in ("delta", "ci_low", "ci_high", "p_value"):
        assert r[k] == pytest.approx(ref[k], rel=1e-9)


def test_paired_bootstrap_rejects_mismatched_or_empty():
    with pytest.raises(ValueError):
        ws.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        ws.paired_bootstrap([], [])


# --- compare_runs ------------------------------------------------------------------------


def _run(label, acc, ppl, wppl, hib=True):
    return {
        "results": {
            "arc": {"alias": "arc", "acc,none": acc, "acc_stderr,none": 0.05},
            "wiki": {
                "alias": "wiki",
                "perplexity,none": ppl,
                "perplexity_stderr,none": "N/A",
                "word_perplexity,none": wppl,
                "word_perplexity_stderr,none": "N/A",
            },
        },
        "higher_is_better": {"arc": {"acc": hib}, "wiki": {"perplexity": False, "word_perplexity": False}},
        "weightsmith": {"label": label},
    }


def _samples(acc_by_doc: dict[int, float], ll_by_doc: dict[int, float], order=None):
    ids = order or sorted(acc_by_doc)
    return {
        "arc": [{"doc_id": i, "metrics": {"acc,none": acc_by_doc[i]}} for i in ids],
        "wiki": [
            {
                "doc_id": i,
                "metrics": {"perplexity,none": ll_by_doc[i], "word_perplexity,none": [ll_by_doc[i], 10]},
            }
            for i in ids
        ],
    }


def test_compare_runs_picks_tests_and_pairs_by_doc_id():
    n = 60
    acc_a = {i: float(i % 2) for i in range(n)}
    ll_a = {i: -3.0 - 0.01 * i for i in range(n)}
    # B: same outcomes per doc, listed in reverse (positional pairing would disagree on every
    # doc), plus a doc A never saw, which must be ignored.
    acc_b = dict(acc_a) | {999: 1.0}
    ll_b = dict(ll_a) | {999: -100.0}
    order_b = [999] + list(reversed(range(n)))
    runs = [_run("base", 0.5, 20.0, 7.0), _run("tuned", 0.5, 20.0, 7.0)]
    samples = [_samples(acc_a, ll_a), _samples(acc_b, ll_b, order_b)]
    cmp = ws.compare_runs(runs, samples)
    assert cmp["reference"] == "base" and cmp["labels"] == ["base", "tuned"]
    rows = {(r["task"], r["metric"]): r for r in cmp["rows"]}
    assert set(rows) == {("arc", "acc"), ("wiki", "perplexity"), ("wiki", "word_perplexity")}
    assert rows["arc", "acc"]["test"] == "mcnemar"
    assert rows["wiki", "perplexity"]["test"] == "paired_bootstrap"
    assert rows["wiki", "word_perplexity"]["test"] == "paired_bootstrap"
    for r in rows.values():
        assert r["n"]["tuned"] == n
        assert r["p_value"]["tuned"] == 1.0
        assert r["better"]["tuned"] is None
        assert r["filter"] == "none"
    # Identical runs: a paired bootstrap of a perplexity has nothing to vary, but an accuracy
    # difference gets Newcombe's paired interval, which does not claim it is exactly 0.
    assert rows["wiki", "perplexity"]["ci"]["tuned"] == [0.0, 0.0]
    assert rows["wiki", "perplexity"]["interval"] == {"method": "paired-bootstrap", "level": 0.95}
    lo, hi = rows["arc", "acc"]["ci"]["tuned"]
    assert lo < -0.01 and hi > 0.01
    assert rows["arc", "acc"]["interval"] == {"method": "newcombe-paired", "level": 0.95}
    assert rows["arc", "acc"]["stderr"] == {"base": 0.05, "tuned": 0.05}
    assert rows["wiki", "perplexity"]["stderr"] == {"base": None, "tuned": None}  # "N/A"


def test_compare_runs_significance_direction():
    n = 80
    acc_a = {i: 0.0 if i < 40 else 1.0 for i in range(n)}
    acc_b = {i: 1.0 for i in range(n)}  # right on 40 docs A got wrong: McNemar chi2, p tiny
    ll_a = {i: -3.0 + 0.1 * math.sin(i) for i in range(n)}
    ll_b = {i: v + 0.5 for i, v in ll_a.items()}  # higher loglikelihood: lower perplexity
    runs = [_run("base", 0.5, math.exp(3.0), 1.35), _run("tuned", 1.0, math.exp(2.5), 1.28)]
    cmp = ws.compare_runs(runs, [_samples(acc_a, ll_a), _samples(acc_b, ll_b)], iters=2000)
    rows = {(r["task"], r["metric"]): r for r in cmp["rows"]}
    acc = rows["arc", "acc"]
    assert acc["p_value"]["tuned"] == ws.mcnemar(list(acc_a.values()), list(acc_b.values()))["p_value"]
    assert acc["p_value"]["tuned"] < 1e-6
    assert acc["delta"]["tuned"] == pytest.approx(0.5)
    assert acc["better"]["tuned"] is True
    # 40 of 80 documents flipped to right, none to wrong: Newcombe's paired interval.
    ref = newcombe_paired(40, 40, 0, 0)
    assert acc["ci"]["tuned"] == pytest.approx(list(ref))
    assert 0 < acc["ci"]["tuned"][0] < 0.5 < acc["ci"]["tuned"][1] < 1
    ppl = rows["wiki", "perplexity"]
    assert ppl["higher_is_better"] is False
    assert ppl["delta"]["tuned"] == pytest.approx(math.exp(2.5) - math.exp(3.0))
    assert ppl["better"]["tuned"] is True
    lo, hi = ppl["ci"]["tuned"]
    true_delta = math.exp(-statistics.fmean(ll_b.values())) - math.exp(-statistics.fmean(ll_a.values()))
    assert lo <= true_delta <= hi < 0
    # Swap the reference: the same differences are now significantly worse.
    cmp2 = ws.compare_runs(runs, [_samples(acc_a, ll_a), _samples(acc_b, ll_b)], reference=1, iters=2000)
    assert all(r["better"]["base"] is False for r in cmp2["rows"])


def test_compare_runs_reads_lm_eval_raw_sample_layout():
    # lm-eval's samples_*.jsonl: metric values at the top level, one record per filter.
    recs_a = [{"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": float(i < 30)} for i in range(60)]
    recs_b = [{"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": 1.0} for i in range(60)]
    recs_b += [{"doc_id": i, "filter": "strict", "metrics": ["acc"], "acc": 0.0} for i in range(60)]
    runs = [_run("a", 0.5, 1.0, 1.0), _run("b", 1.0, 1.0, 1.0)]
    cmp = ws.compare_runs(runs, [{"arc": recs_a}, {"arc": recs_b}])
    acc = next(r for r in cmp["rows"] if r["metric"] == "acc")
    assert acc["test"] == "mcnemar" and acc["n"]["b"] == 60 and acc["better"]["b"] is True
    wiki = next(r for r in cmp["rows"] if r["task"] == "wiki")
    assert wiki["test"] is None and wiki["p_value"]["b"] is None and wiki["n"]["b"] == 0


def test_compare_runs_rejects_duplicate_labels_and_bad_reference():
    runs = [_run("same", 0.5, 1.0, 1.0), _run("same", 0.5, 1.0, 1.0)]
    with pytest.raises(ValueError, match="distinct"):
        ws.compare_runs(runs, [{}, {}])
    with pytest.raises(ValueError, match="reference"):
        ws.compare_runs(runs[:1], [{}], reference=1)


def _group_runs(weighted: bool):
    """Two runs of a group `g` over tasks `a` and `b` (20 documents each, the same doc ids), where
    the second run gets 4 more documents right in each task and none wrong."""
    base = {t: {i: float(i < 10) for i in range(20)} for t in "ab"}
    tuned = {t: {i: float(i < 14) for i in range(20)} for t in "ab"}
    runs, samples = [], []
    for label, acc in (("base", base), ("tuned", tuned)):
        res = {t: {"alias": t, "acc,none": statistics.fmean(acc[t].values())} for t in "ab"}
        res["g"] = {"alias": "g", "acc,none": statistics.fmean([*acc["a"].values(), *acc["b"].values()])}
        runs.append({
            "results": res, "higher_is_better": {t: {"acc": True} for t in "abg"},
            "group_subtasks": {"g": ["a", "b"]},
            "group_configs": {"g": {"aggregate_metric_list": [{"metric": "acc", "weight_by_size": weighted}]}},
            "weightsmith": {"label": label},
        })  # fmt: skip
        samples.append(
            {t: [{"doc_id": i, "metrics": {"acc,none": v}} for i, v in acc[t].items()] for t in "ab"}
        )
    return runs, samples


def test_compare_runs_tests_a_size_weighted_group_on_its_pooled_documents():
    runs, samples = _group_runs(weighted=True)
    rows = {r["task"]: r for r in ws.compare_runs(runs, samples)["rows"]}
    # Each task alone: 4 discordant documents, all one way: exact McNemar p = 2 / 2**4.
    for t in "ab":
        assert rows[t]["p_value"]["tuned"] == pytest.approx(0.125)
        assert rows[t]["better"]["tuned"] is None
    # The group pools the 40 documents (a's doc 3 and b's doc 3 are two documents): 8 discordant,
    # p = 2 / 2**8, and Newcombe's paired interval for 8 of 40 changed one way.
    g = rows["g"]
    assert g["test"] == "mcnemar" and g["n"]["tuned"] == 40
    assert g["p_value"]["tuned"] == pytest.approx(2 / 2**8)
    assert g["delta"]["tuned"] == pytest.approx(0.2)
    assert g["ci"]["tuned"] == pytest.approx(list(newcombe_paired(20, 8, 0, 12)))
    assert g["better"]["tuned"] is True


def test_compare_runs_leaves_a_group_of_plain_means_untested():
    runs, samples = _group_runs(weighted=False)
    g = {r["task"]: r for r in ws.compare_runs(runs, samples)["rows"]}["g"]
    assert g["test"] is None and g["p_value"]["tuned"] is None and g["delta"]["tuned"] == pytest.approx(0.2)
