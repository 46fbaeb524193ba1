"""The watchdog report: per round, held-out attack success and over-refusal of the base model
and the DPO fork with their intervals, the paired change and McNemar's p, a chart of both
rates before and after, the eval suites before and after (the forgetting check), and the
lineage of every artifact, as one self-contained HTML page.

Not here: running the rounds (weightsmith.commands.watchdog).
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from weightsmith.report.html import figure_png, fmt, image, new_figure, write_page

RATES = {"asr": "attack success", "over_refusal": "over-refusal"}


def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "—"
    return f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] ({r['k']}/{r['n']})"


def _change(d: dict | None, test: dict | None, worse_when_up: bool = True) -> str:
    if not d or not test:
        return "—"
    p = test["p_value"]
    cls = "muted" if p >= 0.05 else ("down" if (d["delta"] > 0) == worse_when_up else "up")
    return (
        f'<span class="{cls}">{100 * d["delta"]:+.1f} pts [{100 * d["ci_low"]:+.1f}, {100 * d["ci_high"]:+.1f}]'
        f"</span></td><td class='num'>{fmt(p, 3)} ({test['before_only']}→{test['after_only']})"
    )


def _heldout_table(rnd: dict) -> str:
    h = rnd["heldout"]
    rows = []
    for key, name in RATES.items():
        c = h[key]
        rows.append(
            f"<tr><td>{name}</td><td class='num'>{_pct(c['before'])}</td><td class='num'>{_pct(c['after'])}</td>"
            f"<td class='num'>{_change(c['difference'], c['mcnemar'])}</td></tr>"
        )
    return (
        "<table><tr><th>held-out rate</th><th>base [95% CI]</th><th>fork [95% CI]</th>"
        "<th>change [95% CI]</th><th>McNemar p (fixed→broken)</th></tr>" + "".join(rows) + "</table>"
        f"<p class='muted'>{h['probes']['attack']} attack and {h['probes']['benign']} benign held-out attempts, "
        "paired by probe; the fork never trained on them.</p>"
    )


def _eval_table(rnd: dict) -> str:
    ev = rnd["eval"]
    rows = [
        f"<tr><td>{escape(r['task'])}</td><td>{escape(r['metric'])}</td><td class='num'>{fmt(r['before'])}</td>"
        f"<td class='num'>{fmt(r['after'])}</td><td class='num'>{fmt(r['delta'])}</td>"
        f"<td class='num'>{fmt(r['p_value'], 3)}</td></tr>"
        for r in ev["rows"]
    ]
    pooled = ev.get("pooled")
    if pooled:
        rows.append(
            f"<tr><th colspan=2>all 0/1 items pooled ({pooled['items']})</th>"
            f"<td class='num'>{_pct(pooled['before'])}</td><td class='num'>{_pct(pooled['after'])}</td>"
            f"<td class='num'>{_change(pooled['difference'], pooled['mcnemar'], worse_when_up=False)}</td></tr>"
        )
    return (
        "<table><tr><th>task</th><th>metric</th><th>base</th><th>fork</th><th>change</th><th>p</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _chart(rounds: list[dict]) -> str:
    fig = new_figure(7.5, 3.0)
    axes = fig.subplots(1, 2)
    for ax, (key, name) in zip(axes, RATES.items(), strict=True):
        labels, values, lows, highs = [], [], [], []
        for i, rnd in enumerate(rounds):
            c = rnd["heldout"][key]
            for side, r in (("base", c["before"]), (f"fork {i + 1}", c["after"])):
                if i and side == "base":
                    continue
                if r.get("rate") is None:
                    continue
                labels.append(side)
                values.append(100 * r["rate"])
                lows.append(100 * (r["rate"] - r["ci_low"]))
                highs.append(100 * (r["ci_high"] - r["rate"]))
        ax.bar(labels, values, yerr=[lows, highs], capsize=4, color="#888")
        ax.set_title(f"held-out {name} (%)")
        ax.set_ylim(0, 100)
    return image(
        figure_png(fig), "held-out attack success and over-refusal, base and forks, with 95% intervals"
    )


def _lineage(rnd: dict) -> str:
    lin = rnd["lineage"]
    pairs = lin["train_pairs"]
    items = [
        f"scan of <code>{escape(lin['scan']['model'])}</code> on the train probes: "
        f"<code>{escape(lin['scan']['folder'])}</code>",
        f"training pairs <code>{escape(pairs['path'])}</code> ({pairs['rows']} pairs, sha256 "
        f"<code>{escape(pairs['sha256'][:16])}…</code>) from "
        + ", ".join(f"<code>{escape(s['file'])}</code>" for s in pairs["sources"]),
        f"adapter <code>{escape(lin['adapter']['folder'])}</code> (weights sha256 "
        f"<code>{escape((lin['adapter']['sha256'] or '?')[:16])}…</code>, run record "
        f"<code>{escape(lin['adapter']['run'])}</code>)",
        f"held-out rescan <code>{escape(lin['heldout']['folder'])}</code>; eval <code>{escape(lin['eval']['folder'])}</code>",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def write_watchdog_report(path: Path, result: dict[str, Any]) -> None:
    rounds = result["rounds"]
    parts = [
        f"<p>Model <code>{escape(result['model'])}</code>; policy "
        f"<code>{escape(str(result.get('policy')))}</code>; held-out share of the probes "
        f"{result['split']['heldout_fraction']:.2f} (stable sha256 split).</p>",
        _chart(rounds),
        "<p class='muted'>Rates carry 95% Wilson intervals; changes are paired on the same probes "
        "(Newcombe's interval, McNemar's exact test). Green: significantly better; red: significantly worse.</p>",
    ]
    for rnd in rounds:
        parts += [
            f"<h2>Round {rnd['round']}: trained from the scan of {escape(rnd['scanned'])}</h2>",
            _heldout_table(rnd),
            "<h3>Forgetting check</h3>",
            _eval_table(rnd),
            "<h3>Lineage</h3>",
            _lineage(rnd),
        ]
    write_page(path, f"watchdog · {result['model']}", parts)
