"""How the arena commands show themselves: the judge's tally, the ratings table with its
intervals and the human–judge agreement, the export and import counts.

Not here: the commands (`weightsmith.commands.arena`, `.arena_judge`); `arena serve` prints through its own
module.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_judge(result: dict[str, Any], console: Console) -> None:
    choices = ", ".join(f"{k} {v}" for k, v in sorted(result["choices"].items())) or "none"
    scored = result.get("scores") or {}
    how = "" if scored else f"; ties from order disagreement: {result['disagreements']}"
    console.print(
        f"{result['voter']}: voted on {result['judged']} battles ({result['created']} new) in {result['db']}; "
        f"verdicts: {choices}{how}",
        markup=False,
    )
    if scored:
        means = ", ".join(f"{name} {s['mean']:.3g} ({s['n']} answers)" for name, s in scored.items())
        console.print(f"mean reward: {means}", markup=False)
    if result.get("unscored"):
        console.print(
            f"{result['unscored']} battles left unvoted: no reward scored both answers", markup=False
        )
    if result.get("unreferenced"):
        console.print(
            f"{result['unreferenced']} battles skipped: their prompt has no field the rewards read",
            markup=False,
        )
    if result["unparsable"]:
        console.print(
            f"{result['unparsable']} battles left unvoted: a judge reply had no [[A]]/[[B]]/[[C]]",
            markup=False,
        )
    if result["skipped"]:
        console.print(f"{result['skipped']} battles skipped: no prompt or answers to judge", markup=False)


def print_ratings(result: dict[str, Any], console: Console) -> None:
    overall = result["overall"]
    level = result["method"]["interval"]["level"]
    table = Table(title=f"arena ratings ({result['source']['voters']} votes: {overall['total']})")
    for col in ("#", "model", "rating", f"{level:.0%} interval", "battles", "win rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for i, r in enumerate(overall["ratings"], start=1):
        table.add_row(
            str(i), r["name"], f"{r['rating']:.0f}", f"[{r['lower']:.0f}, {r['upper']:.0f}]",
            str(r["battles"]), f"{r['win_rate']:.0%}",
        )  # fmt: skip
    console.print(table)
    anchor = overall["anchor"]
    interval = result["method"]["interval"]
    console.print(
        f"Bradley–Terry (ties half a win), {'anchored on ' + anchor if anchor else 'mean 1000'}; "
        f"intervals: {interval['method']}, {interval['rounds']} rounds, seed {interval['seed']}, at least Wald's",
        markup=False,
    )
    if overall.get("note"):
        console.print(overall["note"], markup=False)
    a = result.get("agreement")
    if a:
        kappa = "undefined" if a["kappa"] is None else f"{a['kappa']:.2f}"
        ci = f" [{a['lower']:.2f}, {a['upper']:.2f}]" if a["lower"] is not None else ""
        console.print(
            f"agreement {a['first']} vs {a['second']} on {a['battles']} battles: Cohen's kappa {kappa}{ci}, "
            f"same verdict {a['observed']:.0%}" + (f"; {a['note']}" if a.get("note") else ""),
            markup=False,
        )
    for path in (result.get("written") or {}).values():
        console.print(f"wrote {path}", markup=False)


def print_export(result: dict[str, Any], console: Console) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result["skipped"].items())) or "none"
    console.print(
        f"wrote {result['rows']} preference pairs from {result['votes']} votes to {result['path']} "
        f"(left out: {skipped}); provenance in {result['meta']}",
        markup=False,
    )


def print_import(result: dict[str, Any], console: Console) -> None:
    console.print(
        f"imported {result['battles']} into {result['db']}: {result['battles_added']} battles and "
        f"{result['votes_added']} votes added, {result['battles_skipped']} battles and "
        f"{result['votes_skipped']} votes already there",
        markup=False,
    )


__all__ = ["print_export", "print_import", "print_judge", "print_ratings"]
