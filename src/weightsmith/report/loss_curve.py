"""A PNG of a training run's loss curve, drawn from its metrics.jsonl.

Training loss per step (faint) with a moving average (solid), and validation loss
where it was measured. Uses matplotlib's non-interactive Agg backend, so it works
on machines without a display. Not here: reading runs for comparison (eval reports).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weightsmith.files import atomic_file


def _read(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, valid = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if "loss" in m:
            train.append((m["step"], m["loss"]))
        if "val_loss" in m:
            valid.append((m["step"], m["val_loss"]))
    return train, valid


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _figure(train: list[tuple[int, float]], valid: list[tuple[int, float]], title: str) -> Any:
    """The loss curve as a matplotlib Figure (no pyplot state: safe in a server's threads)."""
    from weightsmith.report.html import new_figure

    fig = new_figure(7, 4)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train (per step)")
        window = max(1, len(losses) // 20)
        ax.plot(
            steps, moving_average(list(losses), window), color="tab:blue", label=f"train (mean of {window})"
        )
    if valid:
        steps, losses = zip(*valid, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curve(metrics: Path, png: Path, *, title: str = "") -> Path | None:
    """Write `png` (atomically); None when there is nothing to plot."""
    train, valid = _read(metrics) if metrics.exists() else ([], [])
    if not train and not valid:
        return None
    fig = _figure(train, valid, title)
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return png


def loss_curve_png(metrics: Path, *, title: str = "") -> str | None:
    """The loss curve of a metrics.jsonl as base64 PNG text (for a data: URI); None when empty."""
    from weightsmith.report.html import figure_png

    train, valid = _read(metrics) if metrics.exists() else ([], [])
    if not train and not valid:
        return None
    return figure_png(_figure(train, valid, title))
