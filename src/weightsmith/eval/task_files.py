"""Task files as records: the lm-eval YAML subset weightsmith reads, and `read_task_file`.

A task file is a `TaskFile` record, a group file a `GroupFile`, both loaded through
`weightsmith.config.load_record` (unknown keys with a did-you-mean, typed values, the line of
each key), then checked (`_check_task`, `_check_group`) and resolved into the `TaskConfig` or
`GroupConfig` the eval path uses. Keys lm-eval has and weightsmith ignores are declared `Any`;
keys whose checks depend on the output type (data files, metrics, filters, generation
settings) are checked after loading, each error one line naming the file, the key and its
line. lm-eval's `!function` is refused with advice.

Not here: finding task files and reading their data (`eval/tasks.py`), building prompts
(`eval/prompts.py`), the `judge:` block (`eval/judge.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from weightsmith.config import LineLoader, read_yaml
from weightsmith.config.records import BadField, Where, load_record, where_field
from weightsmith.errors import ConfigError
from weightsmith.grants import Grants

__all__ = [
    "GroupConfig",
    "GroupFile",
    "TaskConfig",
    "TaskFile",
    "read_task_file",
]

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")

#: Metrics each output type can compute, and lm-eval's default list when `metric_list` is absent.
METRICS = {
    "multiple_choice": ("acc", "acc_norm", "acc_bytes", "exact_match", "f1"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}
DEFAULT_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}
AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity", "bits_per_byte", "f1")
DEFAULT_AGGREGATION = {
    "acc": "mean",
    "acc_norm": "mean",
    "acc_bytes": "mean",
    "exact_match": "mean",
    "f1": "f1",
    "perplexity": "perplexity",
    "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity",
    "bits_per_byte": "bits_per_byte",
}
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
EXACT_MATCH_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")
FILTERS = ("regex", "take_first", "lowercase", "uppercase", "remove_whitespace")
#: A task name is part of an output file name (samples_<task>.jsonl): no folders, no dot files.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class PythonFunction:
    """`!function module.name` in an lm-eval task file: recorded, then refused with advice."""

    def __init__(self, name: str) -> None:
        self.name = name


class TaskLoader(LineLoader):
    """Line-marking YAML loader that also parses lm-eval's `!function` tag."""


TaskLoader.add_constructor("!function", lambda loader, node: PythonFunction(loader.construct_scalar(node)))


@dataclass
class MetricSpec:
    name: str
    aggregation: str
    higher_is_better: bool
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilterStep:
    function: str
    regex_pattern: str | None = None
    group_select: int = 0
    fallback: str = "[invalid]"


@dataclass
class FilterSpec:
    name: str
    steps: list[FilterStep]


@dataclass
class TaskConfig:
    """One task, as written in its file (defaults as lm-eval's)."""

    task: str
    source: Path
    output_type: str
    data_files: dict[str, list[Path]]
    data_format: str
    test_split: str | None
    validation_split: str | None
    training_split: str | None
    fewshot_split: str | None
    fewshot_sampler: str
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any
    target_delimiter: str
    fewshot_delimiter: str
    description: str
    num_fewshot: int
    generation_kwargs: dict[str, Any]
    metrics: list[MetricSpec]
    filters: list[FilterSpec]
    version: Any
    judge: dict[str, Any] | None
    raw: dict[str, Any]
    lines: dict[str, int]

    def where(self, key: str | None = None) -> str:
        line = self.lines.get(key.split(".")[0]) if key else None
        return (
            f"{self.source}:{line}: {key}: "
            if line
            else (f"{self.source}: {key}: " if key else f"{self.source}: ")
        )

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.where(key) + message)

    @property
    def eval_split(self) -> str:
        return self.test_split or self.validation_split  # checked non-empty when read


@dataclass
class GroupConfig:
    group: str
    source: Path
    tasks: list[str]
    aggregate: list[dict[str, Any]]
    lines: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# the records


