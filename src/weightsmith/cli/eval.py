"""`weightsmith eval`: run task files on a model and its forks, compare, report.

The model (with `--adapter`, if given) is evaluated, then each `--compare` entry:
`base` (the same model without the adapter), another model, or `adapter:DIR` (the
same base with another adapter). The first `--compare` entry is the reference the
others are compared against (deltas, McNemar or paired-bootstrap p-values, 95% CIs).
Task files are all read and checked before any model loads.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith import __version__
from weightsmith.cli.run import LoadOptions, load_with_status
from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.eval.cache import ResultCache, model_fingerprint
from weightsmith.eval.runner import EvalOptions, Runner, evaluate, judge_hook, load_tasks
from weightsmith.eval.scorer import Scorer
from weightsmith.eval.stats import compare_runs


@dataclass(kw_only=True)
class EvalConfig(LoadOptions):
    """Evaluate a model (and forks) on task files; write results.json, samples and an HTML report."""

    tasks: list[str] = opt(default_factory=list, help="task files, folders of them, or builtin:NAME")
    compare: list[str] = opt(
        default_factory=list,
        help="also evaluate: base, another model, or adapter:DIR; the first is the reference",
    )
    limit: float | None = opt(None, "documents per task: a count, or a fraction below 1")
    num_fewshot: int | None = opt(None, "few-shot examples per prompt (none: each task's own num_fewshot)")
    batch_size: int = opt(64, "requests scored together (also capped at 16,384 tokens a batch)")
    apply_chat_template: bool = opt(False, "wrap each prompt in the model's chat template (instruct models)")
    system_instruction: str | None = opt(None, "system message for --apply-chat-template (or a text prefix)")
    fewshot_seed: int = opt(1234, "seed of the few-shot sampler (lm-eval's default)")
    bootstrap_iters: int = opt(1000, "resamples for bootstrap standard errors")
    out: str | None = opt(None, "folder for results.json, samples_<task>.jsonl, comparison.json, report.html")
    cache: bool = opt(True, "reuse results of requests already answered by the same weights")
    cache_path: str | None = opt(None, "cache file (default: WEIGHTSMITH_HOME/eval-cache.sqlite)")
    json: bool = opt(False, "print the results as JSON")


@dataclass
class ModelSpec:
    label: str
    model: str
    adapter: str | None
    role: str = field(default="model")


def model_specs(cfg: EvalConfig) -> list[ModelSpec]:
    """The models to run, the reference (first --compare entry, else the model) first."""
    main = ModelSpec(_label(cfg.model, cfg.adapter), cfg.model, cfg.adapter)
    others = []
    for entry in cfg.compare:
        entry = entry.strip()
        if entry == "base":
            if cfg.adapter is None:
                raise UsageError("--compare base: compares a fork with its base; give --adapter DIR as well")
            others.append(ModelSpec(_label(cfg.model, None), cfg.model, None))
        elif entry.startswith("adapter:"):
            path = entry[len("adapter:") :]
            if not Path(path).is_dir():
                raise UsageError(f"--compare {entry}: adapter folder not found: {path}")
            others.append(ModelSpec(_label(cfg.model, path), cfg.model, path))
        elif entry:
            others.append(ModelSpec(_label(entry, None), entry, None))
    specs = others[:1] + [main] + others[1:]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--compare: the models to compare must differ; got {', '.join(labels)}")
    return specs


def _label(model: str, adapter: str | None) -> str:
    name = Path(model).name if ("/" in model or model.endswith(".gguf")) else model
    return f"{name}+{Path(adapter).name}" if adapter else name


def _validate(cfg: EvalConfig) -> None:
    tasks = [t for spec in cfg.tasks for t in spec.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: name at least one task file, folder or builtin:NAME")
    cfg.tasks = tasks
    if cfg.limit is not None and cfg.limit <= 0:
        raise UsageError(f"--limit: expected a positive count or fraction, got {cfg.limit}")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size: expected at least 1, got {cfg.batch_size}")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise UsageError(f"--num-fewshot: expected 0 or more, got {cfg.num_fewshot}")
    if cfg.bootstrap_iters < 0:
        raise UsageError(f"--bootstrap-iters: expected 0 or more, got {cfg.bootstrap_iters}")


def _cache(cfg: EvalConfig) -> ResultCache | None:
    if not cfg.cache:
        return None
    from weightsmith.checkpoint.store import weightsmith_home

    return ResultCache(Path(cfg.cache_path) if cfg.cache_path else weightsmith_home() / "eval-cache.sqlite")


def run_eval(cfg: EvalConfig, *, progress=None) -> dict[str, Any]:
    _validate(cfg)
    opts = EvalOptions(
        limit=cfg.limit,
        num_fewshot=cfg.num_fewshot,
        apply_chat_template=cfg.apply_chat_template,
        system_instruction=cfg.system_instruction,
        fewshot_seed=cfg.fewshot_seed,
        bootstrap_iters=cfg.bootstrap_iters,
    )
    taskset = load_tasks(cfg.tasks, opts)  # every task file and document checked before a model loads
    specs = model_specs(cfg)
    cache = _cache(cfg)
    load_kwargs = {k: v for k, v in cfg.load_kwargs().items() if k != "adapter"}
    judge = judge_hook(lambda ref: load_with_status(ref, **load_kwargs))
    runs, samples = [], []
    try:
        for spec in specs:
            llm = load_with_status(spec.model, **load_kwargs, adapter=spec.adapter)
            started = time.perf_counter()
            scorer = Scorer(llm.model, llm.tokenizer, batch_size=cfg.batch_size)
            runner = Runner(scorer, fingerprint=model_fingerprint(llm.model), cache=cache)
            tick = progress(spec.label) if progress else None
            result, run_samples = evaluate(runner, taskset, opts, progress=tick, judge=judge)
            result["config"].update(
                {"model_args": f"model={spec.model},adapter={spec.adapter}", "limit": cfg.limit}
            )
            result["weightsmith"] = run_metadata(
                spec.label, spec.model, spec.adapter, llm, runner.fingerprint, started,
                cache_hits=runner.cache_hits,
            )  # fmt: skip
            runs.append(result)
            samples.append(run_samples)
            del llm, scorer, runner
            gc.collect()
    finally:
        if cache is not None:
            cache.close()
    comparison = compare_runs(runs, samples, reference=0) if len(runs) > 1 else None
    written = {}
    if cfg.out:
        from weightsmith.eval.metrics import DEFINITIONS
        from weightsmith.eval.output import write_outputs
        from weightsmith.report.eval_report import write_eval_report

        written = write_outputs(Path(cfg.out), runs, samples, comparison)
        write_eval_report(Path(cfg.out) / "report.html", runs, comparison, DEFINITIONS)
        written["report"] = str(Path(cfg.out) / "report.html")
    return {"runs": runs, "comparison": comparison, "written": written}


def run_metadata(
    label: str, model: str, adapter: str | None, llm: Any, fingerprint: str, started: float, **extra: Any
) -> dict[str, Any]:
    """The `weightsmith` block of a results file: what ran, on which weights, how long."""
    return {
        "version": __version__,
        "label": label,
        "model": model,
        "adapter": adapter,
        "model_hash": fingerprint,
        "device": str(llm.device),
        "dtype": str(llm.dtype).replace("torch.", ""),
        **extra,
        "seconds": round(time.perf_counter() - started, 3),
    }


class ProgressBars:
    """One bar per model on a terminal; a line every ~10% elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tty = console.is_terminal

    def __call__(self, label: str):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           console=self.console, transient=True)  # fmt: skip
            task = bar.add_task(label, total=None)
            bar.start()

            def tick(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)
                if done >= total:
                    bar.stop()

            return tick
        state = {"next": 0.0}

        def line(done: int, total: int) -> None:
            if total and done / total >= state["next"]:
                self.console.print(f"{label}: {done}/{total} requests", markup=False)
                state["next"] = done / total + 0.1

        return line


