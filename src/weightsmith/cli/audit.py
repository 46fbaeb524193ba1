"""How audit bias shows itself: one table per task and lexicon, and the stereotype pairs.

Not here: the audit (`weightsmith.commands.audit`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith.cli.eval import fmt_number
from weightsmith.report.interval_names import method_line


def _f(x: Any) -> str:
    return fmt_number(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _ci(ci: Any) -> str:
    return f"[{fmt_number(ci[0])}, {fmt_number(ci[1])}]" if ci else "-"


def print_audit_bias(result: dict[str, Any], console: Console) -> None:
    for s in result.get("counterfactual") or []:
        title = (
            f"{s['task']} · {s['lexicon']} · {s['metric']}: {s['n_affected']} of {s['n_docs']} documents "
            f"affected ({s['n_unaffected']} unaffected)"
        )
        if not s["n_affected"]:
            console.print(title, markup=False)
            continue
        table = Table(title=title)
        for col in ("group", "mean ± stderr", "95% CI", "Δ vs first", "95% CI of Δ"):
            table.add_column(col)
        for g in s["groups"]:
            pg, gap = s["per_group"][g], s["gaps"].get(g)
            table.add_row(
                g,
                f"{_f(pg['mean'])} ± {_f(pg['stderr'])}",
                _ci(pg["ci"]),
                ("+" if gap["delta"] >= 0 else "") + fmt_number(gap["delta"]) if gap else "reference",
                _ci(gap["ci"]) if gap else "-",
            )
        wc = s["worst_case"]
        table.add_row("worst case", f"{_f(wc['mean'])} ± {_f(wc['stderr'])}", _ci(wc["ci"]), "", "")
        console.print(table)
        mg = s["max_gap"]
        console.print(
            f"largest gap {' vs '.join(mg['groups'])}: {_f(mg['gap'])} (95% CI of Δ {_ci(mg['ci'])}); "
            f"flips: {s['flips']} of {s['n_items']} items",
            markup=False,
        )
        if s.get("interval"):
            console.print(
                f"intervals: means {method_line(s['interval'])}; gaps {method_line(s.get('difference_interval'))}",
                markup=False,
            )
    pairs = result.get("pairs")
    if pairs:
        table = Table(title="stereotype pairs (pct_stereotype 0.5 = no preference)")
        for col in ("bias type", "n", "pct_stereotype", "95% CI", "likelihood_diff"):
            table.add_column(col)
        for label, st in [("all", pairs)] + list((pairs.get("by_bias_type") or {}).items()):
            table.add_row(
                label,
                str(st["n"]),
                f"{_f(st['pct_stereotype'])} ± {_f(st['pct_stereotype_stderr'])}",
                _ci(st["pct_stereotype_ci"]),
                _f(st["likelihood_diff"]),
            )
        console.print(table)
        if pairs.get("interval"):
            console.print(
                f"intervals: pct_stereotype {method_line(pairs['interval'])}; "
                f"likelihood_diff {method_line(pairs.get('likelihood_diff_interval'))}",
                markup=False,
            )
    for path in (result.get("written") or {}).values():
        console.print(f"wrote {path}", markup=False)


__all__ = ["print_audit_bias"]