@dataclass(frozen=True, kw_only=True)
class TaskFile:
    """A task file's keys as written (lm-eval's names and defaults)."""

    task: Any = None
    output_type: Literal["multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until"] = (
        "generate_until"
    )
    dataset_path: Any = None
    dataset_kwargs: Any = None
    data_files: Any = None
    test_split: Any = None
    validation_split: Any = None
    training_split: Any = None
    fewshot_split: Any = None
    fewshot_config: Any = None
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: Any = 0
    generation_kwargs: Any = None  # a `GenerationKwargs`, checked for generate_until tasks only
    metric_list: Any = None
    filter_list: Any = None
    metadata: Any = None
    repeats: Any = 1
    judge: Any = None  # checked by eval/judge.py
    # lm-eval keys read and ignored here
    tag: Any = None
    task_alias: Any = None
    dataset_name: Any = None
    should_decontaminate: Any = None
    doc_to_decontamination_query: Any = None
    where: Where = where_field()

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise BadField("task", "every task file needs a task name (task: my_task)")
        if not TASK_NAME.fullmatch(self.task):
            raise BadField(
                "task",
                f"task name {self.task[:80]!r} is not a safe file name: use 1-128 letters, digits, "
                "'_', '-' and '.', starting with a letter or digit (it names samples_<task>.jsonl)",
            )
        num_fewshot = self.num_fewshot or 0
        if not isinstance(num_fewshot, int) or num_fewshot < 0:
            raise BadField("num_fewshot", f"expected a non-negative integer, got {num_fewshot!r}")
        if int(self.repeats or 1) != 1:
            raise BadField("repeats", "only repeats: 1 is supported")


@dataclass(frozen=True, kw_only=True)
class GenerationKwargs:
    """`generation_kwargs:` of a generate_until task."""

    until: Any = field(default_factory=list)
    max_gen_toks: Any = None
    max_new_tokens: Any = None
    do_sample: Any = False
    temperature: Any = 0.0
    where: Where = where_field()

    def settings(self) -> dict[str, Any]:
        """The checked settings, with lm-eval's defaults."""
        until = [self.until] if isinstance(self.until, str) else self.until
        if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
            raise self.where.error("until", "expected a string or a list of strings")
        given = self.where.given
        max_gen = (
            self.max_gen_toks
            if "max_gen_toks" in given
            else self.max_new_tokens
            if "max_new_tokens" in given
            else 256
        )
        if not isinstance(max_gen, int) or max_gen < 1:
            raise self.where.error("max_gen_toks", f"expected a positive integer, got {max_gen!r}")
        do_sample = bool(self.do_sample)
        temperature = float(self.temperature or 0.0) if do_sample else 0.0
        return {
            "until": list(until),
            "max_gen_toks": max_gen,
            "do_sample": do_sample,
            "temperature": temperature,
        }


@dataclass(frozen=True, kw_only=True)
class GroupFile:
    """A group file: `group:` and the `task:` names whose metrics it aggregates."""

    group: Any
    task: Any = None
    group_alias: Any = None
    aggregate_metric_list: Any = None
    metadata: Any = None
    where: Where = where_field()


# ---------------------------------------------------------------------------
# reading


def read_task_file(path: Path, grants: Grants | None = None) -> TaskConfig | GroupConfig:
    """The checked task or group file at `path`; ConfigError naming the file, key and line if bad.

    Its data files must lie in its own folder, or in a folder `grants` (the command line's
    --allow-files) names."""
    data = read_yaml(path, what="task file", hint="check the --tasks path", loader=TaskLoader)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of task keys (task:, dataset_path:, ...), got {type(data).__name__}"
        )
    if "group" in data and "dataset_path" not in data:
        return _check_group(path, load_record(GroupFile, data, source=str(path), line=0))
    for key, value in data.items():
        if isinstance(value, PythonFunction):  # before the key check: process_docs is lm-eval's, not ours
            raise ConfigError(
                f"{path}:{data.key_lines[key]}: {key}: python functions (!function {value.name}) are not "
                "supported in weightsmith task files; preprocess the data file, or use a field name or a "
                "Jinja template"
            )
    return _check_task(path, data, load_record(TaskFile, data, source=str(path), line=0), grants or Grants())


