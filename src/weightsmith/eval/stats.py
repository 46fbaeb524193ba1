"""Statistics for comparing evaluation runs: standard errors, paired tests, a comparison table.

Standard errors follow lm-evaluation-harness (`mean_stderr` is its formula); paired tests
are McNemar for per-document 0/1 outcomes, with Newcombe's paired score interval for the
difference of the two accuracies (`eval.intervals`), and a paired bootstrap otherwise (a
perplexity or a weighted mean is not a proportion). Inputs are lm-eval's results.json layout
and its per-document sample records. Pure Python + numpy.
Not here: intervals for proportions (`eval.intervals`), running evaluations, reading files,
or rendering (see weightsmith.report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from weightsmith.errors import WeightsmithError
from weightsmith.eval.intervals import describe, is_binary, paired_difference
from weightsmith.report.runs import metric_keys, run_label

ALPHA = 0.05  # significance level behind `better` and the 95% intervals
_EXACT_BELOW = 25  # McNemar: exact binomial below this many discordant pairs


class EvalStatsError(WeightsmithError, ValueError):
    """Inputs to a statistical test that cannot be compared (lengths, non-binary values)."""


# --- aggregations (lm-eval's, over per-document values) ---------------------------------


def mean(items: Sequence[float]) -> float:
    return sum(items) / len(items)


def perplexity(items: Sequence[float]) -> float:
    """exp(-mean loglikelihood), lm-eval's `perplexity` aggregation."""
    return math.exp(-mean(items))


def weighted_mean(items: Sequence[Sequence[float]]) -> float:
    """sum(ll) / sum(weight) over (ll, weight) pairs."""
    return sum(ll for ll, _ in items) / sum(w for _, w in items)


def weighted_perplexity(items: Sequence[Sequence[float]]) -> float:
    """exp(-sum(ll)/sum(w)): lm-eval's word_perplexity and byte_perplexity."""
    return math.exp(-weighted_mean(items))


def bits_per_byte(items: Sequence[Sequence[float]]) -> float:
    """-sum(ll)/sum(bytes)/ln 2, lm-eval's `bits_per_byte`."""
    return -weighted_mean(items) / math.log(2)


# Vectorized versions over resampled batches: (K, N) for floats, (K, N, 2) for pairs -> (K,).
# Used when `statistic` is one of the functions above; other callables run per resample.
_BATCHED: dict[Callable[..., float], Callable[[np.ndarray], np.ndarray]] = {
    mean: lambda x: x.mean(axis=1),
    perplexity: lambda x: np.exp(-x.mean(axis=1)),
    weighted_mean: lambda x: x[..., 0].sum(axis=1) / x[..., 1].sum(axis=1),
    weighted_perplexity: lambda x: np.exp(-x[..., 0].sum(axis=1) / x[..., 1].sum(axis=1)),
    bits_per_byte: lambda x: -x[..., 0].sum(axis=1) / x[..., 1].sum(axis=1) / math.log(2),
}

# Which aggregation lm-eval uses for a metric whose per-document values are (ll, weight).
_PAIR_AGGREGATIONS: dict[str, Callable[..., float]] = {
    "word_perplexity": weighted_perplexity,
    "byte_perplexity": weighted_perplexity,
    "bits_per_byte": bits_per_byte,
}


def aggregation_for(metric: str, values: Sequence[Any]) -> Callable[..., float]:
    """lm-eval's aggregation for `metric`, given what its per-document values look like."""
    if metric == "perplexity":
        return perplexity
    if values and isinstance(values[0], (list, tuple)):
        return _PAIR_AGGREGATIONS.get(metric, weighted_mean)
    return mean


# --- standard errors -------------------------------------------------------------------