def _fmt(value: Any, se: Any = None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    text = _num(value)
    return f"{text} ± {_num(se)}" if isinstance(se, float) else text


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def _p(p: Any, test: str | None) -> str:
    if not isinstance(p, float):
        return "-"
    if p == 0 and test == "paired_bootstrap":
        return "<0.0001"  # no resample of 10,000 crossed zero
    return f"{p:.3g}"


def print_eval(result: dict[str, Any], console: Console) -> None:
    for run in result["runs"]:
        info = run["weightsmith"]
        table = Table(title=f"{info['label']}  ({info['seconds']:.1f} s, {info['cache_hits']} cached)")
        for col in ("task", "metric", "filter", "value ± stderr", "n"):
            table.add_column(col)
        for task, values in run["results"].items():
            n = run["n-samples"].get(task, {}).get("effective", "")
            for key, value in values.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                table.add_row(task, metric, filt, _fmt(value, values.get(f"{metric}_stderr,{filt}")), str(n))
        console.print(table)
    comparison = result.get("comparison")
    if comparison:
        ref = comparison["reference"]
        table = Table(title=f"compared with {ref}")
        for col in ("task", "metric", "model", "value", "delta", "95% CI", "test", "p"):
            table.add_column(col)
        for row in comparison["rows"]:
            for label, delta in row["delta"].items():
                ci = row["ci"].get(label)
                p = row["p_value"].get(label)
                mark = {True: " ▲", False: " ▼"}.get(row["better"].get(label), "")
                table.add_row(
                    row["task"],
                    row["metric"],
                    label,
                    _fmt(row["values"].get(label)),
                    (("+" if delta >= 0 else "") + _num(delta) if isinstance(delta, float) else "-") + mark,
                    f"[{_num(ci[0])}, {_num(ci[1])}]" if ci and None not in ci else "-",
                    row.get("test") or "-",
                    _p(p, row.get("test")),
                )
        console.print(table)
    for what, path in result.get("written", {}).items():
        if what != "runs":
            console.print(f"wrote {path}", markup=False)
    if result.get("written", {}).get("runs"):
        console.print(f"wrote {', '.join(result['written']['runs'])}", markup=False)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, emoji=False, file=sys.stderr)
