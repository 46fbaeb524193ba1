"""How eval shows itself: a progress bar per model (lines off a terminal), result tables.

Not here: the command (`weightsmith.commands.eval`).
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith.report.interval_names import method_line


class ProgressBars:
    """One bar per model on a terminal; a line every ~10% and at the end elsewhere (counting `unit`)."""

    def __init__(self, console: Console, unit: str = "requests") -> None:
        self.console = console
        self.tty = console.is_terminal
        self.unit = unit

    def __call__(self, label: str):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
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
            if total and (done / total >= state["next"] or done == total):
                self.console.print(f"{label}: {done}/{total} {self.unit}", markup=False)
                state["next"] = done / total + 0.1

        return line


def _fmt(value: Any, se: Any = None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    text = fmt_number(value)
    return f"{text} ± {fmt_number(se)}" if isinstance(se, float) else text


def fmt_number(x: float) -> str:
    """A metric value: four decimals, or four significant digits when large."""
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
        for col in ("task", "metric", "model", "value", "delta", "CI of delta", "interval", "test", "p"):
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
                    (("+" if delta >= 0 else "") + fmt_number(delta) if isinstance(delta, float) else "-")
                    + mark,
                    f"[{fmt_number(ci[0])}, {fmt_number(ci[1])}]" if ci and None not in ci else "-",
                    method_line(row.get("interval"), short=True) or "-",
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
    return Console(stderr=True, highlight=False, emoji=False, markup=False, file=sys.stderr)