def mean_stderr(xs: Sequence[float]) -> float:
    """Sample std (ddof=1) / sqrt(n), as lm-eval's `mean_stderr`; NaN for fewer than 2 items."""
    n = len(xs)
    if n < 2:
        return math.nan
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def _index_chunks(rng: np.random.Generator, n: int, iters: int) -> Iterator[np.ndarray]:
    """Resampled index arrays (k, n), k summing to `iters`, at most ~2M indices per chunk."""
    step = max(1, 2_000_000 // max(n, 1))
    for start in range(0, iters, step):
        yield rng.integers(0, n, size=(min(step, iters - start), n))


def _resampled_stats(
    statistic: Callable[..., float], batches: list[np.ndarray | None], items: list[Sequence], idx: np.ndarray
) -> list[np.ndarray]:
    """The statistic on each row of `idx`, for each item list (vectorized when possible)."""
    out = []
    batched = _BATCHED.get(statistic)
    for arr, seq in zip(batches, items, strict=True):
        if batched is not None and arr is not None:
            out.append(batched(arr[idx]))
        else:
            out.append(np.array([statistic([seq[i] for i in row]) for row in idx], dtype=float))
    return out


def _as_array(items: Sequence) -> np.ndarray | None:
    try:
        return np.asarray(items, dtype=float)
    except (TypeError, ValueError):
        return None  # ragged or non-numeric: the per-resample path handles it


def _bootstrap(statistic: Callable[[Sequence], float], items: Sequence, iters: int, seed: int, name: str):
    """`statistic` on each of `iters` seeded resamples (with replacement) of `items`."""
    if len(items) == 0:
        raise EvalStatsError(f"{name}: no items to resample")
    if iters < 1:
        raise EvalStatsError(f"{name}: iters must be at least 1, got {iters}")
    rng = np.random.default_rng(seed)
    items = list(items)
    arr = _as_array(items)
    chunks = _index_chunks(rng, len(items), iters)
    return np.concatenate([_resampled_stats(statistic, [arr], [items], idx)[0] for idx in chunks])


def bootstrap_stderr(
    statistic: Callable[[Sequence], float], items: Sequence, iters: int = 1000, seed: int = 1234
) -> float:
    """Std (ddof=1) of `statistic` over `iters` resamples of `items` with replacement."""
    stats = _bootstrap(statistic, items, iters, seed, "bootstrap_stderr")
    return float(np.std(stats, ddof=1)) if iters > 1 else math.nan


def bootstrap_ci(
    items: Sequence, statistic: Callable[[Sequence], float] = mean, iters: int = 10000, seed: int = 1234
) -> tuple[float, float]:
    """The 95% percentile interval of `statistic` over `iters` resamples of `items`."""
    stats = _bootstrap(statistic, items, iters, seed, "bootstrap_ci")
    lo, hi = np.percentile(stats, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(lo), float(hi)


# --- paired tests ----------------------------------------------------------------------


def _binary(xs: Sequence[float], name: str) -> list[int]:
    out = []
    for i, x in enumerate(xs):
        if isinstance(x, (int, float)) and x in (0, 1):
            out.append(int(x))
        else:
            raise EvalStatsError(f"mcnemar: {name}[{i}] = {x!r} is not 0 or 1; pass per-item correctness")
    return out


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """McNemar's exact two-sided p from the discordant counts: twice the smaller binomial(d, 1/2)
    tail of d = a_only + b_only (the distribution is symmetric), capped at 1; 1 when d = 0.
    Integer arithmetic until the one division, so any d works."""
    d = a_only + b_only
    if d == 0:
        return 1.0
    tail = sum(math.comb(d, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**d)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """McNemar's test on paired 0/1 outcomes of models A and B on the same items.

    Exact two-sided binomial test on the discordant pairs when there are fewer than 25,
    else chi-square (1 df) with Edwards' continuity correction, (|b-c|-1)^2/(b+c), as R's
    `mcnemar.test` and statsmodels compute it.
    """
    if len(a) != len(b):
        raise EvalStatsError(f"mcnemar: {len(a)} outcomes for A but {len(b)} for B; pair the same items")
    xa, xb = _binary(a, "a"), _binary(b, "b")
    a_only = sum(1 for u, v in zip(xa, xb, strict=True) if u == 1 and v == 0)
    b_only = sum(1 for u, v in zip(xa, xb, strict=True) if u == 0 and v == 1)
    d = a_only + b_only
    if d < _EXACT_BELOW:
        method = "exact"
        p = mcnemar_exact(a_only, b_only)
    else:
        method = "chi2-cc"
        stat = (abs(a_only - b_only) - 1) ** 2 / d
        p = math.erfc(math.sqrt(stat / 2))  # survival function of chi-square with 1 df
    return {"n": len(xa), "a_only": a_only, "b_only": b_only, "p_value": p, "method": method}


def paired_bootstrap(
    a: Sequence,
    b: Sequence,
    statistic: Callable[[Sequence], float] = mean,
    iters: int = 10000,
    seed: int = 1234,
) -> dict[str, Any]:
    """Paired bootstrap of statistic(b) - statistic(a), resampling item indices jointly.

    `a[i]` and `b[i]` are the two runs' values on the same item (a float, or an (ll, weight)
    pair for weighted statistics). The interval is the 95% percentile interval of the
    resampled deltas; p is two-sided, 2 * min(P(delta* <= 0), P(delta* >= 0)), capped at 1.
    """
    if len(a) != len(b):
        raise EvalStatsError(f"paired_bootstrap: {len(a)} items for A but {len(b)} for B")
    if len(a) == 0:
        raise EvalStatsError("paired_bootstrap: no paired items")
    if iters < 1:
        raise EvalStatsError(f"paired_bootstrap: iters must be at least 1, got {iters}")
    a, b = list(a), list(b)
    rng = np.random.default_rng(seed)
    arrays = [_as_array(a), _as_array(b)]
    deltas = []
    for idx in _index_chunks(rng, len(a), iters):
        sa, sb = _resampled_stats(statistic, arrays, [a, b], idx)
        deltas.append(sb - sa)
    d = np.concatenate(deltas)
    lo, hi = np.percentile(d, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {
        "delta": statistic(b) - statistic(a),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": p,
        "iters": iters,
    }


# --- comparing lm-eval runs ------------------------------------------------------------


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def doc_values(records: list[dict], metric: str, filt: str) -> dict[int, Any]:
    """doc_id -> per-document value; `metrics` dict as documented, or lm-eval's raw layout."""
    out = {}
    key = f"{metric},{filt}"
    for rec in records:
        m = rec.get("metrics")
        if isinstance(m, dict):
            if key in m:
                out[rec["doc_id"]] = m[key]
        elif rec.get("filter", "none") == filt and metric in rec:  # samples_*.jsonl as lm-eval writes it
            out[rec["doc_id"]] = rec[metric]
    return out


def _paired_test(
    ref: dict[int, Any], other: dict[int, Any], metric: str, binary: bool, iters: int, seed: int
) -> dict[str, Any] | None:
    ids = sorted(set(ref) & set(other))
    if not ids:
        return None
    xa, xb = [ref[i] for i in ids], [other[i] for i in ids]
    agg = aggregation_for(metric, xa)
    if binary and agg is mean:  # a difference of two accuracies on the same documents
        d = paired_difference(xa, xb)
        p = mcnemar(xa, xb)["p_value"]
        return {
            "n": len(ids),
            "delta": d["delta"],
            "p": p,
            "ci": [d["ci_low"], d["ci_high"]],
            "method": d["method"],
        }
    # Not a proportion (perplexity, a weighted mean, a continuous score): paired bootstrap.
    boot = paired_bootstrap(xa, xb, agg, iters=iters, seed=seed)
    p = mcnemar(xa, xb)["p_value"] if binary else boot["p_value"]
    ci = [boot["ci_low"], boot["ci_high"]]
    return {"n": len(ids), "delta": boot["delta"], "p": p, "ci": ci, "method": "paired-bootstrap"}


def compare_runs(
    runs: list[dict],
    samples: list[dict[str, list[dict]]],
    reference: int = 0,
    *,
    iters: int = 10000,
    seed: int = 1234,
) -> dict[str, Any]:
    """A comparison table of every run against `runs[reference]`, one row per task/metric/filter.

    Documents are paired by doc_id (only those present in both runs). McNemar and Newcombe's
    paired score interval when every paired per-document value is 0/1 in all runs, else a
    paired bootstrap of the metric's lm-eval aggregation. delta/p_value/ci/better/n are given
    for the non-reference labels; `interval` names the row's interval method and level.
    """
    if len(samples) != len(runs):
        raise EvalStatsError(f"compare_runs: {len(runs)} runs but {len(samples)} sample sets")
    if not 0 <= reference < len(runs):
        raise EvalStatsError(f"compare_runs: reference {reference} is not one of {len(runs)} runs")
    labels = [run_label(r, i) for i, r in enumerate(runs)]
    if len(set(labels)) != len(labels):
        raise EvalStatsError(f"compare_runs: labels {labels} are not distinct; set weightsmith.label")
    ref_run = runs[reference]
    rows = []
    for task, task_results in ref_run.get("results", {}).items():
        hib_task = (ref_run.get("higher_is_better") or {}).get(task) or {}
        for metric, filt in metric_keys(task_results):
            cell = (task, metric, filt, hib_task.get(metric))
            rows.append(_comparison_row(cell, runs, samples, labels, reference, iters, seed))
    return {"reference": labels[reference], "labels": labels, "rows": rows}


def _comparison_row(
    cell: tuple[str, str, str, Any],
    runs: list[dict],
    samples: list[dict[str, list[dict]]],
    labels: list[str],
    reference: int,
    iters: int,
    seed: int,
) -> dict[str, Any]:
    """One row of `compare_runs`: `cell` is (task, metric, filter, higher_is_better)."""
    task, metric, filt, hib = cell
    key, se_key = f"{metric},{filt}", f"{metric}_stderr,{filt}"
    res = [(r.get("results") or {}).get(task) or {} for r in runs]
    members = _pooled_members(runs[reference], task, metric, filt)
    if members is None:
        docs = [doc_values((s or {}).get(task) or [], metric, filt) for s in samples]
    else:  # a size-weighted group: its value is the mean over its members' documents, pooled
        docs = [
            {(m, i): v for m in members for i, v in doc_values((s or {}).get(m) or [], metric, filt).items()}
            for s in samples
        ]
    present = [d for d in docs if d]
    binary = bool(present) and all(is_binary(list(d.values())) for d in present)
    row: dict[str, Any] = {
        "task": task,
        "metric": metric,
        "filter": filt,
        "higher_is_better": hib,
        "values": {labels[i]: _number(res[i].get(key)) for i in range(len(runs))},
        "stderr": {labels[i]: _number(res[i].get(se_key)) for i in range(len(runs))},
        "delta": {},
        "test": None,
        "p_value": {},
        "ci": {},
        "interval": None,
        "better": {},
        "n": {},
    }
    ref_v = row["values"][labels[reference]]
    for i, lab in enumerate(labels):
        if i == reference:
            continue
        v = row["values"][lab]
        row["delta"][lab] = v - ref_v if v is not None and ref_v is not None else None
        t = _paired_test(docs[reference], docs[i], metric, binary, iters, seed)
        if t is not None:
            row["test"] = "mcnemar" if binary else "paired_bootstrap"
            row["interval"] = describe(t["method"])
        sig = t is not None and t["p"] < ALPHA and hib is not None and t["delta"] != 0
        row["p_value"][lab] = t["p"] if t else None
        row["ci"][lab] = t["ci"] if t else None
        row["n"][lab] = t["n"] if t else 0
        row["better"][lab] = ((t["delta"] > 0) == bool(hib)) if sig else None
    return row


def _pooled_members(run: dict, task: str, metric: str, filt: str) -> list[str] | None:
    """The member tasks of `task` when it is a group whose `metric` is a mean weighted by size
    (as `core` is): then the group's value is the mean over every member document, and the
    documents pool into one paired test. None for a task, or a group of plain means (a mean of
    means is not a proportion of pooled documents: no test, as before)."""
    members = (run.get("group_subtasks") or {}).get(task) or []
    specs = ((run.get("group_configs") or {}).get(task) or {}).get("aggregate_metric_list") or []
    for spec in specs:
        if spec.get("metric") == metric and filt in (spec.get("filter_list") or ["none"]):
            return list(members) if members and spec.get("weight_by_size", True) else None
    return None
