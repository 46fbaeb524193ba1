"""Per-document metrics and their aggregation, with lm-eval's exact definitions.

Per document (lm-eval's `ConfigurableTask.process_results`):
- multiple_choice: `acc` (argmax of the choices' summed log-likelihoods is gold),
  `acc_norm` (the same after dividing each by its choice's length in characters),
  `acc_bytes` (by its length in UTF-8 bytes), `exact_match` (the gold choice is the
  greedy continuation), `f1` ((gold, prediction) pairs for a binary F1).
- loglikelihood: `perplexity` (the log-likelihood, aggregated as exp(-mean)), `acc`
  (the continuation is the greedy one).
- loglikelihood_rolling: `(log-likelihood, words | bytes)` pairs for word_perplexity,
  byte_perplexity and bits_per_byte.
- generate_until: `exact_match` after the filters, with `ignore_case`,
  `ignore_punctuation`, `ignore_numbers` and `regexes_to_ignore` as HF evaluate's.

Standard errors: sample std / sqrt(n) for means (lm-eval's `mean_stderr`); a seeded
bootstrap for every other aggregation.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

from weightsmith.errors import ConfigError
from weightsmith.eval import stats
from weightsmith.eval.prompts import gold_index
from weightsmith.eval.stats import bootstrap_stderr, mean_stderr
from weightsmith.eval.tasks import FilterSpec, MetricSpec

#: Shown next to each value in reports.
DEFINITIONS = {
    "acc": "share of documents where the highest-likelihood choice (summed token log-probabilities) is the gold one"
    " (loglikelihood tasks: share where the target is the greedy continuation)",
    "acc_norm": "as acc, with each choice's log-likelihood divided by its length in characters (lm-eval's acc_norm)",
    "acc_bytes": "as acc, with each choice's log-likelihood divided by its length in UTF-8 bytes",
    "exact_match": "share of documents whose (filtered) answer equals the target string"
    " (multiple choice: the gold choice is the greedy continuation)",
    "f1": "binary F1 of predicted vs gold choice index (positive class 1), as lm-eval's f1",
    "perplexity": "exp(-mean log-likelihood of the target), over documents",
    "word_perplexity": "exp(-total log-likelihood / total words), words split on whitespace",
    "byte_perplexity": "exp(-total log-likelihood / total UTF-8 bytes)",
    "bits_per_byte": "-total log-likelihood / total UTF-8 bytes / ln 2",
    "judge_score": "mean score the judge model gave (unparsable replies left out)",
    "judge_pass": "share of answers the judge scored at or above the pass threshold (unparsable = fail)",
}


def argmax(values: Sequence[float]) -> int:
    """numpy's argmax: the first index of the largest value."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice(
    lls: Sequence[float], greedy: Sequence[bool], choices: list[str], target: Any, wanted: set[str]
) -> dict[str, Any]:
    gold = gold_index(target, choices)
    pred = argmax(lls)
    pred_norm = argmax([ll / len(c) if c else -math.inf for ll, c in zip(lls, choices, strict=True)])
    pred_bytes = argmax(
        [ll / len(c.encode()) if c else -math.inf for ll, c in zip(lls, choices, strict=True)]
    )
    if isinstance(gold, list):
        out = {
            "acc": float(pred in gold),
            "acc_norm": float(pred_norm in gold),
            "acc_bytes": float(pred_bytes in gold),
            "exact_match": float(any(greedy[g] for g in gold)),
        }
    else:
        out = {
            "acc": float(pred == gold),
            "acc_norm": float(pred_norm == gold),
            "acc_bytes": float(pred_bytes == gold),
            "exact_match": float(greedy[gold]),
            "f1": (gold, pred),
        }
    return {k: v for k, v in out.items() if k in wanted}


def loglikelihood(ll: float, greedy: bool, wanted: set[str]) -> dict[str, Any]:
    return {k: v for k, v in {"perplexity": ll, "acc": float(greedy)}.items() if k in wanted}


def rolling(ll: float, text: str, wanted: set[str]) -> dict[str, Any]:
    words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    out = {"word_perplexity": (ll, words), "byte_perplexity": (ll, n_bytes), "bits_per_byte": (ll, n_bytes)}
    return {k: v for k, v in out.items() if k in wanted}


def apply_filter(spec: FilterSpec, text: str) -> str:
    """One response through a filter pipeline (lm-eval's regex / take_first / ...)."""
    for step in spec.steps:
        if step.function == "regex":
            found = re.findall(step.regex_pattern, text)
            if found:
                match = found[step.group_select]
                if isinstance(match, tuple):
                    parts = [m for m in match if m]
                    match = parts[0] if parts else step.fallback
                text = match.strip()
            else:
                text = step.fallback
        elif step.function == "lowercase":
            text = text.lower()
        elif step.function == "uppercase":
            text = text.upper()
        elif step.function == "remove_whitespace":
            text = text.strip()
    return text


def exact_match(prediction: str, reference: str, options: dict[str, Any]) -> float:
    """HF evaluate's exact_match, as lm-eval uses it (regexes removed first, then case, ...)."""
    for pattern in options.get("regexes_to_ignore") or []:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if options.get("ignore_case"):
        prediction, reference = prediction.lower(), reference.lower()
    if options.get("ignore_punctuation"):
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    if options.get("ignore_numbers"):
        table = str.maketrans("", "", string.digits)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def generation(
    response: str,
    target: Any,
    choices: list[str] | None,
    metrics: list[MetricSpec],
    filters: list[FilterSpec],
) -> dict[str, dict[str, Any]]:
    """{filter name: {metric: value}} for one generated answer."""
    gold = target
    if choices is not None:
        gold = choices[target] if isinstance(target, int) else target
    out: dict[str, dict[str, Any]] = {}
    for spec in filters:
        answer = apply_filter(spec, response)
        values: dict[str, Any] = {}
        for m in metrics:
            if m.name != "exact_match":
                continue
            golds = gold if isinstance(gold, list) else [gold]
            values["exact_match"] = float(any(exact_match(answer, str(g), m.kwargs) > 0 for g in golds))
        out[spec.name] = values | {"_answer": answer}
    return out


# ---------------------------------------------------------------------------
# aggregation


def binary_f1(items: Sequence[tuple[int, int]]) -> float:
    tp = sum(1 for g, p in items if g == 1 and p == 1)
    fp = sum(1 for g, p in items if g != 1 and p == 1)
    fn = sum(1 for g, p in items if g == 1 and p != 1)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def aggregate(aggregation: str, items: Sequence[Any]) -> float:
    simple = {
        "mean": stats.mean,
        "perplexity": stats.perplexity,
        "weighted_perplexity": stats.weighted_perplexity,
        "bits_per_byte": stats.bits_per_byte,
    }
    if aggregation in simple:
        return float(simple[aggregation](items))
    if aggregation == "f1":
        labels = {x for pair in items for x in pair}
        if not labels <= {0, 1}:
            raise ConfigError(
                "aggregation f1 is a binary F1 (as lm-eval's) and needs two choices; "
                f"got choice indices {sorted(labels)} (use acc instead)"
            )
        return binary_f1(items)
    raise ValueError(aggregation)


def stderr(aggregation: str, items: Sequence[Any], iters: int = 1000) -> float | None:
    """sample std / sqrt(n) for means; a seeded bootstrap otherwise; None below 2 items."""
    if len(items) < 2:
        return None
    if aggregation == "mean":
        return mean_stderr(items)
    value = bootstrap_stderr(lambda xs: aggregate(aggregation, xs), list(items), iters=iters)
    return None if math.isnan(value) else value
