"""Run tasks on one model: build every request, answer them (cache first, then one
batched pass per request kind across all tasks), compute per-document metrics,
aggregate with standard errors, and lay the results out as lm-eval's results.json.

Not here: loading models (the CLI), comparing runs (`eval/stats.py`), writing files
(`eval/output.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.eval import metrics as M
from weightsmith.eval.cache import ResultCache, request_key
from weightsmith.eval.judge import (
    JudgeConfig,
    aggregate_judge,
    agreement,
    human_scores,
    make_judge,
    score_with_judge,
)
from weightsmith.eval.prompts import ChatFormatter, DocRequests, Task
from weightsmith.eval.scorer import Progress, Scorer
from weightsmith.eval.tasks import (
    GroupConfig,
    TaskConfig,
    builtin_names,
    dump_config,
    read_task_file,
    resolve_spec,
    suites_dir,
)
from weightsmith.grants import Grants

if TYPE_CHECKING:
    from weightsmith.eval.endpoint import EndpointScorer


@dataclass(kw_only=True)
class EvalOptions:
    """How tasks are rendered, scored and aggregated. Declared once here; the eval command
    embeds it flattened, so these are its flags (`--limit`, `--num-fewshot`...) as they are."""

    limit: float | None = opt(None, "documents per task: a count, or a fraction below 1")
    num_fewshot: int | None = opt(None, "few-shot examples per prompt (none: each task's own num_fewshot)")
    batch_size: int = opt(64, "requests scored together (also capped at 16,384 tokens a batch)")
    apply_chat_template: bool = opt(False, "wrap each prompt in the model's chat template (instruct models)")
    system_instruction: str | None = opt(None, "system message for --apply-chat-template (or a text prefix)")
    fewshot_seed: int = opt(1234, "seed of the few-shot sampler (lm-eval's default)")
    bootstrap_iters: int = opt(1000, "resamples for bootstrap standard errors")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"--limit: expected a positive count or fraction, got {self.limit}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size: expected at least 1, got {self.batch_size}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UsageError(f"--num-fewshot: expected 0 or more, got {self.num_fewshot}")
        if self.bootstrap_iters < 0:
            raise UsageError(f"--bootstrap-iters: expected 0 or more, got {self.bootstrap_iters}")


@dataclass
class TaskSet:
    tasks: list[Task]
    groups: list[GroupConfig] = field(default_factory=list)


def load_tasks(specs: list[str], opts: EvalOptions | None = None, grants: Grants | None = None) -> TaskSet:
    """Read and check every task file named by `specs` (and each group's members), and
    render every document's requests with `opts` (no model needed), so a missing template
    field, a gold index out of range or too few few-shot examples stop the run before any
    model loads. `grants`: what the command line lets task files reach (weightsmith.grants)."""
    opts = opts or EvalOptions()
    grants = grants or Grants()
    tasks: dict[str, Task] = {}
    groups: list[GroupConfig] = []
    for spec in specs:
        for path in resolve_spec(spec):
            item = read_task_file(path, grants)
            if isinstance(item, GroupConfig):
                groups.append(item)
                for name in item.tasks:
                    if name not in tasks:
                        tasks[name] = Task(_find_member(item, name, grants))
            elif item.task not in tasks:
                tasks[item.task] = Task(item)
    for task in tasks.values():
        if task.cfg.judge:  # checked now, before any model work: fields, endpoint and key grants
            line = task.cfg.lines.get("judge")
            source = f"{task.cfg.source}{f':{line}' if line else ''}"
            JudgeConfig.from_dict(task.cfg.judge, source=source).check_grants(grants)
    for task in tasks.values():
        # Without the chat template (it needs the tokenizer): it only wraps the rendered text.
        task.build(
            limit=opts.limit,
            num_fewshot=opts.num_fewshot,
            seed=opts.fewshot_seed,
            system_instruction=opts.system_instruction,
        )
    if not tasks:
        raise UsageError("no tasks to run; give --tasks FILE.yaml, a folder, or builtin:NAME")
    return TaskSet(list(tasks.values()), groups)


def _find_member(group: GroupConfig, name: str, grants: Grants) -> TaskConfig:
    """A group's task by name: a task file beside the group file, else a built-in suite."""
    folders = [group.source.parent] + ([suites_dir()] if group.source.parent != suites_dir() else [])
    for folder in folders:
        for path in sorted(folder.glob("*.y*ml")):
            if path == group.source:
                continue
            try:
                item = read_task_file(path, grants)
            except Exception:  # noqa: BLE001 - a broken neighbour is reported only if it is the one named
                if path.stem.replace("-", "_") == name:
                    raise
                continue
            if isinstance(item, TaskConfig) and item.task == name:
                return item
    line = group.lines.get("task")
    raise UsageError(
        f"{group.source}{f':{line}' if line else ''}: task: group {group.group!r} names task {name!r}, "
        "which no task file beside it "
        f"defines (built-in suites: {', '.join(builtin_names())})"
    )


class Runner:
    """Evaluates tasks on one scorer, with an optional cache keyed by model fingerprint."""

    def __init__(
        self, scorer: Scorer | EndpointScorer, *, fingerprint: str, cache: ResultCache | None = None
    ) -> None:
        self.scorer = scorer
        self.fingerprint = fingerprint
        self.cache = cache
        self.cache_hits = 0

    def chat_formatter(self) -> ChatFormatter:
        return self.scorer.chat_formatter()

    def build(self, taskset: TaskSet, opts: EvalOptions) -> dict[str, list[DocRequests]]:
        chat = self.chat_formatter() if opts.apply_chat_template else None
        return {
            t.name: t.build(
                limit=opts.limit,
                num_fewshot=opts.num_fewshot,
                seed=opts.fewshot_seed,
                chat=chat,
                system_instruction=opts.system_instruction,
            )
            for t in taskset.tasks
        }

    def answer(
        self, built: dict[str, list[DocRequests]], tasks: list[Task], progress: Callable | None
    ) -> None:
        """Fill every request's response (`DocRequests.responses`), cache first."""
        by_kind: dict[str, list[tuple[DocRequests, int]]] = {"ll": [], "rolling": [], "generate": []}
        kinds = {t.name: t.cfg.output_type for t in tasks}
        for name, docs in built.items():
            kind = {"loglikelihood_rolling": "rolling", "generate_until": "generate"}.get(kinds[name], "ll")
            for d in docs:
                d.responses = [None] * len(d.arguments)
                by_kind[kind].extend((d, i) for i in range(len(d.arguments)))
        check = getattr(self.scorer, "check_requests", None)  # an endpoint refuses some kinds up front
        if check is not None:
            check({kind: [d.arguments[i] for d, i in items] for kind, items in by_kind.items()})
        total = sum(len(v) for v in by_kind.values())
        tick = progress_ticker(progress, total)
        for kind, items in by_kind.items():
            if not items:
                continue
            keys = [request_key(self.fingerprint, kind, list(d.arguments[i])) for d, i in items]
            found = self.cache.get_many(set(keys)) if self.cache else {}
            todo = [(n, d, i) for n, (d, i) in enumerate(items) if keys[n] not in found]
            self.cache_hits += len(items) - len(todo)
            if len(items) - len(todo):
                tick(len(items) - len(todo))
            # A scorer with a `chunk` (endpoints: long runs) is cached a chunk at a time, so an
            # interrupted run keeps what it got; the local scorer takes all at once (it sorts by length).
            step = getattr(self.scorer, "chunk", None) or max(1, len(todo))
            for start in range(0, len(todo), step):
                part = todo[start : start + step]
                values = self._run(kind, [d.arguments[i] for _, d, i in part], tick)
                fresh = {keys[n]: v for (n, _, _), v in zip(part, values, strict=True)}
                if self.cache and fresh:
                    self.cache.put_many(fresh)
                found.update(fresh)
            for n, (d, i) in enumerate(items):
                d.responses[i] = found[keys[n]]

    def _run(self, kind: str, args: list[tuple], tick: Progress) -> list[Any]:
        if kind == "ll":
            return [list(r) for r in self.scorer.loglikelihood([(a[0], a[1]) for a in args], tick)]
        if kind == "rolling":
            return self.scorer.loglikelihood_rolling([a[0] for a in args], tick)
        return self.scorer.generate_until([(a[0], a[1]) for a in args], tick)


def progress_ticker(progress: Callable | None, total: int) -> Progress:
    """A `tick(n)` that counts finished requests and reports `progress(done, total)` (if given)."""
    state = {"done": 0}

    def tick(n: int) -> None:
        state["done"] += n
        if progress:
            progress(state["done"], total)

    return tick


def doc_metrics(task: Task, d: DocRequests) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'metric,filter': value}, extras for the sample record) for one answered document."""
    cfg = task.cfg
    wanted = {m.name for m in cfg.metrics}
    resp = d.responses
    if cfg.output_type == "multiple_choice":
        lls = [r[0] for r in resp]
        greedy = [bool(r[1]) for r in resp]
        values = M.multiple_choice(lls, greedy, d.choices or [], d.target, wanted)
        return {f"{k},none": v for k, v in values.items()}, {
            "filtered_resps": [[ll, g] for ll, g in zip(lls, greedy, strict=True)]
        }
    if cfg.output_type == "loglikelihood":
        values = M.loglikelihood(resp[0][0], bool(resp[0][1]), wanted)
        return {f"{k},none": v for k, v in values.items()}, {"filtered_resps": resp}
    if cfg.output_type == "loglikelihood_rolling":
        values = M.rolling(resp[0], d.arguments[0][0], wanted)
        return {f"{k},none": v for k, v in values.items()}, {"filtered_resps": resp}
    per_filter = M.generation(resp[0], d.target, d.choices, cfg.metrics, cfg.filters)
    out, answers = {}, {}
    for fname, values in per_filter.items():
        answers[fname] = values.pop("_answer")
        out.update({f"{k},{fname}": v for k, v in values.items()})
    return out, {"filtered_resps": answers}


def aggregate_task(task: Task, records: list[dict], iters: int) -> tuple[dict[str, Any], dict[str, bool]]:
    cfg = task.cfg
    result: dict[str, Any] = {"alias": cfg.raw.get("task_alias", cfg.task)}
    higher: dict[str, bool] = {}
    filters = [f.name for f in cfg.filters] if cfg.output_type == "generate_until" else ["none"]
    for fname in filters:
        for m in cfg.metrics:
            key = f"{m.name},{fname}"
            items = [r["metrics"][key] for r in records if key in r["metrics"]]
            if not items:
                continue
            result[key] = M.aggregate(m.aggregation, items)
            se = M.stderr(m.aggregation, items, iters)
            result[f"{m.name}_stderr,{fname}"] = "N/A" if se is None else se
            higher[m.name] = m.higher_is_better
        for name in ("judge_score", "judge_pass"):
            key = f"{name},{fname}"
            items = [r["metrics"][key] for r in records if r["metrics"].get(key) is not None]
            if items:
                result[key] = M.aggregate("mean", items)
                se = M.stderr("mean", items, iters)
                result[f"{name}_stderr,{fname}"] = "N/A" if se is None else se
                higher[name] = True
    return result, higher


def judge_hook(
    load_model: Callable[[str], Any], grants: Grants | None = None
) -> Callable[[Task, list[dict]], dict]:
    """Scores a generate_until task's answers with its `judge:`; returns results extras
    (unparsable count, agreement with human labels). An endpoint judge needs `grants`."""
    backends: dict[tuple, Any] = {}

    def run(task: Task, records: list[dict]) -> dict:
        cfg = JudgeConfig.from_dict(task.cfg.judge, source=str(task.cfg.source))
        key = (cfg.model, cfg.endpoint_model)
        if key not in backends:
            backends[key] = make_judge(cfg, load_model=load_model, grants=grants or Grants())
        fname = task.cfg.filters[0].name
        items = [
            {
                "doc": r["doc"],
                "question": r["arguments"][0][0],
                "answer": r["filtered_resps"][fname],
                "reference": _reference(r["target"], r.get("choices")),
            }
            for r in records
        ]
        scores = score_with_judge(cfg, backends[key], items)
        for r, s in zip(records, scores, strict=True):
            r["metrics"][f"judge_score,{fname}"] = s["judge_score"]
            r["metrics"][f"judge_pass,{fname}"] = s["judge_pass"]
            r["judge_raw"] = s["judge_raw"]
        extras: dict[str, Any] = {"judge_unparsable": aggregate_judge(scores)["judge_unparsable"]}
        if cfg.human_label:
            human = human_scores(cfg, [r["doc"] for r in records])
            judged = [s["judge_score"] for s in scores]
            pairs = [(j, h) for j, h in zip(judged, human, strict=True) if h is not None]
            extras["judge_agreement"] = agreement([j for j, _ in pairs], [h for _, h in pairs], cfg.scale)
        return extras

    return run


def _reference(target: Any, choices: list[str] | None) -> str:
    if choices is not None and isinstance(target, int):
        return choices[target]
    return target[0] if isinstance(target, list) and target else str(target)


def aggregate_group(group: GroupConfig, results: dict[str, dict], sizes: dict[str, int]) -> dict[str, Any]:
    """lm-eval's group aggregation: a (size-weighted or plain) mean of the members' values,
    with the pooled standard error (weighted) or sqrt(sum se^2) / k (plain)."""
    out: dict[str, Any] = {"alias": group.group}
    for spec in group.aggregate:
        weighted = bool(spec.get("weight_by_size", True))
        for fname in spec.get("filter_list", ["none"]) or ["none"]:
            key = f"{spec['metric']},{fname}"
            members = [t for t in group.tasks if key in results.get(t, {})]
            if not members:
                continue
            values = [results[t][key] for t in members]
            n = [sizes[t] for t in members]
            weights = n if weighted else [1] * len(n)
            out[key] = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
            stderrs = [results[t].get(f"{spec['metric']}_stderr,{fname}") for t in members]
            if any(not isinstance(s, float) for s in stderrs):
                se: Any = "N/A"
            elif weighted:
                pooled = sum((k - 1) * s**2 * k for k, s in zip(n, stderrs, strict=True)) / (sum(n) - len(n))
                se = math.sqrt(pooled / sum(n))
            else:
                se = math.sqrt(sum(s**2 for s in stderrs)) / len(stderrs)
            out[f"{spec['metric']}_stderr,{fname}"] = se
    return out


def evaluate(
    runner: Runner, taskset: TaskSet, opts: EvalOptions, *, progress: Callable | None = None, judge=None
) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """(results in lm-eval's results.json layout, per-task sample records)."""
    start = time.perf_counter()
    built = runner.build(taskset, opts)
    runner.answer(built, taskset.tasks, progress)
    results: dict[str, Any] = {}
    samples: dict[str, list[dict]] = {}
    higher: dict[str, dict[str, bool]] = {}
    for task in taskset.tasks:
        records = []
        for d in built[task.name]:
            values, extra = doc_metrics(task, d)
            records.append(
                {
                    "doc_id": d.doc_id,
                    "doc": d.doc,
                    "target": d.target,
                    "choices": d.choices,
                    "arguments": [list(a) for a in d.arguments],
                    "resps": d.responses,
                    **extra,
                    "metrics": values,
                }
            )
        extras = judge(task, records) if judge is not None and task.cfg.judge else {}
        samples[task.name] = records
        results[task.name], higher[task.name] = aggregate_task(task, records, opts.bootstrap_iters)
        results[task.name].update(extras)
    sizes = {t.name: len(built[t.name]) for t in taskset.tasks}
    groups = {g.group: aggregate_group(g, results, sizes) for g in taskset.groups}
    out = {
        "results": {**groups, **results},
        "groups": groups,
        "group_subtasks": {g.group: list(g.tasks) for g in taskset.groups}
        | {t.name: [] for t in taskset.tasks if not any(t.name in g.tasks for g in taskset.groups)},
        "configs": {t.name: dump_config(t.cfg) for t in taskset.tasks},
        "group_configs": {g.group: {"aggregate_metric_list": g.aggregate} for g in taskset.groups},
        "versions": {t.name: t.cfg.version for t in taskset.tasks},
        "n-shot": {
            t.name: t.cfg.num_fewshot if opts.num_fewshot is None else opts.num_fewshot for t in taskset.tasks
        },
        "higher_is_better": higher,
        "n-samples": {t.name: {"original": len(t.docs), "effective": sizes[t.name]} for t in taskset.tasks},
        "config": {
            "model": "weightsmith",
            "batch_size": runner.scorer.batch_size,
            "limit": opts.limit,
            "num_fewshot": opts.num_fewshot,
            "apply_chat_template": opts.apply_chat_template,
            "bootstrap_iters": opts.bootstrap_iters,
            "fewshot_seed": opts.fewshot_seed,
        },
        "date": time.time(),
        "total_evaluation_time_seconds": str(round(time.perf_counter() - start, 3)),
    }
    return out, samples


__all__ = ["EvalOptions", "Runner", "TaskSet", "evaluate", "load_tasks"]