def _check_group(path: Path, group: GroupFile) -> GroupConfig:
    err = group.where.error
    tasks = group.task
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise err("task", "a group needs a list of task names (task: [name, ...])")
    aggregate = group.aggregate_metric_list or []
    if isinstance(aggregate, dict):
        aggregate = [aggregate]
    for i, item in enumerate(aggregate):
        if not isinstance(item, dict) or "metric" not in item:
            raise err(
                "aggregate_metric_list", f"item {i}: expected {{metric: NAME, weight_by_size: true|false}}"
            )
        if item.get("aggregation", "mean") != "mean":
            raise err("aggregate_metric_list", f"item {i}: only aggregation: mean is supported across tasks")
        unknown = set(item) - {"metric", "aggregation", "weight_by_size", "filter_list"}
        if unknown:
            raise err("aggregate_metric_list", f"item {i}: unknown key {sorted(unknown)[0]!r}")
    return GroupConfig(str(group.group), path, list(tasks), list(aggregate), dict(group.where.key_lines))


def _generation_settings(path: Path, spec: TaskFile) -> dict[str, Any]:
    raw = spec.generation_kwargs or {}
    if not isinstance(raw, dict):
        raise spec.where.error("generation_kwargs", "expected a mapping (until: [...], max_gen_toks: N)")
    line = spec.where.key_lines.get("generation_kwargs", 0)
    gen = load_record(GenerationKwargs, raw, source=str(path), line=line, label="generation_kwargs")
    return gen.settings()


def _check_task(path: Path, data: dict, spec: TaskFile, grants: Grants) -> TaskConfig:
    err = spec.where.error
    output_type = spec.output_type
    data_format, files = _data_files(path, spec, err, grants)
    splits = {
        k: getattr(spec, k) for k in ("test_split", "validation_split", "training_split", "fewshot_split")
    }
    for key, split in splits.items():
        if split is not None and split not in files:
            raise err(key, f"split {split!r} is not in data_files (splits: {', '.join(files)})")
    if splits["test_split"] is None and splits["validation_split"] is None:
        if len(files) != 1:
            raise err("test_split", "name the split to evaluate (test_split: NAME or validation_split: NAME)")
        splits["test_split"] = next(iter(files))
    if output_type == "multiple_choice" and spec.doc_to_choice is None:
        raise err(
            "doc_to_choice", "a multiple_choice task needs doc_to_choice (a field, a template or a list)"
        )
    fewshot_config = spec.fewshot_config or {}
    sampler = fewshot_config.get("sampler", "default") if isinstance(fewshot_config, dict) else None
    if sampler not in ("default", "first_n"):
        raise err("fewshot_config", f"sampler must be 'default' or 'first_n', got {sampler!r}")
    gen = _generation_settings(path, spec) if output_type == "generate_until" else {}
    if spec.judge is not None and (output_type != "generate_until" or not isinstance(spec.judge, dict)):
        raise err("judge", "a judge: mapping applies to generate_until tasks only")
    metadata = spec.metadata or {}
    return TaskConfig(
        task=spec.task,
        source=path,
        output_type=output_type,
        data_files=files,
        data_format=data_format,
        test_split=splits["test_split"],
        validation_split=splits["validation_split"],
        training_split=splits["training_split"],
        fewshot_split=splits["fewshot_split"],
        fewshot_sampler=sampler,
        doc_to_text=spec.doc_to_text,
        doc_to_target=spec.doc_to_target,
        doc_to_choice=spec.doc_to_choice,
        target_delimiter=spec.target_delimiter,
        fewshot_delimiter=spec.fewshot_delimiter,
        description=spec.description,
        num_fewshot=spec.num_fewshot or 0,
        generation_kwargs=gen,
        metrics=_metric_list(spec.metric_list, output_type, err),
        filters=_filter_list(spec.filter_list, output_type, err),
        version=metadata.get("version") if isinstance(metadata, dict) else None,
        judge=spec.judge,
        raw=dict(data),
        lines=dict(spec.where.key_lines),
    )


