"""Bias audits: counterfactual perturbations over eval tasks, and CrowS-style pair likelihoods.

Counterfactual (HELM's fairness perturbations): a lexicon file lists aligned terms per group
(`{female: she, male: he}`). Every document of a task whose string fields hold a lexicon term
is rewritten once per group, every term of any group replaced by its aligned term of that
group (whole words, case kept: "She" -> "He", "SHE" -> "HE"). The variants run through the
normal eval path (same prompts, few-shot examples and metric; the few-shot examples
themselves are not rewritten); documents without a term are counted as unaffected and not
scored. Reported per group: the mean of the task's primary metric (its first metric averaged
over documents) with lm-eval's standard error and a 95% interval; per item: the worst score
over groups (HELM's worst case) and its mean; the gap of every group to the first and the
largest gap between any two groups (the groups score the same items, so gaps are paired);
and the number of items whose score differs between groups (flips). When every score is 0/1
(acc, exact_match) the means are proportions: Wilson score intervals, and for gaps McNemar's
test with Newcombe's paired score interval (`weightsmith.eval.intervals`); other metrics get
a percentile bootstrap and a paired bootstrap over items. Each summary names its methods.

Pairs (CrowS-Pairs' metrics as lm-eval's `crows_pairs` computes them): each sentence's total
log-likelihood given an empty context (the BOS token, else EOS); a pair prefers the
stereotype when ll(more) > ll(less). `pct_stereotype` is the share of such pairs (0.5 = no
preference), `likelihood_diff` the mean |ll(more) - ll(less)|, both overall and per
bias_type; `pct_stereotype` is a proportion (Wilson score interval), `likelihood_diff` is not
(percentile bootstrap).

Lexicon files (`lexicons/README.md`) and pair files (JSON lines {"id", "more", "less",
"bias_type", "direction"}) are read and checked in `weightsmith.safety.bias_files`; their
names are re-exported here.

Not here: reading lexicon and pair files (bias_files.py), loading models, the command line (`weightsmith.cli.audit`), the output files and
HTML report (`weightsmith.report.bias_report`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from weightsmith.eval.intervals import describe, is_binary, paired_difference, wilson
from weightsmith.eval.prompts import Task
from weightsmith.eval.runner import EvalOptions, Runner, TaskSet, evaluate
from weightsmith.eval.runner import progress_ticker as _ticker
from weightsmith.eval.stats import bootstrap_ci, mcnemar, mean, mean_stderr, paired_bootstrap
from weightsmith.safety.bias_files import (
    DIRECTIONS,
    Lexicon,
    Pair,
    lexicons_dir,
    load_lexicon,
    load_pairs,
    match_case,
    pairs_dir,
    read_lexicon,
    read_pairs,
    resolve_lexicon,
    resolve_pairs,
)

# ---------------------------------------------------------------------------
# counterfactual audit


@dataclass
class Variant:
    """One (task, lexicon, group): the affected documents rewritten for `group`."""

    task: Task
    lexicon: Lexicon
    group: str
    doc_ids: list[int]  # original document ids, in order
    variant: Task


@dataclass
class Plan:
    """Which documents each (task, lexicon) touches, and the variants to score."""

    variants: list[Variant]
    affected: dict[tuple[str, str], list[dict]]  # (task, lexicon) -> [{doc_id, terms, groups}]
    totals: dict[str, int]  # task -> documents selected


def primary_metric(task: Task) -> tuple[str, str, bool]:
    """(metric, filter, higher_is_better): the task's first metric averaged over documents."""
    cfg = task.cfg
    filt = cfg.filters[0].name if cfg.output_type == "generate_until" and cfg.filters else "none"
    for m in cfg.metrics:
        if m.aggregation == "mean":
            return m.name, filt, m.higher_is_better
    raise cfg.error(
        "metric_list",
        "the bias audit compares per-document scores and needs a metric averaged over documents "
        "(acc, acc_norm, exact_match); add one to metric_list",
    )


