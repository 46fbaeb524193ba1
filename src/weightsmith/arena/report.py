"""The arena's ratings outputs: ratings.json and a self-contained report.html.

The page shows the ratings table (rating, 95% interval, battles, win rate), a ratings plot
with error bars drawn as inline SVG, the observed win-rate, predicted-probability and
battle-count matrices, the per-category tables, the agreement of humans and judges when both
voted, and which votes were used. It has no scripts and no external URLs, and every string
that comes from the votes (model names, categories, the caller's source notes) is escaped.

Not here: computing the ratings (ratings.py); the page skeleton and style sheet, shared with
the other reports (weightsmith.report.html).
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from weightsmith.arena.agreement import Agreement
from weightsmith.arena.ratings import BASE, Ratings, RatingTable
from weightsmith.files import write_json_atomic
from weightsmith.report.html import write_page
from weightsmith.report.interval_names import method_line

_ROW, _LEFT, _WIDTH, _TOP = 24, 230, 760, 30
_LABEL_CHARS = 36


def write_ratings_outputs(out: str | Path, ratings: Ratings) -> dict[str, str]:
    """ratings.json and report.html under `out` (each written atomically); their paths."""
    out = Path(out)
    write_json_atomic(out / "ratings.json", ratings.to_dict())
    write_page(out / "report.html", "Arena ratings", report_parts(ratings))
    return {"ratings": str(out / "ratings.json"), "report": str(out / "report.html")}


def report_parts(ratings: Ratings) -> list[str]:
    """The page body; every string from the data is escaped."""
    table = ratings.overall
    parts = [_summary(ratings), _source(ratings.source)]
    parts += ["<h2>Ratings</h2>", ratings_table(table, ratings.level), plot_svg(table)]
    if table.note:
        parts.append(f"<p class='muted'>{escape(table.note)}</p>")
    if ratings.agreement is not None:
        parts.append(_agreement(ratings.agreement))
    parts.append(
        "<h2>Pairs</h2><p class='muted'>Row against column. Observed: the share of the row's score "
        "(a win 1, a tie or both-bad ½) in their battles; predicted: the probability the fitted "
        "ratings give the row's win.</p>"
    )
    parts.append(_matrix("Observed win rate", table, table.win_rate, _percent))
    parts.append(_matrix("Predicted win probability", table, table.predicted, _percent))
    parts.append(_matrix("Battles", table, table.battles, str))
    if ratings.categories or ratings.skipped_categories:
        parts.append("<h2>By category</h2>")
    for name, sub in ratings.categories.items():
        parts.append(f"<h3>{escape(name)}</h3><p class='muted'>{sub.total} battles. {escape(sub.note)}</p>")
        parts.append(ratings_table(sub, ratings.level))
    for name, why in ratings.skipped_categories.items():
        parts.append(f"<h3>{escape(name)}</h3><p class='muted'>No table: {escape(why)}</p>")
    return parts


def _summary(ratings: Ratings) -> str:
    table = ratings.overall
    anchor = f"{escape(table.anchor)} is rated {BASE:g}" if table.anchor else f"the mean rating is {BASE:g}"
    interval = method_line({"method": "bootstrap", "level": ratings.level})
    return (
        f"<p>{table.total} votes on battles between {len(table.names)} contestants. Method: Bradley–Terry "
        "by maximum likelihood, a tie or both-bad counting as half a win for each side, on the Elo-like "
        f"scale {BASE:g} + 400·log10(strength), where {anchor}. Intervals: {escape(interval)} over "
        f"battles ({ratings.rounds} resamples, seed {ratings.seed}), widened where narrower to the fit's "
        "Wald interval (the Bradley–Terry information), which battles that all ended alike still have.</p>"
    )


def _source(source: dict[str, Any]) -> str:
    if not source:
        return ""
    rows = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in source.items()
    )
    return f"<h2>Votes used</h2><table>{rows}</table>"


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def ratings_table(table: RatingTable, level: float) -> str:
    head = (
        f"<tr><th>rank</th><th>model</th><th>rating</th><th>{100 * level:g}% interval</th>"
        "<th>battles</th><th>win rate</th></tr>"
    )
    rows = "".join(
        f"<tr><td class='num'>{rank}</td><td>{escape(r.name)}</td><td class='num'>{r.rating:.0f}</td>"
        f"<td class='num'>[{r.lower:.0f}, {r.upper:.0f}]</td><td class='num'>{r.battles}</td>"
        f"<td class='num'>{_percent(r.win_rate)}</td></tr>"
        for rank, r in enumerate(table.ratings, 1)
    )
    return f"<table>{head}{rows}</table>"


def _matrix(title: str, table: RatingTable, values: list[list[Any]], show: Any) -> str:
    head = "".join(f"<th>{escape(n)}</th>" for n in table.names)
    rows = "".join(
        f"<tr><th>{escape(name)}</th>"
        + "".join("<td class='num muted'>·</td>" if i == j else f"<td class='num'>{show(v)}</td>"
                  for j, v in enumerate(row))
        + "</tr>"
        for i, (name, row) in enumerate(zip(table.names, values, strict=True))
    )  # fmt: skip
    return f"<h3>{escape(title)}</h3><table><tr><th></th>{head}</tr>{rows}</table>"


def _agreement(a: Agreement) -> str:
    kappa = "undefined" if a.kappa is None else f"{a.kappa:.3f}"
    interval = "" if a.lower is None else f", {100 * a.level:g}% interval [{a.lower:.3f}, {a.upper:.3f}]"
    note = f" {escape(a.note)}" if a.note else ""
    return (
        f"<h2>Agreement</h2><p>{escape(a.first)} vs {escape(a.second)} on {a.battles} shared battles: "
        f"Cohen's κ = {kappa}{interval}; same verdict in {_percent(a.observed)} (verdicts A, B, tie; "
        f"both-bad counts as a tie).{note}</p>"
    )


def _ticks(low: float, high: float) -> list[float]:
    span = max(high - low, 1e-9)
    step = next(
        (s for s in (5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000) if span / s <= 8), 10000
    )
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) // step) + 1)]


def plot_svg(table: RatingTable) -> str:
    """The ratings with their intervals as horizontal error bars, best on top (inline SVG)."""
    rows = table.ratings
    low = min([r.lower for r in rows] + [BASE])
    high = max([r.upper for r in rows] + [BASE])
    pad = max(10.0, 0.05 * (high - low))
    low, high = low - pad, high + pad
    right = _WIDTH - 20
    height = _TOP + _ROW * len(rows) + 10

    def x(v: float) -> float:
        return _LEFT + (v - low) / (high - low) * (right - _LEFT)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" role="img" '
        f'aria-label="ratings with intervals" font-family="system-ui, sans-serif" font-size="12">'
    ]
    for t in _ticks(low, high):
        out.append(
            f'<line x1="{x(t):.1f}" y1="{_TOP - 8}" x2="{x(t):.1f}" y2="{height - 10}" stroke="#e3e3e3"/>'
            f'<text x="{x(t):.1f}" y="{_TOP - 12}" text-anchor="middle" fill="#555">{t:g}</text>'
        )
    out.append(
        f'<line x1="{x(BASE):.1f}" y1="{_TOP - 8}" x2="{x(BASE):.1f}" y2="{height - 10}" '
        'stroke="#999" stroke-dasharray="4 3"/>'
    )
    for i, r in enumerate(rows):
        y = _TOP + _ROW * i + _ROW / 2
        label = r.name if len(r.name) <= _LABEL_CHARS else r.name[: _LABEL_CHARS - 1] + "…"
        tip = f"{r.name}: {r.rating:.0f} [{r.lower:.0f}, {r.upper:.0f}], {r.battles} battles"
        out.append(
            f"<g><title>{escape(tip)}</title>"
            f'<text x="{_LEFT - 10}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>'
            f'<line x1="{x(r.lower):.1f}" y1="{y:.1f}" x2="{x(r.upper):.1f}" y2="{y:.1f}" stroke="#1f5fa8" '
            'stroke-width="2"/>'
            + "".join(
                f'<line x1="{x(v):.1f}" y1="{y - 5:.1f}" x2="{x(v):.1f}" y2="{y + 5:.1f}" stroke="#1f5fa8" '
                'stroke-width="2"/>'
                for v in (r.lower, r.upper)
            )
            + f'<circle cx="{x(r.rating):.1f}" cy="{y:.1f}" r="4" fill="#1f5fa8"/></g>'
        )
    out.append("</svg>")
    return "\n".join(out)
