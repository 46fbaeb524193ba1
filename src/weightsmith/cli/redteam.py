"""How redteam shows itself: progress lines per configuration, and the result tables.

Not here: the command (`weightsmith.commands.redteam`).
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weightsmith.report.interval_names import method_line


def progress_lines(console: Console) -> Any:
    """A line per configuration every ~10% (stderr)."""
    state: dict[str, float] = {}

    def tick(label: str, done: int, total: int) -> None:
        if total and done / total >= state.get(label, 0.0):
            console.print(f"{label}: {done}/{total} probes", markup=False)
            state[label] = done / total + 0.1

    return tick


def _pct(r: dict) -> str:
    if r.get("rate") is None:
        return "-"
    return f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def print_redteam(result: dict, console: Console) -> None:
    rates = method_line(result.get("interval"), short=True) or "95%"
    diffs = method_line(result.get("difference_interval"), short=True)
    table = Table(title=f"attack success and over-refusal ({rates} intervals)")
    # the over-refusal change only where benign probes ran (a paired change needs some)
    benign = any(row.get("vs_reference", {}).get("over_refusal", {}).get("mcnemar", {}).get("n")
                 for row in result["configs"])  # fmt: skip
    cols = (
        "configuration",
        "attack success",
        "over-refusal",
        "ASR change",
        "over-refusal change",
        "within budget",
    )
    for col in cols if benign else cols[:4] + cols[5:]:
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for row in result["configs"]:
        changes = [row.get("vs_reference", {}).get(k) for k in ("asr", "over_refusal")]
        deltas = ["" if not c or not c["mcnemar"].get("n") else _change(c) for c in changes]
        budget = row.get("within_budget")
        table.add_row(
            escape(row["config"]), _pct(row["asr"]), _pct(row["over_refusal"]), *(deltas if benign else deltas[:1]),
            "" if budget is None else ("yes" if budget else "NO"),
        )  # fmt: skip
    console.print(table)
    if diffs:
        console.print(f"changes are paired on the same probes: McNemar's p, {diffs} interval", markup=False)
    fam = Table(title="attack success by probe family")
    fam.add_column("family")
    for row in result["configs"]:
        fam.add_column(escape(row["config"]), justify="right")
    for family in sorted({f for row in result["configs"] for f in row["by_family"]}):
        fam.add_row(family, *[_pct(row["by_family"].get(family, {})) for row in result["configs"]])
    console.print(fam)
    if result.get("calibration"):
        cal = Table(title="detectors on their hand-labelled sets")
        for col in ("detector", "set", "n", "precision", "recall"):
            cal.add_column(col, justify="right" if col in ("n", "precision", "recall") else "left")
        for c in result["calibration"]:
            cal.add_row(c["detector"], c["set"], str(c["n"]), _num(c["precision"]), _num(c["recall"]))
        console.print(cal)
    split = result.get("split") or {}
    if split.get("split", "all") != "all":
        console.print(
            f"probes: the {split['split']} split (held-out fraction {split['heldout_fraction']:g})",
            markup=False,
        )
    if result.get("pairs"):
        console.print(pairs_line(result["pairs"]), markup=False)
    for name, path in result.get("written", {}).items():
        console.print(f"wrote {path}" if name != "report.html" else f"report: {path}", markup=False)


def pairs_line(pairs: dict) -> str:
    """'wrote 12 preference pairs to P (attack 9, benign 3; skipped: attack resisted 20)'."""
    counts = pairs["counts"]
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(pairs["skipped"].items()))
    skipped = f"; skipped: {skipped}" if skipped else ""
    head = f"wrote {pairs['rows']} preference pairs" if pairs["rows"] else "WARNING: wrote 0 preference pairs"
    return (
        f"{head} to {pairs['path']} (from {pairs['pairs_from']}: attack {counts['attack']}, "
        f"benign {counts['benign']}{skipped}); provenance in {pairs['meta']}"
    )


def _change(c: dict) -> str:
    """'+10.0 pts [+1.2, +20.3] (p=0.04)': a paired difference, its interval and McNemar's p."""
    iv = c.get("interval") or {}
    ci = f" [{100 * iv['ci_low']:+.1f}, {100 * iv['ci_high']:+.1f}]" if iv else ""
    return f"{100 * c['delta']:+.1f} pts{ci} (p={c['mcnemar']['p_value']:.2g})"


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, emoji=False, soft_wrap=True, markup=False, file=sys.stderr)
