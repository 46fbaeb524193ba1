"""Task files: a documented subset of lm-eval's YAML task schema, found and their data read.

A task file names local data (`dataset_path: json|csv` with `dataset_kwargs.data_files`,
or a top-level `data_files`), how a document becomes a prompt (`doc_to_text`,
`doc_to_target`, `doc_to_choice`: a field name, a Jinja template or a literal), the
request type (`output_type`), metrics and filters. A group file (`group:` with a
`task:` list) aggregates its tasks' metrics. Every mistake is reported before any
model work as one line naming the file and the field.

Relative `data_files` are resolved against the task file's folder (lm-eval resolves
them against the working directory, so run lm-eval from the task folder).

This module finds task files (`resolve_spec`, the built-in suites) and reads their data
(`read_split`); the file format, its records and checks live in `eval/task_files.py` and
its names are re-exported here.

Not here: building prompts (`eval/prompts.py`), scoring (`eval/scorer.py`), metrics.
"""

from __future__ import annotations

import csv
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError, UsageError
from weightsmith.eval.task_files import (
    AGGREGATIONS,
    DEFAULT_AGGREGATION,
    DEFAULT_METRICS,
    EXACT_MATCH_OPTIONS,
    FILTERS,
    LOWER_IS_BETTER,
    METRICS,
    OUTPUT_TYPES,
    FilterSpec,
    FilterStep,
    GroupConfig,
    MetricSpec,
    PythonFunction,
    TaskConfig,
    TaskLoader,
    read_task_file,
)
from weightsmith.files import builtin_file

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
    "AGGREGATIONS",
    "DEFAULT_AGGREGATION",
    "DEFAULT_METRICS",
    "EXACT_MATCH_OPTIONS",
    "FILTERS",
    "LOWER_IS_BETTER",
    "METRICS",
    "OUTPUT_TYPES",
    "FilterSpec",
    "FilterStep",
    "GroupConfig",
    "MetricSpec",
    "PythonFunction",
    "TaskConfig",
    "TaskLoader",
    "read_split",
    "read_task_file",
    "resolve_spec",
]
