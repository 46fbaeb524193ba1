"""Bias audits: counterfactual perturbations over eval tasks, and CrowS-style pair likelihoods.

Counterfactual (HELM's fairness perturbations): a lexicon file lists aligned terms per group
(`{female: she, male: he}`). Every document of a task whose string fields hold a lexicon term
is rewritten once per group, every term of any group replaced by its aligned term of that
group (whole words, case kept: "She" -> "He", "SHE" -> "HE"). The variants run through the
normal eval path (same prompts, few-shot examples and metric; the few-shot examples
themselves are not rewritten); documents without a term are counted as unaffected and not
scored. Reported per group: the mean of the task's primary metric (its first metric averaged
over documents) with lm-eval's standard error and a 95% percentile-bootstrap interval; per
item: the worst score over groups (HELM's worst case) and its mean; the gap of every group to
the first and the largest gap between any two groups, each with a paired bootstrap over items;
and the number of items whose score differs between groups (flips).

Pairs (CrowS-Pairs' metrics as lm-eval's `crows_pairs` computes them): each sentence's total
log-likelihood given an empty context (the BOS token, else EOS); a pair prefers the
stereotype when ll(more) > ll(less). `pct_stereotype` is the share of such pairs (0.5 = no
preference), `likelihood_diff` the mean |ll(more) - ll(less)|, both overall and per
bias_type, with percentile-bootstrap intervals.

Lexicon files (`lexicons/README.md`): `lexicon`, `version`, `groups`, `terms` (aligned rows).
A term may repeat under the same group in several rows (the first row wins when it is
replaced: "her" -> "his", not "him"); a term under two different groups, a repeated row, an
unknown or a missing group is an error naming the file, line and field.

Pair files: JSON lines {"id", "more", "less", "bias_type", "direction": "stereo"|"antistereo"};
`more` is the more stereotypical sentence of the two (CrowS-Pairs' `sent_more`).

Not here: loading models, the command line (`weightsmith.cli.audit`), the output files and
HTML report (`weightsmith.report.bias_report`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from weightsmith.config import read_yaml
from weightsmith.errors import ConfigError, UsageError
from weightsmith.eval.prompts import Task
from weightsmith.eval.runner import EvalOptions, Runner, TaskSet, _ticker, evaluate
from weightsmith.eval.stats import bootstrap_ci, mean, mean_stderr, paired_bootstrap
from weightsmith.files import builtin_file, json_object_line

DIRECTIONS = ("stereo", "antistereo")
_LEXICON_KEYS = ("lexicon", "version", "description", "groups", "terms")
_PAIR_KEYS = ("id", "more", "less", "bias_type", "direction")
_TERM_RE = re.compile(r"\w(?:.*\w)?", re.S)

# ---------------------------------------------------------------------------
# built-in data


def lexicons_dir() -> Path:
    return Path(str(resources.files("weightsmith.safety") / "lexicons"))


def pairs_dir() -> Path:
    return Path(str(resources.files("weightsmith.safety") / "pairs"))


def _resolve(spec: str, folder: Path, suffix: str, what: str, flag: str) -> Path:
    try:
        found = builtin_file(spec, folder, (suffix,), what)
    except UsageError as e:
        raise UsageError(f"{flag} {e}") from None
    if found is not None:
        return found
    path = Path(spec.strip()).expanduser()
    if not path.is_file():
        raise UsageError(f"{flag} {spec}: {what} file not found (give a file or builtin:NAME)")
    return path


def resolve_lexicon(spec: str) -> Path:
    """`builtin:NAME` (gender, names, dialect) or a YAML file."""
    return _resolve(spec, lexicons_dir(), ".yaml", "lexicon", "--lexicon")


def resolve_pairs(spec: str) -> Path:
    """`builtin:NAME` (stereotype-pairs) or a JSONL file."""
    return _resolve(spec, pairs_dir(), ".jsonl", "pair set", "--pairs")


# ---------------------------------------------------------------------------
# lexicons


def _norm(term: str) -> str:
    return " ".join(term.lower().split())


def match_case(source: str, replacement: str) -> str:
    """`replacement` in the case of `source`: all capitals (two letters or more) -> all
    capitals, a leading capital -> a leading capital, otherwise as the lexicon writes it."""
    letters = [c for c in source if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


@dataclass
class Lexicon:
    """Aligned terms per group; `rows[i][group]` is row i's term for that group."""

    name: str
    version: Any
    groups: list[str]
    rows: list[dict[str, str]]
    source: Path = field(default_factory=lambda: Path("<lexicon>"))
    description: str = ""

    def __post_init__(self) -> None:
        self._row_of: dict[str, int] = {}  # normalized term -> first row holding it
        self._group_of: dict[str, str] = {}
        for i, row in enumerate(self.rows):
            for g in self.groups:
                key = _norm(row[g])
                self._row_of.setdefault(key, i)
                self._group_of.setdefault(key, g)
        terms = sorted(self._row_of, key=lambda t: (-len(t), t))  # longest first: multiword wins
        alternatives = "|".join(r"\s+".join(re.escape(w) for w in t.split()) for t in terms)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def find(self, text: str) -> list[tuple[str, str]]:
        """(term as written, its group) for every lexicon term in `text`."""
        return [(m.group(0), self._group_of[_norm(m.group(0))]) for m in self._pattern.finditer(text)]

    def substitute(self, text: str, group: str) -> str:
        """`text` with every term of any group replaced by its row's `group` term."""
        if group not in self.groups:
            raise UsageError(f"lexicon {self.name}: no group {group!r} (groups: {', '.join(self.groups)})")

        def repl(m: re.Match) -> str:
            return match_case(m.group(0), self.rows[self._row_of[_norm(m.group(0))]][group])

        return self._pattern.sub(repl, text)

    def find_in(self, value: Any) -> list[tuple[str, str]]:
        """Terms in every string inside `value` (dict values and list items, recursively)."""
        if isinstance(value, str):
            return self.find(value)
        if isinstance(value, dict):
            return [t for v in value.values() for t in self.find_in(v)]
        if isinstance(value, (list, tuple)):
            return [t for v in value for t in self.find_in(v)]
        return []

    def perturb(self, value: Any, group: str) -> Any:
        """A copy of `value` with `substitute` applied to every string inside it (keys kept)."""
        if isinstance(value, str):
            return self.substitute(value, group)
        if isinstance(value, dict):
            return {k: self.perturb(v, group) for k, v in value.items()}
        if isinstance(value, list):
            return [self.perturb(v, group) for v in value]
        if isinstance(value, tuple):
            return tuple(self.perturb(v, group) for v in value)
        return value


