"""How watchdog shows itself: a line per stage, the red-team's probe lines, eval's bars, the
training progress, and the before/after table of every round.

Not here: the command (`weightsmith.commands.watchdog`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith.cli import eval as eval_out
from weightsmith.cli import redteam as redteam_out
from weightsmith.cli.loading import Loading
from weightsmith.cli.train import make_reporter


class StageLines:
    """The watchdog's progress: stage lines on stderr, and each stage's own progress."""

    def __init__(self) -> None:
        self.console = redteam_out.stderr_console()
        self.probes = Loading(redteam_out.progress_lines(self.console))
        self.evaluation = Loading(eval_out.ProgressBars(eval_out.stderr_console()))
        self.reporter = make_reporter()

    def stage(self, text: str) -> None:
        self.console.print(f"== {text}", markup=False, highlight=False)


def make_progress(cfg: Any) -> StageLines | None:
    return None if cfg.json else StageLines()


def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "-"
    return f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def _change(entry: dict | None) -> str:
    if not entry or not entry.get("difference"):
        return "-"
    d, p = entry["difference"], entry["mcnemar"]["p_value"]
    return f"{100 * d['delta']:+.1f} pts [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] p={p:.2g}"


def print_watchdog(result: dict, console: Console) -> None:
    table = Table(
        title="held-out probes: base model vs DPO fork (95% Wilson; change: Newcombe, McNemar exact)"
    )
    for col in ("round", "rate", "base", "fork", "change"):
        table.add_column(col, justify="left" if col in ("round", "rate") else "right")
    for rnd in result["rounds"]:
        for key, name in (("asr", "attack success"), ("over_refusal", "over-refusal")):
            c = rnd["heldout"][key]
            table.add_row(str(rnd["round"]), name, _pct(c["before"]), _pct(c["after"]), _change(c))
        pooled = rnd["eval"].get("pooled")
        if pooled:
            table.add_row(
                str(rnd["round"]), f"eval accuracy ({pooled['items']} items)", _pct(pooled["before"]),
                _pct(pooled["after"]), _change(pooled),
            )  # fmt: skip
    console.print(table)
    written = result.get("written") or {}
    if written:
        console.print(f"report: {written['report']}  data: {written['json']}", markup=False, highlight=False)
