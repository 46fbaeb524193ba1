"""The audit bias command: counterfactual perturbations over eval tasks and stereotype pairs.

Every task file, lexicon and pair file is read and checked before the model loads. The
counterfactual variants of all tasks and lexicons are scored in one batched pass through the
eval runner; the pairs are scored with the same scorer. See `weightsmith.safety.bias`.

Not here: the perturbations and statistics (`weightsmith.safety.bias`), the report
(`weightsmith.report.bias_report`), tables and progress bars (`weightsmith.cli.audit`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.commands.eval import run_metadata
from weightsmith.commands.loading import LoadOptions, load_status, model_label
from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.eval.cache import model_fingerprint
from weightsmith.eval.runner import EvalOptions, Runner, load_tasks
from weightsmith.eval.scorer import Scorer
from weightsmith.grants import Grants
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
    bootstrap_iters: int = opt(1000, "resamples for bootstrap intervals of non-0/1 scores (0: none)")
    out: str | None = opt(None, "folder for results.json, items.jsonl, pairs.jsonl, report.html")
    json: bool = opt(False, "print the results as JSON")
    allow_files: list[str] = opt(
        default_factory=list, help="also let task files read data from this folder (task files may "
        "read only files beside them otherwise)"
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check(self)


def _check(cfg: AuditBiasConfig) -> None:
    """Range and consistency checks, run when the config is built (nothing is read)."""
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


def run_audit_bias(cfg: AuditBiasConfig, progress: Any = None) -> dict[str, Any]:
    """Run the audit; `progress(label)` returns a `tick(done, total)` (as the eval command's)."""
    # The audit's own flags (a subset of eval's, worded for the audit) for the eval runner.
    opts = EvalOptions(
        limit=cfg.limit, apply_chat_template=cfg.apply_chat_template, bootstrap_iters=cfg.bootstrap_iters
    )
    grants = Grants(folders=tuple(Path(d).expanduser() for d in cfg.allow_files))
    # Everything is read and checked before the model loads.
    taskset = load_tasks(cfg.tasks, opts, grants) if cfg.tasks else None
    lexicons = [load_lexicon(spec) for spec in cfg.lexicon] if cfg.tasks else []
    names = [lx.name for lx in lexicons]
    if len(set(names)) != len(names):
        raise UsageError(f"--lexicon: two lexicons share a name ({', '.join(names)}); rename one")
    pairs = load_pairs(cfg.pairs) if cfg.pairs is not None else None

    started, began = time.perf_counter(), time.time()
    llm = cfg.load(load_status(progress))
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
        "lexicons": [_lexicon_record(lx) for lx in lexicons],
        "tasks": [t.name for t in taskset.tasks] if taskset is not None else [],
        "config": {
            "limit": cfg.limit,
            "batch_size": cfg.batch_size,
            "apply_chat_template": cfg.apply_chat_template,
            "bootstrap_iters": cfg.bootstrap_iters,
        },
        "weightsmith": run_metadata(
            model_label(cfg.model, cfg.adapter),
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
    if cfg.out:
        _record_lineage(cfg, summaries, pair_summary, began, str(llm.device))
    return result


def _record_lineage(
    cfg: AuditBiasConfig, summaries: list[dict], pair_summary: dict | None, began: float, device: str
) -> None:
    """OUT's lineage record: flip rates per task and lexicon, and the stereotype-pair share."""
    from weightsmith.lineage import write_lineage

    headline: dict[str, Any] = {f"{s['task']}/{s['lexicon']}": s.get("flip_rate") for s in summaries}
    if pair_summary is not None:
        headline["pct_stereotype"] = pair_summary.get("pct_stereotype")
    write_lineage(
        cfg.out, kind="audit bias", config=cfg, started=began, device=device, metrics=headline,
        inputs={"model": cfg.model, "adapter": cfg.adapter, "tasks": cfg.tasks, "lexicon": cfg.lexicon,
                "pairs": cfg.pairs},
    )  # fmt: skip


def _lexicon_record(lx: Any) -> dict[str, Any]:
    """What the results file says about a lexicon it used."""
    return {"name": lx.name, "version": lx.version, "groups": lx.groups, "rows": len(lx.rows),
            "source": str(lx.source)}  # fmt: skip


__all__ = ["AuditBiasConfig", "run_audit_bias"]