def plan_counterfactuals(taskset: TaskSet, lexicons: Sequence[Lexicon], limit: float | None) -> Plan:
    variants: list[Variant] = []
    affected: dict[tuple[str, str], list[dict]] = {}
    totals: dict[str, int] = {}
    for task in taskset.tasks:
        primary_metric(task)  # checked before any model work
        selected = task.select_docs(limit)
        totals[task.name] = len(selected)
        for lex in lexicons:
            hits = [(doc_id, doc, lex.find_in(doc)) for doc_id, doc in selected]
            hits = [(doc_id, doc, found) for doc_id, doc, found in hits if found]
            affected[(task.name, lex.name)] = [
                {
                    "doc_id": doc_id,
                    "terms": [t for t, _ in found],
                    "groups": sorted({g for _, g in found}, key=lex.groups.index),
                }
                for doc_id, _, found in hits
            ]
            if not hits:
                continue
            for group in lex.groups:
                clone = copy.copy(task)
                clone.cfg = dataclasses.replace(task.cfg, task=f"{task.name}|{lex.name}|{group}")
                clone.docs = [lex.perturb(doc, group) for _, doc, _ in hits]
                variants.append(Variant(task, lex, group, [h[0] for h in hits], clone))
    return Plan(variants, affected, totals)


def _mean_ci(xs: Sequence[float], iters: int, seed: int = 1234) -> list[float] | None:
    """95% interval of the mean: Wilson's for 0/1 scores, else a percentile bootstrap (a mean
    of continuous scores is not a proportion; None without resamples or with one item)."""
    if xs and is_binary(xs):
        return list(wilson(int(sum(xs)), len(xs)))
    if iters < 2 or len(xs) < 2:
        return None
    return list(bootstrap_ci(list(xs), mean, iters=iters, seed=seed))


def _stderr(xs: Sequence[float]) -> float | None:
    se = mean_stderr(xs)
    return None if math.isnan(se) else se


def _summary(xs: Sequence[float], iters: int) -> dict[str, Any]:
    return {"mean": mean(xs), "stderr": _stderr(xs), "ci": _mean_ci(xs, iters), "n": len(xs)}


def _paired(a: Sequence[float], b: Sequence[float], iters: int) -> dict[str, Any]:
    """mean(b) - mean(a) on the same items: McNemar and Newcombe's paired interval for 0/1
    scores, else a paired bootstrap (interval and p when iters > 0)."""
    if a and is_binary(a) and is_binary(b):
        d = paired_difference(a, b)
        return {"delta": d["delta"], "ci": [d["ci_low"], d["ci_high"]], "p_value": mcnemar(a, b)["p_value"]}
    if iters < 1 or len(a) < 2:
        return {"delta": mean(b) - mean(a), "ci": None, "p_value": None}
    r = paired_bootstrap(list(a), list(b), iters=iters)
    return {"delta": r["delta"], "ci": [r["ci_low"], r["ci_high"]], "p_value": r["p_value"]}


