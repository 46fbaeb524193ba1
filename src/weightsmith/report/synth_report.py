"""The HTML report of a synth run: the funnel (what each filter removed), length histograms of
what was kept, examples kept and dropped (a few per reason), and the lineage.

Not here: the run (weightsmith.commands.synth); shared page pieces (report.html).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from weightsmith.report.html import figure_png, fmt, image, new_figure, plain, write_page

EXAMPLES_PER_REASON = 3


def _funnel_table(funnel: dict[str, Any]) -> str:
    rows = [f'<tr><td>candidates</td><td></td><td class="num">{funnel["candidates"]}</td></tr>']
    for stage in funnel["stages"]:
        dropped = ", ".join(f"{escape(r)}: {n}" for r, n in stage["dropped"].items()) or "—"
        rows.append(
            f'<tr><td>{escape(stage["stage"])}</td><td>{dropped}</td><td class="num">{stage["remaining"]}</td></tr>'
        )
    share = funnel["kept_share"]
    ci = (
        f"[{fmt(share.get('ci_low'), 3)}, {fmt(share.get('ci_high'), 3)}]"
        if share.get("rate") is not None
        else ""
    )
    rows.append(
        f"<tr><th>kept</th><td>{fmt(share['rate'], 3)} of candidates, 95% Wilson {ci}</td>"
        f'<td class="num">{funnel["kept"]}</td></tr>'
    )
    head = "<tr><th>stage</th><th>dropped (by reason)</th><th>remaining</th></tr>"
    return f"<h2>Funnel</h2><table>{head}{''.join(rows)}</table>"


def _histograms(kept: list[dict]) -> str:
    if not kept:
        return "<p class='muted'>nothing kept</p>"
    fig = new_figure(10, 3)
    for k, (title, values) in enumerate((
        ("instruction words", [len(r["messages"][-2]["content"].split()) for r in kept]),
        ("answer words", [len(r["messages"][-1]["content"].split()) for r in kept]),
    )):  # fmt: skip
        ax = fig.add_subplot(1, 2, k + 1)
        ax.hist(values, bins=min(30, max(5, len(set(values)))))
        ax.set_title(plain(title))
        ax.set_ylabel("examples")
    return "<h2>Lengths of what was kept</h2>" + image(figure_png(fig), "length histograms")


def _examples(kept: list[dict], dropped: list[dict]) -> str:
    parts = ["<h2>Examples kept</h2><table><tr><th>instruction</th><th>answer</th><th>meta</th></tr>"]
    for r in kept[: EXAMPLES_PER_REASON * 2]:
        meta = json.dumps(r.get("meta", {}), ensure_ascii=False)
        parts.append(f"<tr><td><pre>{escape(r['messages'][-2]['content'])}</pre></td>"
                     f"<td><pre>{escape(r['messages'][-1]['content'])}</pre></td><td><pre>{escape(meta)}</pre></td></tr>")  # fmt: skip
    parts.append(
        "</table><h2>Examples dropped</h2><table><tr><th>reason</th><th>instruction</th><th>answer or detail</th></tr>"
    )
    shown: dict[str, int] = {}
    for r in dropped:
        if shown.get(r["reason"], 0) >= EXAMPLES_PER_REASON:
            continue
        shown[r["reason"]] = shown.get(r["reason"], 0) + 1
        other = r.get("answer") or json.dumps(r.get("detail", r.get("raw", "")), ensure_ascii=False)
        parts.append(f"<tr><td>{escape(r['reason'])}</td><td><pre>{escape(r.get('instruction') or r.get('raw') or '')}</pre>"
                     f"</td><td><pre>{escape(str(other))}</pre></td></tr>")  # fmt: skip
    parts.append("</table>")
    return "".join(parts)


def write_synth_report(path: Path, result: dict[str, Any], kept: list[dict], dropped: list[dict]) -> None:
    lineage = result["lineage"]
    skipped = result.get("skipped_documents") or []
    parts = [
        f"<p>recipe <b>{escape(result['recipe'])}</b>, model <code>{escape(json.dumps(lineage['model']))}</code>, "
        f"seed {lineage['seed']}; train {result['funnel']['train']}, validation {result['funnel']['validation']}</p>",
        _funnel_table(result["funnel"]),
    ]
    if skipped:
        items = "".join(f"<li>{escape(s['file'])}: {escape(s['reason'])}</li>" for s in skipped)
        parts.append(f"<h2>Documents skipped ({len(skipped)})</h2><ul>{items}</ul>")
    parts += [_histograms(kept), _examples(kept, dropped)]
    parts.append(f"<h2>Lineage</h2><pre>{escape(json.dumps(lineage, indent=2, ensure_ascii=False))}</pre>")
    write_page(path, "weightsmith synth", parts)