def _data_files(path: Path, spec: TaskFile, err, grants: Grants) -> tuple[str, dict[str, list[Path]]]:
    fmt = spec.dataset_path
    if fmt not in ("json", "csv"):
        raise err(
            "dataset_path",
            f"only local data is supported: dataset_path: json or csv (with dataset_kwargs.data_files), got {fmt!r}",
        )
    kwargs = spec.dataset_kwargs or {}
    if not isinstance(kwargs, dict):
        raise err("dataset_kwargs", "expected a mapping (dataset_kwargs: {data_files: {test: data.jsonl}})")
    unknown = set(kwargs) - {"data_files"}
    if unknown:
        raise err("dataset_kwargs", f"unsupported key {sorted(unknown)[0]!r} (only data_files)")
    key = "dataset_kwargs.data_files" if "data_files" in kwargs else "data_files"
    raw = kwargs.get("data_files", spec.data_files)
    if raw is None:
        raise err("dataset_kwargs", "name the data: dataset_kwargs: {data_files: {test: data.jsonl}}")
    if isinstance(raw, (str, list)):
        raw = {"train": raw}  # as the `datasets` library names a lone file's split
    if not isinstance(raw, dict) or not raw:
        raise err(key, "expected a file, a list of files, or {split: file(s)}")
    files: dict[str, list[Path]] = {}
    for split, names in raw.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise err(f"{key}.{split}", "expected a file name or a list of them")
        resolved = []
        for name in names:
            p = Path(name).expanduser()
            p = p if p.is_absolute() else path.parent / p
            grants.data_file(p, path.parent, lambda m, k=f"{key}.{split}": err(k, m))  # before probing it
            if not p.is_file():
                raise err(f"{key}.{split}", f"data file not found: {p}")
            resolved.append(p)
        files[str(split)] = resolved
    return fmt, files


def _metric_list(raw: Any, output_type: str, err) -> list[MetricSpec]:
    if raw is None:
        return [
            MetricSpec(m, DEFAULT_AGGREGATION[m], m not in LOWER_IS_BETTER)
            for m in DEFAULT_METRICS[output_type]
        ]
    if not isinstance(raw, list) or not raw:
        raise err("metric_list", "expected a list of {metric: NAME, aggregation: ..., higher_is_better: ...}")
    specs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("metric"), str):
            raise err("metric_list", f"item {i}: expected a mapping with a metric: NAME")
        name = item["metric"]
        if name not in METRICS[output_type]:
            raise err(
                "metric_list",
                f"item {i}: metric {name!r} is not available for {output_type} "
                f"(available: {', '.join(METRICS[output_type])})",
            )
        aggregation = item.get("aggregation", DEFAULT_AGGREGATION[name])
        if aggregation not in AGGREGATIONS:
            raise err(
                "metric_list", f"item {i}: unknown aggregation {aggregation!r} ({', '.join(AGGREGATIONS)})"
            )
        extra = {k: v for k, v in item.items() if k not in ("metric", "aggregation", "higher_is_better")}
        allowed = EXACT_MATCH_OPTIONS if name == "exact_match" and output_type == "generate_until" else ()
        for key in extra:
            if key not in allowed:
                raise err("metric_list", f"item {i}: unsupported option {key!r} for {name}")
        regexes = extra.get("regexes_to_ignore")
        if regexes is not None and (
            not isinstance(regexes, list) or not all(isinstance(r, str) for r in regexes)
        ):
            raise err("metric_list", f"item {i}: regexes_to_ignore must be a list of regular expressions")
        higher = item.get("higher_is_better", name not in LOWER_IS_BETTER)
        specs.append(MetricSpec(name, aggregation, bool(higher), extra))
    return specs


def _filter_list(raw: Any, output_type: str, err) -> list[FilterSpec]:
    if raw is None:
        return [FilterSpec("none", [FilterStep("take_first")])]
    if output_type != "generate_until":
        raise err("filter_list", "filters apply to generate_until tasks only")
    if not isinstance(raw, list) or not raw:
        raise err("filter_list", "expected a list of {name: NAME, filter: [{function: ...}, ...]}")
    specs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or "filter" not in item:
            raise err("filter_list", f"item {i}: expected {{name: NAME, filter: [{{function: regex, ...}}]}}")
        steps = []
        for j, step in enumerate(item["filter"] or []):
            if not isinstance(step, dict) or step.get("function") not in FILTERS:
                fn = step.get("function") if isinstance(step, dict) else step
                raise err(
                    "filter_list", f"{item['name']} step {j}: unknown filter {fn!r} ({', '.join(FILTERS)})"
                )
            pattern = (
                step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)") if step["function"] == "regex" else None
            )
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise err("filter_list", f"{item['name']} step {j}: bad regex_pattern: {exc}") from None
            steps.append(
                FilterStep(
                    step["function"],
                    pattern,
                    int(step.get("group_select", 0)),
                    step.get("fallback", "[invalid]"),
                )
            )
        specs.append(FilterSpec(item["name"], steps))
    return specs
