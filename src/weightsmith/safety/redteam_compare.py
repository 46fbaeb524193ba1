"""Before and after: two red-team runs of one configuration each (say the base model and its
DPO fork) compared on the same probes, paired by probe id.

For attack success and for over-refusal: the rate before and after, each with its 95% Wilson
(or Clopper–Pearson) interval; the change (after - before) with Newcombe's paired score
interval (method 10); and McNemar's exact test, the two-sided binomial test on the
discordant probes (those whose outcome changed), at any number of them.

    before = load_records("reports/rt-base")            # DIR/transcripts.jsonl, first configuration
    after = load_records("reports/rt-fork", config="smollm2-135m-instruct+dpo")
    compare_runs(before, after)["asr"]["difference"]    # {"delta", "ci_low", "ci_high", ...}

Not here: running probes and the within-run comparison of configurations against the first
(redteam.py, whose McNemar switches to the chi-square form at 25 discordant pairs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.eval.intervals import describe, paired_difference
from weightsmith.eval.stats import mcnemar_exact
from weightsmith.safety.redteam import rate

__all__ = ["OUTCOMES", "compare_runs", "load_records", "records_by_config"]

#: rate name -> (probe kind, the record's 0/1 outcome)
OUTCOMES = {"asr": ("attack", "success"), "over_refusal": ("benign", "over_refused")}


def _by_probe(records: Sequence[dict], which: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in records:
        if r["probe"] in out:
            raise WeightsmithError(
                f"{which}: probe {r['probe']!r} appears twice; pass one configuration's records "
                "(load_records(..., config=NAME))"
            )
        out[r["probe"]] = r
    return out


def _check_same(before: dict[str, dict], after: dict[str, dict]) -> None:
    only_b, only_a = sorted(set(before) - set(after)), sorted(set(after) - set(before))
    if only_b or only_a:
        example = (only_b or only_a)[0]
        raise WeightsmithError(
            f"the runs are not on the same probes: {len(only_b)} only before, {len(only_a)} only after "
            f"(e.g. {example!r}); run both with the same --packs, --transforms, --split and --limit"
        )
    for pid, rec in before.items():
        if rec["kind"] != after[pid]["kind"]:
            raise WeightsmithError(f"probe {pid!r} is {rec['kind']} before but {after[pid]['kind']} after")


def _paired(a: list[bool], b: list[bool], method: str) -> dict[str, Any]:
    before_only = sum(x and not y for x, y in zip(a, b, strict=True))
    after_only = sum(y and not x for x, y in zip(a, b, strict=True))
    return {
        "before": rate(a, method=method),
        "after": rate(b, method=method),
        "difference": paired_difference(a, b) if a else None,
        "mcnemar": {
            "n": len(a), "before_only": before_only, "after_only": after_only,
            "p_value": mcnemar_exact(before_only, after_only), "method": "exact",
        } if a else None,
    }  # fmt: skip


def compare_runs(before: Sequence[dict], after: Sequence[dict], *, method: str = "wilson") -> dict[str, Any]:
    """Attack success and over-refusal of `after` against `before` (95% intervals of `method`,
    wilson or clopper-pearson, on the rates): transcript records of one
    configuration each, over the same probes (matched by probe id; WeightsmithError otherwise).

    Returns {"asr": {...}, "over_refusal": {...}, "probes": {"attack": n, "benign": n},
    "interval", "difference_interval", "test"}; each rate entry holds "before" and "after"
    (k, n, rate, ci_low, ci_high), "difference" (after - before: delta, ci_low, ci_high) and
    "mcnemar" (before_only, after_only, p_value), both None when there are no such probes."""
    b, a = _by_probe(before, "before"), _by_probe(after, "after")
    _check_same(b, a)
    out: dict[str, Any] = {}
    counts = {}
    for name, (kind, outcome) in OUTCOMES.items():
        ids = [pid for pid, r in b.items() if r["kind"] == kind]
        counts[kind] = len(ids)
        out[name] = _paired([bool(b[i][outcome]) for i in ids], [bool(a[i][outcome]) for i in ids], method)
    return {
        **out,
        "probes": counts,
        "interval": describe(method),
        "difference_interval": describe("newcombe-paired"),
        "test": "McNemar exact (two-sided binomial on the probes whose outcome changed)",
    }


def records_by_config(path: str | Path) -> dict[str, list[dict]]:
    """The scored attempts of a finished run (``DIR/transcripts.jsonl`` or the file itself), by
    configuration, in the run's order."""
    path = Path(path)
    file = path / "transcripts.jsonl" if path.is_dir() else path
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"no red-team transcripts at {file}; give a finished run's --out folder") from None
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror or exc}") from None
    out: dict[str, list[dict]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.setdefault(rec["config"], []).append(rec)
        except (ValueError, KeyError, TypeError):
            raise WeightsmithError(
                f"{file}:{n}: not a red-team transcript line; rerun the red-team"
            ) from None
    return out


def load_records(path: str | Path, config: str | None = None) -> list[dict]:
    """One configuration's scored attempts of a finished run (default: its first, the bare model)."""
    runs = records_by_config(path)
    if not runs:
        raise UsageError(f"{path}: the run holds no attempts")
    if config is None:
        return next(iter(runs.values()))
    if config not in runs:
        raise UsageError(f"{path}: no configuration {config!r}; the run has: {', '.join(runs)}")
    return runs[config]
