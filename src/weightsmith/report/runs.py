"""Reading runs in the results.json layout (lm-eval's, plus our `weightsmith` block):
what a run is called and which of a task's keys are metrics.

Shared by the statistics that compare runs (weightsmith.eval.stats) and the pages that
show them (eval_report.py), so both name runs and metrics the same way.

Not here: computing or comparing metrics (weightsmith.eval), rendering.
"""

from __future__ import annotations


def run_label(run: dict, index: int) -> str:
    """The label naming a run: weightsmith.label, else config.model, else 'run N'."""
    label = (run.get("weightsmith") or {}).get("label") or (run.get("config") or {}).get("model")
    return str(label) if label else f"run {index}"


def metric_keys(task_results: dict) -> list[tuple[str, str]]:
    """(metric, filter) pairs of one task's results, in order, skipping stderrs and aliases."""
    out = []
    for key, value in task_results.items():
        name, _, filt = key.partition(",")
        if not filt or name.endswith("_stderr") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out.append((name, filt))
    return out
