"""One self-contained HTML page for evaluation runs: metadata, results, comparison, a chart.

The page has no external URLs and no JavaScript; the chart (each task's primary metric per
model, with stderr error bars) is a matplotlib PNG embedded as base64. Every string that
comes from the runs is escaped. Not here: computing statistics (weightsmith.eval.stats).
"""

from __future__ import annotations

import datetime as dt
import math
from html import escape
from pathlib import Path
from typing import Any

from weightsmith.report.html import figure_png, fmt, image, new_figure, plain, write_page
from weightsmith.report.interval_names import method_line
from weightsmith.report.runs import metric_keys, run_label

_META_FIELDS = ("model", "adapter", "limit", "num_fewshot", "date")


def _metric_name(metric: str, filt: str) -> str:
    return metric if filt == "none" else f"{metric} ({filt})"


def _date(run: dict) -> Any:
    date = (run.get("config") or {}).get("date", run.get("date"))
    if isinstance(date, (int, float)) and not isinstance(date, bool):  # lm-eval stores a timestamp
        return dt.datetime.fromtimestamp(date, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return date


def _meta_table(runs: list[dict], labels: list[str]) -> str:
    head = "".join(f"<th>{escape(f)}</th>" for f in _META_FIELDS)
    rows = []
    for run, label in zip(runs, labels, strict=True):
        # Our own block names the model and adapter; lm-eval's `config.model` is the backend.
        cfg = (run.get("config") or {}) | {
            k: v for k, v in (run.get("weightsmith") or {}).items() if k in _META_FIELDS
        }
        vals = [cfg.get(f) for f in _META_FIELDS[:-1]] + [_date(run)]
        rows.append(f"<tr><td>{escape(label)}</td>" + "".join(f"<td>{fmt(v)}</td>" for v in vals) + "</tr>")
    return f"<table><tr><th>run</th>{head}</tr>{''.join(rows)}</table>"


def _tasks(runs: list[dict]) -> list[str]:
    """Every task in any run, in order of first appearance."""
    seen: dict[str, None] = {}
    for run in runs:
        seen.update(dict.fromkeys(run.get("results") or {}))
    return list(seen)


def _task_metrics(runs: list[dict], task: str) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for run in runs:
        seen.update(dict.fromkeys(metric_keys((run.get("results") or {}).get(task) or {})))
    return list(seen)


def _value(run: dict, task: str, metric: str, filt: str) -> tuple[Any, Any]:
    res = (run.get("results") or {}).get(task) or {}
    return res.get(f"{metric},{filt}"), res.get(f"{metric}_stderr,{filt}")


def _results_tables(runs: list[dict], labels: list[str], definitions: dict[str, str]) -> str:
    out = []
    head = "".join(f"<th>{escape(lab)}</th>" for lab in labels)
    for task in _tasks(runs):
        rows = []
        for metric, filt in _task_metrics(runs, task):
            cells = []
            for run in runs:
                v, se = _value(run, task, metric, filt)
                pm = f" ± {fmt(se)}" if isinstance(se, (int, float)) and not isinstance(se, bool) else ""
                cells.append(f'<td class="num">{fmt(v)}{pm}</td>')
            rows.append(
                f"<tr><td>{escape(_metric_name(metric, filt))}</td>{''.join(cells)}"
                f'<td class="def">{escape(definitions.get(metric, ""))}</td></tr>'
            )
        out.append(
            f"<h3>{escape(task)}</h3><table><tr><th>metric</th>{head}<th>definition</th></tr>"
            f"{''.join(rows)}</table>"
        )
    return "".join(out)


def _marker(better: Any) -> str:
    if better is True:
        return '<span class="up" title="significantly better">▲</span>'
    if better is False:
        return '<span class="down" title="significantly worse">▼</span>'
    return ""


def _comparison_table(comparison: dict, alpha: float) -> str:
    ref = comparison.get("reference", "")
    others = [lab for lab in comparison.get("labels", []) if lab != ref]
    head = (
        f"<tr><th>task</th><th>metric</th><th>{escape(str(ref))} (reference)</th><th>compared</th>"
        "<th>value</th><th>Δ</th><th>test</th><th>p-value</th><th>CI of Δ</th><th>interval</th><th></th></tr>"
    )
    rows = []
    for row in comparison.get("rows", []):
        method = escape(method_line(row.get("interval"), short=True)) or "—"
        for lab in others:
            ci = (row.get("ci") or {}).get(lab)
            ci_s = f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "—"
            rows.append(
                f"<tr><td>{escape(str(row.get('task', '')))}</td>"
                f"<td>{escape(_metric_name(str(row.get('metric', '')), str(row.get('filter', 'none'))))}</td>"
                f'<td class="num">{fmt(row["values"].get(ref))}</td><td>{escape(lab)}</td>'
                f'<td class="num">{fmt(row["values"].get(lab))}</td>'
                f'<td class="num">{fmt((row.get("delta") or {}).get(lab))}</td>'
                f"<td>{escape(str(row.get('test') or '—'))}</td>"
                f'<td class="num">{fmt((row.get("p_value") or {}).get(lab), 3)}</td>'
                f'<td class="num">{ci_s}</td><td>{method}</td>'
                f"<td>{_marker((row.get('better') or {}).get(lab))}</td></tr>"
            )
    note = (
        f'<p class="muted">▲/▼: better/worse than the reference at p &lt; {alpha} '
        "(direction from the metric's higher_is_better). Per-document 0/1 metrics (accuracies): "
        "McNemar's test and Newcombe's hybrid score interval for paired proportions (method 10); "
        "other metrics: a paired percentile bootstrap. Documents paired by doc_id.</p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{note}"


def _chart_png(runs: list[dict], labels: list[str]) -> str | None:
    """Base64 PNG: one panel per primary metric, a group of bars (one per run) per task."""
    panels: dict[str, list[tuple[str, str]]] = {}  # metric -> [(task, filter)]
    for task in _tasks(runs):
        keys = _task_metrics(runs, task)
        if keys:
            panels.setdefault(keys[0][0], []).append((task, keys[0][1]))
    if not panels:
        return None
    bars = max(len(v) for v in panels.values()) * len(runs)
    fig = new_figure(min(16.0, max(6.0, 2.0 + 0.5 * bars)), 3.4 * len(panels))
    width = 0.8 / len(runs)
    for p, (metric, tasks) in enumerate(panels.items()):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        for r, (run, label) in enumerate(zip(runs, labels, strict=True)):
            vals, errs = [], []
            for task, filt in tasks:
                v, se = _value(run, task, metric, filt)
                vals.append(v if isinstance(v, (int, float)) else math.nan)
                errs.append(se if isinstance(se, (int, float)) and not isinstance(se, bool) else 0.0)
            xs = [i + (r - (len(runs) - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, vals, width, yerr=errs, capsize=3, label=plain(label))
        ax.set_xticks(range(len(tasks)), [plain(t) for t, _ in tasks], rotation=20, ha="right")
        ax.set_ylabel(plain(metric))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return figure_png(fig)


def write_eval_report(
    path: Path, runs: list[dict], comparison: dict | None, definitions: dict[str, str], *, alpha: float
) -> None:
    """Write the HTML report to `path` atomically; `alpha` is the level the comparison was judged at."""
    labels = [run_label(r, i) for i, r in enumerate(runs)]
    title = "Evaluation report: " + ", ".join(labels)
    parts = [
        "<h2>Runs</h2>",
        _meta_table(runs, labels),
        "<h2>Results</h2>",
        _results_tables(runs, labels, definitions),
    ]
    if comparison is not None:
        ref = escape(str(comparison.get("reference", "")))
        parts += [f"<h2>Comparison against {ref}</h2>", _comparison_table(comparison, alpha)]
    png = _chart_png(runs, labels)
    if png is not None:
        parts += [
            "<h2>Primary metric per task</h2>",
            image(png, "primary metric per task and model, with stderr error bars"),
        ]
    write_page(Path(path), title, parts)