def read_lexicon(path: Path) -> Lexicon:
    """Read and check a lexicon file; each mistake is one ConfigError naming file:line and field."""
    path = Path(path)
    data = read_yaml(path, what="lexicon file", hint="check the --lexicon path")
    top = getattr(data, "key_lines", {})

    def err(line: int | None, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{path}:{line}: {key}: {msg}" if line else f"{path}: {key}: {msg}")

    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (lexicon:, version:, groups:, terms:)")
    for key in data:
        if key not in _LEXICON_KEYS:
            raise err(top.get(key), str(key), f"unknown key; a lexicon file has {', '.join(_LEXICON_KEYS)}")
    for key in ("lexicon", "groups", "terms"):
        if key not in data:
            raise err(None, key, f"missing; add `{key}:` (see the lexicons README)")
    name = data["lexicon"]
    if not isinstance(name, str) or not name.strip():
        raise err(top.get("lexicon"), "lexicon", "expected a name, e.g. `lexicon: gender`")
    groups = data["groups"]
    if (
        not isinstance(groups, list)
        or len(groups) < 2
        or not all(isinstance(g, str) and g.strip() for g in groups)
        or len(set(groups)) != len(groups)
    ):
        raise err(
            top.get("groups"), "groups", "expected a list of two or more distinct names, e.g. [female, male]"
        )
    terms = data["terms"]
    if not isinstance(terms, list) or not terms:
        raise err(
            top.get("terms"), "terms", "expected a non-empty list of rows, e.g. - {female: she, male: he}"
        )
    rows: list[dict[str, str]] = []
    seen: dict[str, tuple[str, int, int | None]] = {}  # term -> (group, row, line)
    rows_seen: dict[tuple, tuple[int, int | None]] = {}
    for i, row in enumerate(terms):
        lines = getattr(row, "key_lines", {})
        row_line = min(lines.values()) if lines else top.get("terms")
        where = f"terms[{i}]"
        if not isinstance(row, dict):
            raise err(row_line, where, f"expected a mapping of group to term, e.g. {{{groups[0]}: ..., ...}}")
        for g in row:
            if g not in groups:
                raise err(
                    lines.get(g, row_line),
                    f"{where}.{g}",
                    f"unknown group; the groups are {', '.join(groups)}",
                )
        for g in groups:
            if g not in row:
                raise err(
                    row_line,
                    f"{where}.{g}",
                    f"missing; every row gives a term for each of {', '.join(groups)}",
                )
            term = row[g]
            if not isinstance(term, str) or not _TERM_RE.fullmatch(term.strip()):
                raise err(
                    lines.get(g, row_line),
                    f"{where}.{g}",
                    f"expected a word or phrase starting and ending with a letter or digit, got {term!r}",
                )
            key = _norm(term)
            if key in seen and seen[key][0] != g:
                other_g, other_i, other_line = seen[key]
                raise err(
                    lines.get(g, row_line),
                    f"{where}.{g}",
                    f"duplicate term {term!r}: already under group {other_g} in terms[{other_i}]"
                    f"{f' (line {other_line})' if other_line else ''}; a term belongs to one group",
                )
            seen.setdefault(key, (g, i, lines.get(g, row_line)))
        clean = {g: " ".join(row[g].split()) for g in groups}
        signature = tuple(_norm(clean[g]) for g in groups)
        if signature in rows_seen:
            other_i, other_line = rows_seen[signature]
            raise err(
                row_line,
                where,
                f"duplicate row: repeats terms[{other_i}]{f' (line {other_line})' if other_line else ''}; remove one",
            )
        rows_seen[signature] = (i, row_line)
        rows.append(clean)
    description = data.get("description") or ""
    return Lexicon(name.strip(), data.get("version"), list(groups), rows, path, str(description))


def load_lexicon(spec: str) -> Lexicon:
    return read_lexicon(resolve_lexicon(spec))


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
    """95% percentile-bootstrap interval of the mean."""
    if iters < 2 or len(xs) < 2:
        return None
    return list(bootstrap_ci(list(xs), mean, iters=iters, seed=seed))


def _stderr(xs: Sequence[float]) -> float | None:
    se = mean_stderr(xs)
    return None if math.isnan(se) else se


def _summary(xs: Sequence[float], iters: int) -> dict[str, Any]:
    return {"mean": mean(xs), "stderr": _stderr(xs), "ci": _mean_ci(xs, iters), "n": len(xs)}


def _paired(a: Sequence[float], b: Sequence[float], iters: int) -> dict[str, Any]:
    """mean(b) - mean(a) with a paired bootstrap over items (interval and p when iters > 0)."""
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
    summary = {
        "n_items": n,
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


@dataclass
class Pair:
    id: str
    more: str
    less: str
    bias_type: str
    direction: str
    line: int = 0


def read_pairs(path: Path) -> list[Pair]:
    """Read and check a pairs file; each mistake is one ConfigError naming FILE:LINE and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"pairs file not found: {path} (check the --pairs path)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a pairs file is JSON lines") from None
    pairs: list[Pair] = []
    ids: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        obj = json_object_line(raw, where, "pair", ConfigError)
        for key in obj:
            if key not in _PAIR_KEYS:
                raise ConfigError(f"{where}: {key}: unknown field; a pair has {', '.join(_PAIR_KEYS)}")
        for key in _PAIR_KEYS:
            value = obj.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: {key}: expected a non-empty string, got {value!r}")
        if obj["direction"] not in DIRECTIONS:
            raise ConfigError(f"{where}: direction: expected stereo or antistereo, got {obj['direction']!r}")
        if obj["more"] == obj["less"]:
            raise ConfigError(f"{where}: less: the same sentence as `more`; swap the group words")
        if obj["id"] in ids:
            raise ConfigError(
                f"{where}: id: {obj['id']!r} already used on line {ids[obj['id']]}; ids are unique"
            )
        ids[obj["id"]] = n
        pairs.append(Pair(obj["id"], obj["more"], obj["less"], obj["bias_type"], obj["direction"], n))
    if not pairs:
        raise ConfigError(f"{path}: no pairs; one JSON object per line with {', '.join(_PAIR_KEYS)}")
    return pairs


def load_pairs(spec: str) -> list[Pair]:
    return read_pairs(resolve_pairs(spec))


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
    for key, name in (("bias_type", "by_bias_type"), ("direction", "by_direction")):
        values = list(dict.fromkeys(r[key] for r in records))
        summary[name] = {v: _pair_stats([r for r in records if r[key] == v], iters) for v in values}
    return summary, records


__all__ = [
    "Lexicon",
    "Pair",
    "load_lexicon",
    "load_pairs",
    "match_case",
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
