"""The red-team report: the harm / over-refusal table with intervals, a trade-off chart,
attack success per probe family and transform, detector calibration, and every attempt
that succeeded or was over-refused, as one self-contained HTML page.

Not here: running probes or computing rates (weightsmith.safety.redteam).
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from weightsmith.report.html import figure_png, fmt, image, new_figure, plain, write_page
from weightsmith.report.interval_names import method_line

_SHOWN_ATTEMPTS = 200  # failures listed per page; transcripts.jsonl has all of them


def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "—"
    return f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] ({r['k']}/{r['n']})"


def _delta(cmp: dict | None, key: str) -> str:
    c = (cmp or {}).get(key)
    if not c:
        return "—"
    b = c["interval"]
    # More attack success or more over-refusal are both worse: red when significant.
    cls = "muted" if c["mcnemar"]["p_value"] >= 0.05 else ("down" if c["delta"] > 0 else "up")
    return (
        f'<span class="{cls}">{100 * c["delta"]:+.1f} pts [{100 * b["ci_low"]:+.1f}, {100 * b["ci_high"]:+.1f}]'
        f"</span> p={fmt(c['mcnemar']['p_value'], 2)}"
    )


def _main_table(result: dict) -> str:
    head = (
        "<tr><th>configuration</th><th>attack success rate [95% CI]</th><th>over-refusal [95% CI]</th>"
        f"<th>ASR vs {escape(result['reference'])}</th><th>over-refusal vs unguarded</th>"
        "<th>within budget</th></tr>"
    )
    rows = []
    for row in result["configs"]:
        budget = row.get("within_budget")
        verdict = "—" if budget is None else ("yes" if budget else '<span class="down">no</span>')
        rows.append(
            f"<tr><td>{escape(row['config'])}</td><td class='num'>{_pct(row['asr'])}</td>"
            f"<td class='num'>{_pct(row['over_refusal'])}</td>"
            f"<td class='num'>{_delta(row.get('vs_reference'), 'asr')}</td>"
            f"<td class='num'>{_delta(row.get('vs_unguarded'), 'over_refusal')}</td><td>{verdict}</td></tr>"
        )
    budget = 100 * result["over_refusal_budget"]
    rates, diffs = method_line(result.get("interval")), method_line(result.get("difference_interval"))
    note = (
        f"<p class='muted'>Intervals on rates: {escape(rates)}. Differences are paired on the same "
        f"probes: McNemar's p and a {escape(diffs)} interval. A guard is within budget when it raises "
        f"over-refusal by at most {budget:.0f} points over the same model without it.</p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{note}"


def _breakdown(result: dict, key: str, title: str) -> str:
    groups = sorted({g for row in result["configs"] for g in row[key]})
    if not groups:
        return ""
    head = (
        "<tr><th>"
        + escape(title)
        + "</th>"
        + "".join(f"<th>{escape(row['config'])}</th>" for row in result["configs"])
    )
    rows = []
    for g in groups:
        cells = "".join(f"<td class='num'>{_pct(row[key].get(g))}</td>" for row in result["configs"])
        rows.append(f"<tr><td>{escape(g)}</td>{cells}</tr>")
    return f"<h2>Attack success by {escape(title)}</h2><table>{head}</tr>{''.join(rows)}</table>"


def _tradeoff_png(result: dict) -> str | None:
    rows = [
        r for r in result["configs"] if r["asr"]["rate"] is not None and r["over_refusal"]["rate"] is not None
    ]
    if not rows:
        return None
    fig = new_figure(7.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        x, y = 100 * r["over_refusal"]["rate"], 100 * r["asr"]["rate"]
        xerr = [[x - 100 * r["over_refusal"]["ci_low"]], [100 * r["over_refusal"]["ci_high"] - x]]
        yerr = [[y - 100 * r["asr"]["ci_low"]], [100 * r["asr"]["ci_high"] - y]]
        marker = "s" if r["guard"] else "o"
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt=marker, capsize=3, label=plain(r["config"]))
    ax.set_xlabel("over-refusal on benign prompts (%)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure_png(fig)


def _family_png(result: dict) -> str | None:
    families = sorted({g for row in result["configs"] for g in row["by_family"]})
    if not families:
        return None
    configs = result["configs"]
    fig = new_figure(min(16.0, max(6.0, 2.0 + 0.45 * len(families) * len(configs))), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(configs)
    for c, row in enumerate(configs):
        vals, lo, hi = [], [], []
        for fam in families:
            r = row["by_family"].get(fam)
            v = 100 * r["rate"] if r and r["rate"] is not None else 0.0
            vals.append(v)
            lo.append(v - 100 * r["ci_low"] if r and r["rate"] is not None else 0.0)
            hi.append(100 * r["ci_high"] - v if r and r["rate"] is not None else 0.0)
        xs = [i + (c - (len(configs) - 1) / 2) * width for i in range(len(families))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, label=plain(row["config"]))
    ax.set_xticks(range(len(families)), [plain(f) for f in families], rotation=15, ha="right")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return figure_png(fig)


def _calibration_table(rows: list[dict]) -> str:
    head = "<tr><th>detector</th><th>set</th><th>n</th><th>precision</th><th>recall</th><th>F1</th></tr>"
    body = "".join(
        f"<tr><td>{escape(str(r['detector']))}</td><td>{escape(str(r['set']))}</td><td class='num'>{r['n']}</td>"
        f"<td class='num'>{fmt(r['precision'], 3)}</td><td class='num'>{fmt(r['recall'], 3)}</td>"
        f"<td class='num'>{fmt(r['f1'], 3)}</td></tr>"
        for r in rows
    )
    return (
        "<h2>Detector calibration</h2><table>" + head + body + "</table>"
        "<p class='muted'>Measured on the hand-labelled calibration sets shipped with weightsmith "
        "(safety/calibration/).</p>"
    )


def _attempts(per_config: dict[str, list[dict]]) -> str:
    shown = [r for recs in per_config.values() for r in recs if r.get("success") or r.get("over_refused")][
        :_SHOWN_ATTEMPTS
    ]
    if not shown:
        return ""
    head = "<tr><th>configuration</th><th>probe</th><th>outcome</th><th>prompt</th><th>reply</th></tr>"
    rows = []
    for r in shown:
        outcome = "over-refused" if r.get("over_refused") else ("leaked" if r.get("leaked") else "complied")
        prompt = r["messages"][-1]["content"] if r["messages"] else ""
        rows.append(
            f"<tr><td>{escape(r['config'])}</td><td>{escape(r['probe'])}</td><td>{outcome}</td>"
            f"<td><pre>{escape(prompt[:600])}</pre></td><td><pre>{escape(r['reply'][:600])}</pre></td></tr>"
        )
    return (
        f"<h2>Successful attacks and over-refusals (first {len(shown)})</h2>"
        f"<table>{head}{''.join(rows)}</table><p class='muted'>All attempts: transcripts.jsonl.</p>"
    )


def _split_note(split: dict | None) -> str:
    if not split or split.get("split", "all") == "all":
        return "All probes (no train / held-out split)."
    side = "train" if split["split"] == "train" else "held-out"
    return (
        f"Only the {side} part of the probes: a stable sha256 split of pack and probe id, "
        f"{100 * split['heldout_fraction']:g}% held out."
    )


def write_redteam_report(path: Path, result: dict, per_config: dict[str, list[dict]]) -> None:
    """Write the HTML report to `path` atomically."""
    title = "Red-team report: " + ", ".join(row["config"] for row in result["configs"])
    probes = result["probes"]
    parts = [
        f"<p>{probes['attack']} attack probes ({escape(', '.join(probes['transforms']))}) and "
        f"{probes['benign']} benign prompts from {escape(', '.join(probes['packs']))}; "
        f"detectors: {escape(', '.join(f'{k}={v}' for k, v in result['detectors'].items()))}. "
        f"{_split_note(result.get('split'))}</p>",
        "<h2>Harm and over-refusal</h2>",
        _main_table(result),
    ]
    png = _tradeoff_png(result)
    if png:
        parts.append(image(png, "attack success against over-refusal per configuration, 95% intervals"))
    for key, title_ in (
        ("by_family", "probe family"),
        ("by_transform", "transform"),
        ("by_category", "category"),
    ):
        parts.append(_breakdown(result, key, title_))
        if key == "by_family" and (fam := _family_png(result)):
            parts.append(image(fam, "attack success per probe family and configuration"))
    if result.get("calibration"):
        parts.append(_calibration_table(result["calibration"]))
    parts.append(_attempts(per_config))
    write_page(Path(path), title, parts)
