"""The eval command: run task files on a model and its forks, compare, report.

The model (with `--adapter`, if given) is evaluated, then each `--compare` entry:
`base` (the same model without the adapter), another model, or `adapter:DIR` (the
same base with another adapter). The first `--compare` entry is the reference the
others are compared against (deltas, McNemar or paired-bootstrap p-values, 95% CIs).
With `--endpoint URL[,URL...]` the model (and each `--compare` name) is the name a server
serves, and the requests go to those OpenAI-compatible endpoints, spread over them
(`weightsmith.eval.endpoint`, `weightsmith.endpoints`); nothing loads here.
Task files are all read and checked before any model loads or any request is sent.

Not here: the runner, scorer and statistics (`weightsmith.eval`), progress bars and
tables (`weightsmith.cli.eval`).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith import __version__
from weightsmith.commands.loading import LoadOptions, load_model, load_status, model_label
from weightsmith.config import opt
from weightsmith.endpoints import EndpointPool, endpoint_urls
from weightsmith.errors import UsageError
from weightsmith.eval.cache import ResultCache, model_fingerprint
from weightsmith.eval.endpoint import EndpointScorer, endpoint_fingerprint
from weightsmith.eval.runner import EvalOptions, Runner, evaluate, judge_hook, load_tasks
from weightsmith.eval.scorer import Scorer
from weightsmith.eval.stats import compare_runs
from weightsmith.grants import Grants
from weightsmith.lineage import write_lineage


@dataclass(kw_only=True)
class EvalConfig(LoadOptions):
    """Evaluate a model (and forks) on task files; write results.json, samples and an HTML report."""

    tasks: list[str] = opt(default_factory=list, help="task files, folders of them, or builtin:NAME")
    compare: list[str] = opt(
        default_factory=list,
        help="also evaluate: base, another model, or adapter:DIR; the first is the reference",
    )
    run: EvalOptions = opt(default_factory=EvalOptions, flatten=True)  # --limit ... --bootstrap-iters
    out: str | None = opt(None, "folder for results.json, samples_<task>.jsonl, comparison.json, report.html")
    cache: bool = opt(True, "reuse results of requests already answered by the same weights")
    cache_path: str | None = opt(None, "cache file (default: WEIGHTSMITH_HOME/eval-cache.sqlite)")
    json: bool = opt(False, "print the results as JSON")
    allow_files: list[str] = opt(
        default_factory=list, help="also let task files read data from this folder (task files may "
        "read only files beside them otherwise)"
    )  # fmt: skip
    judge_endpoint: list[str] = opt(
        default_factory=list, help="let task files' judges call this OpenAI-compatible endpoint URL "
        "(a task file cannot reach the network otherwise)"
    )  # fmt: skip
    judge_api_key_env: str | None = opt(
        None, "environment variable whose value is sent as the judge endpoint's API key"
    )
    endpoint: list[str] = opt(
        default_factory=list, help="evaluate MODEL as served by these OpenAI-compatible endpoints "
        "(base URLs like http://host:8000/v1); several replicas share the requests"
    )  # fmt: skip
    concurrency: int = opt(8, "with --endpoint: requests in flight to each endpoint")
    api_key_env: str = opt(
        "WEIGHTSMITH_API_KEY", "with --endpoint: environment variable holding their API key"
    )

    def __post_init__(self) -> None:
        _check(self)

    def grants(self) -> Grants:
        """What these flags let task files reach (weightsmith.grants)."""
        return Grants(
            folders=tuple(Path(d).expanduser() for d in self.allow_files),
            endpoints=tuple(self.judge_endpoint),
            api_key_env=self.judge_api_key_env,
        )


@dataclass
class ModelSpec:
    label: str
    model: str
    adapter: str | None
    role: str = field(default="model")


def model_specs(cfg: EvalConfig) -> list[ModelSpec]:
    """The models to run, the reference (first --compare entry, else the model) first."""
    served = bool(cfg.endpoint)  # names a server serves, used as they are
    main = ModelSpec(cfg.model if served else model_label(cfg.model, cfg.adapter), cfg.model, cfg.adapter)
    others = []
    for entry in cfg.compare:
        entry = entry.strip()
        if served and entry:
            if entry == "base" or entry.startswith("adapter:"):
                raise UsageError(
                    f"--compare {entry}: with --endpoint, compare served names (an adapter served as "
                    "MODEL:NAME by weightsmith serve --adapter NAME=DIR, or another model)"
                )
            others.append(ModelSpec(entry, entry, None))
        elif entry == "base":
            if cfg.adapter is None:
                raise UsageError("--compare base: compares a fork with its base; give --adapter DIR as well")
            others.append(ModelSpec(model_label(cfg.model, None), cfg.model, None))
        elif entry.startswith("adapter:"):
            path = entry[len("adapter:") :]
            if not Path(path).is_dir():
                raise UsageError(f"--compare {entry}: adapter folder not found: {path}")
            others.append(ModelSpec(model_label(cfg.model, path), cfg.model, path))
        elif entry:
            others.append(ModelSpec(model_label(entry, None), entry, None))
    specs = others[:1] + [main] + others[1:]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--compare: the models to compare must differ; got {', '.join(labels)}")
    return specs


def _check(cfg: EvalConfig) -> None:
    """Range and consistency checks, run when the config is built (nothing is read)."""
    tasks = [t for spec in cfg.tasks for t in spec.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: name at least one task file, folder or builtin:NAME")
    cfg.tasks = tasks
    if cfg.endpoint:
        cfg.endpoint = endpoint_urls(cfg.endpoint)
        if cfg.adapter is not None:
            raise UsageError(
                "--adapter loads an adapter here; with --endpoint, evaluate the served adapter by its "
                "name (MODEL:NAME, from weightsmith serve --adapter NAME=DIR)"
            )
    if cfg.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {cfg.concurrency}")


def _cache(cfg: EvalConfig) -> ResultCache | None:
    if not cfg.cache:
        return None
    from weightsmith.files import weightsmith_home

    return ResultCache(Path(cfg.cache_path) if cfg.cache_path else weightsmith_home() / "eval-cache.sqlite")


def run_eval(cfg: EvalConfig, progress: Any = None, *, keep_samples: bool = False) -> dict[str, Any]:
    """Evaluate every model on every task; `progress(label)` returns a `tick(done, total)`
    (and its `loading(model)`, if it has one, wraps each model load). With `keep_samples`, the
    result also holds each run's per-document records under "samples" (run order)."""
    opts, grants = cfg.run, cfg.grants()
    taskset = load_tasks(cfg.tasks, opts, grants)  # every task file and document checked before a model loads
    specs = model_specs(cfg)
    pool = _pool(cfg, taskset)
    cache = _cache(cfg)
    load_kwargs = {k: v for k, v in cfg.load_kwargs().items() if k != "adapter"}
    load_kwargs["progress"] = load_status(progress)
    judge = judge_hook(lambda ref: load_model(ref, **load_kwargs), grants)
    runs, samples, began = [], [], time.time()
    try:
        for spec in specs:
            started = time.perf_counter()
            if pool is None:
                llm = load_model(spec.model, **load_kwargs, adapter=spec.adapter)
                scorer: Any = Scorer(llm.model, llm.tokenizer, batch_size=opts.batch_size)
                fingerprint, extra = model_fingerprint(llm.model), {}
            else:
                llm, before = None, pool.stats()
                served = pool.served_model(spec.model)
                scorer = EndpointScorer(pool, spec.model, batch_size=opts.batch_size)
                fingerprint, extra = endpoint_fingerprint(served), {"served": served}
            runner = Runner(scorer, fingerprint=fingerprint, cache=cache)
            tick = progress(spec.label) if progress else None
            result, run_samples = evaluate(runner, taskset, opts, progress=tick, judge=judge)
            where = f"adapter={spec.adapter}" if pool is None else f"endpoint={','.join(pool.urls)}"
            result["config"].update({"model_args": f"model={spec.model},{where}", "limit": opts.limit})
            if pool is not None:
                extra["endpoints"] = _spent(before, pool.stats())
            result["weightsmith"] = run_metadata(
                spec.label, spec.model, spec.adapter, llm, runner.fingerprint, started,
                cache_hits=runner.cache_hits, **extra,
            )  # fmt: skip
            runs.append(result)
            samples.append(run_samples)
            del llm, scorer, runner
            gc.collect()
    finally:
        if cache is not None:
            cache.close()
        if pool is not None:
            pool.close()
    comparison = compare_runs(runs, samples, reference=0) if len(runs) > 1 else None
    written = _write(cfg, runs, samples, comparison, began) if cfg.out else {}
    result = {"runs": runs, "comparison": comparison, "written": written}
    if keep_samples:
        result["samples"] = samples
    return result


