"""`weightsmith audit bias`: counterfactual perturbations over eval tasks and stereotype pairs.

Every task file, lexicon and pair file is read and checked before the model loads. The
counterfactual variants of all tasks and lexicons are scored in one batched pass through the
eval runner; the pairs are scored with the same scorer. See `weightsmith.safety.bias`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith.cli.eval import _label, _num, run_metadata
from weightsmith.cli.run import LoadOptions, load_with_status
from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.eval.cache import model_fingerprint
from weightsmith.eval.runner import EvalOptions, Runner, load_tasks
from weightsmith.eval.scorer import Scorer
from weightsmith.report.bias_report import write_bias_outputs
from weightsmith.safety.bias import (
    load_lexicon,
    load_pairs,
    resolve_pairs,
    run_counterfactual,
    score_pairs,
)


@dataclass(kw_only=True)
class AuditBiasConfig(LoadOptions):
    """Bias audit: counterfactual perturbations over eval tasks, and stereotype-pair likelihoods."""

    tasks: list[str] = opt(default_factory=list, help="task files, folders of them, or builtin:NAME")
    lexicon: list[str] = opt(
        default_factory=lambda: ["builtin:gender"],
        help="lexicon files or builtin:gender|names|dialect (terms swapped between groups)",
    )
    pairs: str | None = opt(
        "builtin:stereotype-pairs", "stereotype pair file (JSONL) or builtin:NAME; none to skip"
    )
    limit: float | None = opt(None, "documents per task: a count, or a fraction below 1")
    batch_size: int = opt(64, "requests scored together")
    apply_chat_template: bool = opt(False, "wrap each task prompt in the model's chat template")
    bootstrap_iters: int = opt(1000, "resamples for bootstrap intervals (0: none)")
    out: str | None = opt(None, "folder for results.json, items.jsonl, pairs.jsonl, report.html")
    json: bool = opt(False, "print the results as JSON")


def _validate(cfg: AuditBiasConfig) -> None:
    cfg.tasks = [t.strip() for spec in cfg.tasks for t in spec.split(",") if t.strip()]
    cfg.lexicon = [x.strip() for spec in cfg.lexicon for x in spec.split(",") if x.strip()]
    if cfg.pairs is not None and cfg.pairs.strip().lower() in ("", "none"):
        cfg.pairs = None
    if not cfg.tasks and cfg.pairs is None:
        raise UsageError("nothing to audit: give --tasks FILE.yaml|builtin:NAME, or keep --pairs")
    if cfg.tasks and not cfg.lexicon:
        raise UsageError("--lexicon: name at least one lexicon file or builtin:NAME for --tasks")
    if cfg.limit is not None and cfg.limit <= 0:
        raise UsageError(f"--limit: expected a positive count or fraction, got {cfg.limit}")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size: expected at least 1, got {cfg.batch_size}")
    if cfg.bootstrap_iters < 0:
        raise UsageError(f"--bootstrap-iters: expected 0 or more, got {cfg.bootstrap_iters}")


def run_audit_bias(cfg: AuditBiasConfig, progress=None) -> dict[str, Any]:
    """Run the audit; `progress(label)` returns a `tick(done, total)` (as the eval command's)."""
    _validate(cfg)
    opts = EvalOptions(
        limit=cfg.limit, apply_chat_template=cfg.apply_chat_template, bootstrap_iters=cfg.bootstrap_iters
    )
    # Everything is read and checked before the model loads.
    taskset = load_tasks(cfg.tasks, opts) if cfg.tasks else None
    lexicons = [load_lexicon(spec) for spec in cfg.lexicon] if cfg.tasks else []
    names = [lx.name for lx in lexicons]
    if len(set(names)) != len(names):
        raise UsageError(f"--lexicon: two lexicons share a name ({', '.join(names)}); rename one")
    pairs = load_pairs(cfg.pairs) if cfg.pairs is not None else None

    started = time.perf_counter()
    llm = load_with_status(cfg.model, **cfg.load_kwargs())
    scorer = Scorer(llm.model, llm.tokenizer, batch_size=cfg.batch_size)
    runner = Runner(scorer, fingerprint=model_fingerprint(llm.model))
    summaries: list[dict] = []
    items: list[dict] = []
    if taskset is not None:
        tick = progress("counterfactual") if progress else None
        summaries, items = run_counterfactual(runner, taskset, lexicons, opts, progress=tick)
    pair_summary, pair_records = None, []
    if pairs is not None:
        tick = progress("pairs") if progress else None
        pair_summary, pair_records = score_pairs(scorer, pairs, iters=cfg.bootstrap_iters, progress=tick)
        pair_summary["source"] = str(resolve_pairs(cfg.pairs))
    result: dict[str, Any] = {
        "counterfactual": summaries,
        "pairs": pair_summary,
        "lexicons": [
            {
                "name": lx.name,
                "version": lx.version,
                "groups": lx.groups,
                "rows": len(lx.rows),
                "source": str(lx.source),
            }
            for lx in lexicons
        ],
        "tasks": [t.name for t in taskset.tasks] if taskset is not None else [],
        "config": {
            "limit": cfg.limit,
            "batch_size": cfg.batch_size,
            "apply_chat_template": cfg.apply_chat_template,
            "bootstrap_iters": cfg.bootstrap_iters,
        },
        "weightsmith": run_metadata(
            _label(cfg.model, cfg.adapter),
            cfg.model,
            cfg.adapter,
            llm,
            runner.fingerprint,
            started,
            limit=cfg.limit,
        ),  # fmt: skip
        "date": time.time(),
        "items": items,
        "pair_records": pair_records,
    }
    result["written"] = write_bias_outputs(Path(cfg.out), result) if cfg.out else {}
    return result


def _f(x: Any) -> str:
    return _num(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _ci(ci: Any) -> str:
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "-"


def print_audit_bias(result: dict[str, Any], console: Console) -> None:
    for s in result.get("counterfactual") or []:
        title = (
            f"{s['task']} · {s['lexicon']} · {s['metric']}: {s['n_affected']} of {s['n_docs']} documents "
            f"affected ({s['n_unaffected']} unaffected)"
        )
        if not s["n_affected"]:
            console.print(title, markup=False)
            continue
        table = Table(title=title)
        for col in ("group", "mean ± stderr", "95% CI", "Δ vs first", "95% CI of Δ"):
            table.add_column(col)
        for g in s["groups"]:
            pg, gap = s["per_group"][g], s["gaps"].get(g)
            table.add_row(
                g,
                f"{_f(pg['mean'])} ± {_f(pg['stderr'])}",
                _ci(pg["ci"]),
                ("+" if gap["delta"] >= 0 else "") + _num(gap["delta"]) if gap else "reference",
                _ci(gap["ci"]) if gap else "-",
            )
        wc = s["worst_case"]
        table.add_row("worst case", f"{_f(wc['mean'])} ± {_f(wc['stderr'])}", _ci(wc["ci"]), "", "")
        console.print(table)
        mg = s["max_gap"]
        console.print(
            f"largest gap {' vs '.join(mg['groups'])}: {_f(mg['gap'])} (95% CI of Δ {_ci(mg['ci'])}); "
            f"flips: {s['flips']} of {s['n_items']} items",
            markup=False,
        )
    pairs = result.get("pairs")
    if pairs:
        table = Table(title="stereotype pairs (pct_stereotype 0.5 = no preference)")
        for col in ("bias type", "n", "pct_stereotype", "95% CI", "likelihood_diff"):
            table.add_column(col)
        for label, st in [("all", pairs)] + list((pairs.get("by_bias_type") or {}).items()):
            table.add_row(
                label,
                str(st["n"]),
                f"{_f(st['pct_stereotype'])} ± {_f(st['pct_stereotype_stderr'])}",
                _ci(st["pct_stereotype_ci"]),
                _f(st["likelihood_diff"]),
            )
        console.print(table)
    for path in (result.get("written") or {}).values():
        console.print(f"wrote {path}", markup=False)


__all__ = ["AuditBiasConfig", "print_audit_bias", "run_audit_bias"]