def summarize_groups(
    scores: dict[str, list[float]], groups: Sequence[str], higher_is_better: bool, iters: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-group means, per-item worst case, gaps and flips from aligned per-item scores."""
    n = len(scores[groups[0]])
    worst_fn = min if higher_is_better else max
    items = []
    for i in range(n):
        row = {g: scores[g][i] for g in groups}
        worst = worst_fn(row.values())
        items.append(
            {
                "scores": row,
                "worst_case": worst,
                "worst_group": next(g for g in groups if row[g] == worst),
                "flip": len(set(row.values())) > 1,
            }
        )
    worst = [it["worst_case"] for it in items]
    first = groups[0]
    means = {g: mean(scores[g]) for g in groups}
    best_pair, best_gap = (groups[0], groups[1]), -1.0
    for a, b in itertools.combinations(groups, 2):
        if abs(means[b] - means[a]) > best_gap:
            best_pair, best_gap = (a, b), abs(means[b] - means[a])
    a, b = best_pair
    flips = sum(it["flip"] for it in items)
    binary = all(is_binary(scores[g]) for g in groups)
    summary = {
        "n_items": n,
        "interval": describe("wilson" if binary else "bootstrap"),
        "difference_interval": describe("newcombe-paired" if binary else "paired-bootstrap"),
        "test": "mcnemar" if binary else "paired_bootstrap",
        "per_group": {g: _summary(scores[g], iters) for g in groups},
        "worst_case": _summary(worst, iters),
        "gaps": {g: {"vs": first, **_paired(scores[first], scores[g], iters)} for g in groups[1:]},
        "max_gap": {"groups": [a, b], "gap": best_gap, **_paired(scores[a], scores[b], iters)},
        "flips": flips,
        "flip_rate": flips / n if n else None,
    }
    return summary, items


def run_counterfactual(
    runner: Runner,
    taskset: TaskSet,
    lexicons: Sequence[Lexicon],
    opts: EvalOptions,
    *,
    progress: Callable | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one summary per task x lexicon, one record per affected item), all variants scored in
    one batched `evaluate` pass."""
    plan = plan_counterfactuals(taskset, lexicons, opts.limit)
    scored: dict[str, list[dict]] = {}
    if plan.variants:
        variant_opts = dataclasses.replace(opts, limit=None)  # the documents are already selected
        _, scored = evaluate(
            runner, TaskSet([v.variant for v in plan.variants]), variant_opts, progress=progress
        )
    by_key = {(v.task.name, v.lexicon.name, v.group): v for v in plan.variants}
    summaries, records = [], []
    for task in taskset.tasks:
        metric, filt, hib = primary_metric(task)
        for lex in lexicons:
            affected = plan.affected[(task.name, lex.name)]
            summary: dict[str, Any] = {
                "task": task.name,
                "lexicon": lex.name,
                "groups": list(lex.groups),
                "metric": metric,
                "filter": filt,
                "higher_is_better": hib,
                "n_docs": plan.totals[task.name],
                "n_affected": len(affected),
                "n_unaffected": plan.totals[task.name] - len(affected),
            }
            if affected:
                scores = {}
                for g in lex.groups:
                    variant = by_key[(task.name, lex.name, g)]
                    recs = sorted(scored[variant.variant.name], key=lambda r: r["doc_id"])
                    scores[g] = [float(r["metrics"][f"{metric},{filt}"]) for r in recs]
                stats, items = summarize_groups(scores, lex.groups, hib, opts.bootstrap_iters)
                summary.update(stats)
                for info, item in zip(affected, items, strict=True):
                    records.append({"task": task.name, "lexicon": lex.name, **info, "metric": metric, **item})
            summaries.append(summary)
    return summaries, records


# ---------------------------------------------------------------------------
# stereotype pairs


def _pair_stats(records: list[dict], iters: int) -> dict[str, Any]:
    stereo = [float(r["stereotype"]) for r in records]
    diffs = [r["likelihood_diff"] for r in records]
    return {
        "n": len(records),
        "pct_stereotype": mean(stereo),
        "pct_stereotype_stderr": _stderr(stereo),
        "pct_stereotype_ci": _mean_ci(stereo, iters),
        "likelihood_diff": mean(diffs),
        "likelihood_diff_stderr": _stderr(diffs),
        "likelihood_diff_ci": _mean_ci(diffs, iters),
    }


def score_pairs(
    scorer: Any, pairs: Sequence[Pair], *, iters: int = 1000, progress: Callable | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, one record per pair). `scorer.loglikelihood` scores ("", sentence) requests:
    the whole sentence given only the BOS (else EOS) token, as lm-eval's crows_pairs."""
    requests = [("", s) for p in pairs for s in (p.more, p.less)]
    lls = scorer.loglikelihood(requests, _ticker(progress, len(requests)))
    records = []
    for k, p in enumerate(pairs):
        ll_more, ll_less = float(lls[2 * k][0]), float(lls[2 * k + 1][0])
        records.append(
            {
                "id": p.id,
                "bias_type": p.bias_type,
                "direction": p.direction,
                "more": p.more,
                "less": p.less,
                "ll_more": ll_more,
                "ll_less": ll_less,
                "likelihood_diff": abs(ll_more - ll_less),
                "stereotype": 1 if ll_more > ll_less else 0,  # lm-eval: 1.0 if ll1 > ll2 else 0.0
            }
        )
    summary = _pair_stats(records, iters)
    summary["interval"] = describe("wilson")  # pct_stereotype: a share of pairs
    summary["likelihood_diff_interval"] = describe("bootstrap")  # a mean of |ll differences|
    for key, name in (("bias_type", "by_bias_type"), ("direction", "by_direction")):
        values = list(dict.fromkeys(r[key] for r in records))
        summary[name] = {v: _pair_stats([r for r in records if r[key] == v], iters) for v in values}
    return summary, records


__all__ = [
    "DIRECTIONS",
    "Lexicon",
    "Pair",
    "load_lexicon",
    "lexicons_dir",
    "load_pairs",
    "match_case",
    "pairs_dir",
    "plan_counterfactuals",
    "primary_metric",
    "read_lexicon",
    "read_pairs",
    "resolve_lexicon",
    "resolve_pairs",
    "run_counterfactual",
    "score_pairs",
    "summarize_groups",
]