def _write(
    cfg: EvalConfig, runs: list[dict], samples: list[dict], comparison: dict | None, began: float
) -> dict:
    """Every file under OUT (results, samples, comparison, report, lineage); {what: path}."""
    from weightsmith.eval.metrics import DEFINITIONS
    from weightsmith.eval.output import write_outputs
    from weightsmith.eval.stats import ALPHA
    from weightsmith.report.eval_report import write_eval_report

    written = write_outputs(Path(str(cfg.out)), runs, samples, comparison)
    write_eval_report(Path(str(cfg.out)) / "report.html", runs, comparison, DEFINITIONS, alpha=ALPHA)
    written["report"] = str(Path(str(cfg.out)) / "report.html")
    _record_lineage(cfg, runs, began)
    return written


def _record_lineage(cfg: EvalConfig, runs: list[dict[str, Any]], began: float) -> None:
    """OUT's lineage record: the models, adapters and task files, and every run's scores."""
    write_lineage(
        cfg.out, kind="eval", config=cfg, started=began, device=runs[-1]["weightsmith"]["device"],
        inputs={"model": cfg.model, "adapter": cfg.adapter, "compare": _compared(cfg), "tasks": cfg.tasks},
        metrics=headline_metrics(runs),
    )  # fmt: skip


def _compared(cfg: EvalConfig) -> list[str]:
    """The --compare entries as lineage inputs: an adapter folder, or another model."""
    return [e.removeprefix("adapter:") for e in cfg.compare if e.strip() and e.strip() != "base"]


