"""Task files: a documented subset of lm-eval's YAML task schema, read and checked.

A task file names local data (`dataset_path: json|csv` with `dataset_kwargs.data_files`,
or a top-level `data_files`), how a document becomes a prompt (`doc_to_text`,
`doc_to_target`, `doc_to_choice`: a field name, a Jinja template or a literal), the
request type (`output_type`), metrics and filters. A group file (`group:` with a
`task:` list) aggregates its tasks' metrics. Every mistake is reported before any
model work as one line naming the file and the field.

Relative `data_files` are resolved against the task file's folder (lm-eval resolves
them against the working directory, so run lm-eval from the task folder).

Not here: building prompts (`eval/prompts.py`), scoring (`eval/scorer.py`), metrics.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from weightsmith.config import LineLoader, read_yaml
from weightsmith.errors import ConfigError, UsageError
from weightsmith.files import builtin_file

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

_TASK_KEYS = {
    "task", "tag", "task_alias", "dataset_path", "dataset_name", "dataset_kwargs", "data_files",
    "training_split", "validation_split", "test_split", "fewshot_split", "fewshot_config",
    "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "fewshot_delimiter",
    "description", "num_fewshot", "output_type", "generation_kwargs", "metric_list",
    "filter_list", "metadata", "should_decontaminate", "doc_to_decontamination_query",
    "repeats", "judge",
}  # fmt: skip
_GROUP_KEYS = {"group", "group_alias", "task", "aggregate_metric_list", "metadata"}
_GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "max_new_tokens"}


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
# reading files


def suites_dir() -> Path:
    """The folder holding the built-in suites (`builtin:NAME`)."""
    return Path(str(resources.files("weightsmith.eval") / "suites"))


def builtin_names() -> list[str]:
    folder = suites_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_spec(spec: str) -> list[Path]:
    """`builtin:NAME`, a .yaml file or a folder of them -> task/group files."""
    spec = spec.strip()
    found = builtin_file(spec, suites_dir(), (".yaml",), "suite")
    if found is not None:
        return [found]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml")))
        if not files:
            raise UsageError(f"{path}: no task files (*.yaml) in this folder")
        return files
    if not path.exists():
        raise UsageError(
            f"task file not found: {spec} (give a .yaml task file, a folder of them, or builtin:NAME)"
        )
    return [path]


def read_task_file(path: Path) -> TaskConfig | GroupConfig:
    data = read_yaml(path, what="task file", hint="check the --tasks path", loader=TaskLoader)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of task keys (task:, dataset_path:, ...), got {type(data).__name__}"
        )
    if "group" in data and "dataset_path" not in data:
        return _read_group(path, data)
    return _read_task(path, data)


def _lines(data: Any) -> dict[str, int]:
    return dict(getattr(data, "key_lines", {}))


def _read_group(path: Path, data: dict) -> GroupConfig:
    lines = _lines(data)

    def err(key: str, msg: str) -> ConfigError:
        line = lines.get(key)
        return ConfigError(f"{path}:{line}: {key}: {msg}" if line else f"{path}: {key}: {msg}")

    for key in data:
        if key not in _GROUP_KEYS:
            raise err(str(key), f"unknown group key{_hint(key, _GROUP_KEYS)}")
    tasks = data.get("task")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise err("task", "a group needs a list of task names (task: [name, ...])")
    aggregate = data.get("aggregate_metric_list") or []
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
    return GroupConfig(str(data["group"]), path, list(tasks), list(aggregate), lines)


def _hint(key: Any, options: set[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), sorted(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _read_task(path: Path, data: dict) -> TaskConfig:
    lines = _lines(data)

    def err(key: str, msg: str) -> ConfigError:
        line = lines.get(key.split(".")[0])
        return ConfigError(f"{path}:{line}: {key}: {msg}" if line else f"{path}: {key}: {msg}")

    for key, value in data.items():
        if isinstance(value, PythonFunction):  # before the key check: process_docs is lm-eval's, not ours
            raise err(
                str(key),
                f"python functions (!function {value.name}) are not supported in weightsmith task files; "
                "preprocess the data file, or use a field name or a Jinja template",
            )
        if key not in _TASK_KEYS:
            raise err(str(key), f"unknown or unsupported task key{_hint(key, _TASK_KEYS)}")
    if "task" not in data or not isinstance(data["task"], str) or not data["task"]:
        raise err("task", "every task file needs a task name (task: my_task)")
    output_type = data.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise err(
            "output_type", f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}"
        )
    data_format, files = _data_files(path, data, err)
    splits = {k: data.get(k) for k in ("test_split", "validation_split", "training_split", "fewshot_split")}
    for key, split in splits.items():
        if split is not None and split not in files:
            raise err(key, f"split {split!r} is not in data_files (splits: {', '.join(files)})")
    if splits["test_split"] is None and splits["validation_split"] is None:
        if len(files) == 1:
            splits["test_split"] = next(iter(files))
        else:
            raise err("test_split", "name the split to evaluate (test_split: NAME or validation_split: NAME)")
    if int(data.get("repeats", 1) or 1) != 1:
        raise err("repeats", "only repeats: 1 is supported")
    if "doc_to_choice" in data and output_type not in ("multiple_choice", "generate_until"):
        pass  # lm-eval ignores it elsewhere
    if output_type == "multiple_choice" and data.get("doc_to_choice") is None:
        raise err(
            "doc_to_choice", "a multiple_choice task needs doc_to_choice (a field, a template or a list)"
        )
    num_fewshot = data.get("num_fewshot", 0) or 0
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise err("num_fewshot", f"expected a non-negative integer, got {num_fewshot!r}")
    fewshot_config = data.get("fewshot_config") or {}
    sampler = fewshot_config.get("sampler", "default") if isinstance(fewshot_config, dict) else None
    if sampler not in ("default", "first_n"):
        raise err("fewshot_config", f"sampler must be 'default' or 'first_n', got {sampler!r}")
    for key in ("target_delimiter", "fewshot_delimiter", "description"):
        if key in data and not isinstance(data[key], str):
            raise err(key, f"expected a string, got {data[key]!r}")
    gen = _generation_kwargs(data.get("generation_kwargs"), err) if output_type == "generate_until" else {}
    metrics = _metric_list(data.get("metric_list"), output_type, err)
    filters = _filter_list(data.get("filter_list"), output_type, err)
    judge = data.get("judge")
    if judge is not None and (output_type != "generate_until" or not isinstance(judge, dict)):
        raise err("judge", "a judge: mapping applies to generate_until tasks only")
    metadata = data.get("metadata") or {}
    return TaskConfig(
        task=data["task"],
        source=path,
        output_type=output_type,
        data_files=files,
        data_format=data_format,
        test_split=splits["test_split"],
        validation_split=splits["validation_split"],
        training_split=splits["training_split"],
        fewshot_split=splits["fewshot_split"],
        fewshot_sampler=sampler,
        doc_to_text=data.get("doc_to_text"),
        doc_to_target=data.get("doc_to_target"),
        doc_to_choice=data.get("doc_to_choice"),
        target_delimiter=data.get("target_delimiter", " "),
        fewshot_delimiter=data.get("fewshot_delimiter", "\n\n"),
        description=data.get("description", ""),
        num_fewshot=num_fewshot,
        generation_kwargs=gen,
        metrics=metrics,
        filters=filters,
        version=metadata.get("version") if isinstance(metadata, dict) else None,
        judge=judge,
        raw=dict(data),
        lines=lines,
    )


def _data_files(path: Path, data: dict, err) -> tuple[str, dict[str, list[Path]]]:
    fmt = data.get("dataset_path")
    if fmt not in ("json", "csv"):
        raise err(
            "dataset_path",
            f"only local data is supported: dataset_path: json or csv (with dataset_kwargs.data_files), got {fmt!r}",
        )
    kwargs = data.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise err("dataset_kwargs", "expected a mapping (dataset_kwargs: {data_files: {test: data.jsonl}})")
    unknown = set(kwargs) - {"data_files"}
    if unknown:
        raise err("dataset_kwargs", f"unsupported key {sorted(unknown)[0]!r} (only data_files)")
    key = "dataset_kwargs.data_files" if "data_files" in kwargs else "data_files"
    raw = kwargs.get("data_files", data.get("data_files"))
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
            if not p.is_file():
                raise err(f"{key}.{split}", f"data file not found: {p}")
            resolved.append(p)
        files[str(split)] = resolved
    return fmt, files


def _generation_kwargs(raw: Any, err) -> dict[str, Any]:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise err("generation_kwargs", "expected a mapping (until: [...], max_gen_toks: N)")
    for key in raw:
        if key not in _GENERATION_KEYS:
            raise err(
                f"generation_kwargs.{key}", f"unsupported generation setting{_hint(key, _GENERATION_KEYS)}"
            )
    until = raw.get("until", [])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise err("generation_kwargs.until", "expected a string or a list of strings")
    max_gen = raw.get("max_gen_toks", raw.get("max_new_tokens", 256))
    if not isinstance(max_gen, int) or max_gen < 1:
        raise err("generation_kwargs.max_gen_toks", f"expected a positive integer, got {max_gen!r}")
    do_sample = bool(raw.get("do_sample", False))
    temperature = float(raw.get("temperature", 0.0) or 0.0) if do_sample else 0.0
    return {"until": list(until), "max_gen_toks": max_gen, "do_sample": do_sample, "temperature": temperature}


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
                import re

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


# ---------------------------------------------------------------------------
# data


def read_split(cfg: TaskConfig, split: str) -> list[dict[str, Any]]:
    """Every document of a split, in file order."""
    docs: list[dict[str, Any]] = []
    for path in cfg.data_files[split]:
        docs.extend(_read_json(path) if cfg.data_format == "json" else _read_csv(path))
    return docs


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read data file: {exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of documents
        try:
            docs = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
        lines = None
    else:
        docs, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except ValueError as exc:
                # exc.msg without json's own "line 1 column C", which would contradict the file line
                detail = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else exc
                raise ConfigError(f"{path}:{n}: invalid JSON line: {detail}") from None
            lines.append(n)
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            where = f"{path}:{lines[i]}" if lines else f"{path}: item {i}"
            raise ConfigError(f"{where}: each document must be a JSON object, got {type(doc).__name__}")
    return docs


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read CSV data: {exc}") from None
    if not rows:
        return []
    # Columns whose every value is an integer (or a number) become numbers, as the
    # `datasets` CSV reader (pandas) infers them, so `label` columns index choices.
    for column in rows[0]:
        values = [r[column] for r in rows]
        for kind in (int, float):
            try:
                converted = [kind(v) for v in values]
            except (TypeError, ValueError):
                continue
            if kind is float and any(math.isnan(v) for v in converted):
                break
            for r, v in zip(rows, converted, strict=True):
                r[column] = v
            break
    return rows


def dump_config(cfg: TaskConfig) -> dict[str, Any]:
    """The task's settings as plain data for results.json's `configs` block."""
    out = {k: v for k, v in cfg.raw.items() if k != "judge"}
    out["dataset_kwargs"] = {"data_files": {s: [str(p) for p in ps] for s, ps in cfg.data_files.items()}}
    out.pop("data_files", None)
    return json.loads(json.dumps(out, default=str))


__all__ = [
    "GroupConfig",
    "TaskConfig",
    "read_split",
    "read_task_file",
    "resolve_spec",
]
