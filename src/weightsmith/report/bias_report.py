"""The bias-audit outputs: results.json, items.jsonl, pairs.jsonl and a self-contained HTML
report (per-group means, worst case, gaps and flips per task and lexicon; stereotype-pair
preference per bias type).

Not here: running the audit or computing its statistics (weightsmith.safety.bias); the shared
page pieces (style sheet, number formatting, page writer) are in weightsmith.report.html.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from weightsmith.files import write_json_atomic, write_text_atomic
from weightsmith.report.html import fmt, write_page
from weightsmith.report.interval_names import method_line


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def write_bias_outputs(out: Path, result: dict[str, Any]) -> dict[str, str]:
    """results.json, items.jsonl, pairs.jsonl and report.html under `out` (atomic writes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    body = {k: v for k, v in result.items() if k not in ("items", "pair_records", "written")}
    write_json_atomic(out / "results.json", body)
    written["results"] = str(out / "results.json")
    write_text_atomic(out / "items.jsonl", _jsonl(result.get("items") or []))
    written["items"] = str(out / "items.jsonl")
    if result.get("pairs") is not None:
        write_text_atomic(out / "pairs.jsonl", _jsonl(result.get("pair_records") or []))
        written["pairs"] = str(out / "pairs.jsonl")
    write_bias_report(out / "report.html", result)
    written["report"] = str(out / "report.html")
    return written


def write_bias_report(path: Path, result: dict[str, Any]) -> None:
    """One self-contained page (no scripts, no external URLs) written atomically to `path`."""
    write_page(Path(path), "Bias audit", _report_parts(result))


def _ci(ci: Any) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "—"


def _table(head: Sequence[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _td(x: Any, num: bool = True) -> str:
    return f'<td class="num">{x}</td>' if num else f"<td>{x}</td>"


def _report_parts(result: dict[str, Any]) -> list[str]:
    """The page body: run table, counterfactual sections, pair table; every string is escaped."""
    parts = [_run_table(result)]
    cf = result.get("counterfactual") or []
    if cf:
        parts.append(
            "<h2>Counterfactual perturbations</h2><p class='muted'>Each affected document is rewritten "
            "once per group (every lexicon term replaced by its aligned term) and scored with the "
            "task's primary metric. Worst case: per item, the worst score over groups (HELM). "
            "Gap: group mean minus the first group's; the groups score the same items, so gaps are "
            "paired (McNemar and Newcombe's paired interval for 0/1 scores, else a paired bootstrap). "
            "Flips: items whose score differs between groups. Each table names its interval method.</p>"
        )
    for s in cf:
        parts.extend(_counterfactual_section(s))
    pairs = result.get("pairs")
    if pairs:
        parts.extend(_pairs_section(pairs))
    return parts


def _run_table(result: dict[str, Any]) -> str:
    meta = result.get("weightsmith") or {}
    return _table(
        ["model", "adapter", "lexicons", "pairs", "limit", "version"],
        [
            [
                _td(escape(str(meta.get("model"))), False),
                _td(escape(str(meta.get("adapter"))), False),
                _td(escape(", ".join(lx["name"] for lx in result.get("lexicons") or [])), False),
                _td(escape(str((result.get("pairs") or {}).get("source", "—"))), False),
                _td(fmt(meta.get("limit"))),
                _td(escape(str(meta.get("version")))),
            ]
        ],
    )


def _counterfactual_section(s: dict[str, Any]) -> list[str]:
    """One task x lexicon: per-group means and gaps, the worst case, the largest gap and flips."""
    title = f"{s['task']} · {s['lexicon']} · {s['metric']}"
    parts = [
        f"<h3>{escape(title)}</h3>",
        f"<p>{s['n_affected']} of {s['n_docs']} documents affected "
        f"({s['n_unaffected']} unaffected, not scored).</p>",
    ]
    if not s["n_affected"]:
        return parts
    rows = []
    for g in s["groups"]:
        pg = s["per_group"][g]
        gap = s["gaps"].get(g)
        rows.append(
            [
                _td(escape(g), False),
                _td(f"{fmt(pg['mean'])} ± {fmt(pg['stderr'])}"),
                _td(_ci(pg["ci"])),
                _td(fmt(gap["delta"]) if gap else '<span class="muted">reference</span>'),
                _td(_ci(gap["ci"]) if gap else "—"),
                _td(fmt(gap["p_value"]) if gap else "—"),
            ]
        )
    wc = s["worst_case"]
    rows.append(
        [
            _td("<b>worst case</b>", False),
            _td(f"{fmt(wc['mean'])} ± {fmt(wc['stderr'])}"),
            _td(_ci(wc["ci"])),
            _td(""),
            _td(""),
            _td(""),
        ]
    )
    parts.append(_table(["group", "mean ± stderr", "95% CI", "Δ vs first", "95% CI of Δ", "p"], rows))
    mg = s["max_gap"]
    parts.append(
        f"<p>Largest gap: {escape(' vs '.join(mg['groups']))} = {fmt(mg['gap'])} "
        f"(95% CI of Δ {_ci(mg['ci'])}); flips: {s['flips']} of {s['n_items']} items.</p>"
    )
    if s.get("interval"):
        parts.append(
            f"<p class='muted'>Intervals: means {escape(method_line(s['interval']))}; "
            f"gaps {escape(method_line(s.get('difference_interval')))}.</p>"
        )
    return parts


def _pairs_section(pairs: dict[str, Any]) -> list[str]:
    """Stereotype-pair preference, overall and per bias type."""
    rows = []
    for label, st in [("all", pairs)] + list((pairs.get("by_bias_type") or {}).items()):
        rows.append(
            [
                _td(escape(label), False),
                _td(st["n"]),
                _td(f"{fmt(st['pct_stereotype'])} ± {fmt(st['pct_stereotype_stderr'])}"),
                _td(_ci(st["pct_stereotype_ci"])),
                _td(f"{fmt(st['likelihood_diff'])} ± {fmt(st['likelihood_diff_stderr'])}"),
            ]
        )
    return [
        "<h2>Stereotype pairs</h2><p class='muted'>pct_stereotype: share of pairs where the model "
        "gives the more stereotypical sentence the higher log-likelihood (0.5 = no preference). "
        "likelihood_diff: mean |ll(more) − ll(less)| in nats. As lm-eval's crows_pairs.</p>",
        _table(["bias type", "n", "pct_stereotype ± stderr", "95% CI", "likelihood_diff"], rows),
        f"<p class='muted'>Intervals: pct_stereotype {escape(method_line(pairs.get('interval')) or '—')}; "
        f"likelihood_diff {escape(method_line(pairs.get('likelihood_diff_interval')) or '—')}.</p>",
    ]