def headline_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """label -> task -> metric -> value of every run (the lineage record's headline numbers)."""
    return {
        run["weightsmith"]["label"]: {
            task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, values in run.get("results", {}).items()
        }
        for run in runs
    }


def _pool(cfg: EvalConfig, taskset: Any) -> EndpointPool | None:
    """The --endpoint pool, once the tasks are known to be ones an endpoint can answer."""
    if not cfg.endpoint:
        return None
    rolling = [t.name for t in taskset.tasks if t.cfg.output_type == "loglikelihood_rolling"]
    if rolling:
        raise UsageError(
            f"--endpoint: {', '.join(rolling)} {'is a' if len(rolling) == 1 else 'are'} loglikelihood_rolling "
            "task(s), whose windows need the model's tokenizer and context length; evaluate them without "
            "--endpoint"
        )
    key = os.environ.get(cfg.api_key_env) or None
    return EndpointPool(cfg.endpoint, api_key=key, concurrency=cfg.concurrency)


def _spent(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """What each endpoint did for one model: requests it answered, tries that failed there."""
    return {url: {k: v - before[url][k] for k, v in counts.items()} for url, counts in after.items()}


def run_metadata(
    label: str, model: str, adapter: str | None, llm: Any, fingerprint: str, started: float, **extra: Any
) -> dict[str, Any]:
    """The `weightsmith` block of a results file: what ran, on which weights, how long
    (`llm` None: the model ran behind endpoints, named in `extra`)."""
    return {
        "version": __version__,
        "label": label,
        "model": model,
        "adapter": adapter,
        "model_hash": fingerprint,
        "device": str(llm.device) if llm is not None else "endpoint",
        "dtype": str(llm.dtype).replace("torch.", "") if llm is not None else None,
        **extra,
        "seconds": round(time.perf_counter() - started, 3),
    }
