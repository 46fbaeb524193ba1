"""The UI's pages as HTML text: store, runs, one artifact (loss curve, metrics, links), its
lineage tree, reports and red-team transcripts.

Every value that comes from a file (names, paths, model outputs, metrics) goes through
`html.escape`: a reply that holds `<script>` shows as those characters. Pages have no
JavaScript and no external URLs (the app's Content-Security-Policy forbids both).

Not here: finding files (workspace.py), routes and headers (app.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from html import escape
from typing import Any
from urllib.parse import quote

from weightsmith.report.html import CSS, fmt
from weightsmith.ui.workspace import Artifact, Scan

NAV = [("/", "overview"), ("/store", "store"), ("/runs", "runs"), ("/reports", "reports")]


def link(route: str, rel: str, text: str | None = None) -> str:
    return f'<a href="{route}?path={quote(rel)}">{escape(text if text is not None else rel)}</a>'


def page(title: str, parts: list[str], *, refresh: int | None = None) -> str:
    nav = " · ".join(f'<a href="{href}">{name}</a>' for href, name in NAV)
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return "\n".join([
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>',
        f"<style>{CSS}</style></head><body><nav>{nav}</nav><h1>{escape(title)}</h1>",
        *parts, "</body></html>",
    ])  # fmt: skip


def error_page(status: int, message: str) -> str:
    return page(f"error {status}", [f'<p id="error">{escape(message)}</p>'])


def table(head: list[str], rows: list[list[str]], table_id: str = "") -> str:
    """A table whose cells are already HTML (escape them before)."""
    ident = f' id="{table_id}"' if table_id else ""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{ident}><tr>{th}</tr>{body}</table>"


def _headline(metrics: dict[str, Any]) -> str:
    flat = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return escape(", ".join(f"{k} {fmt(v)}" for k, v in flat[:4]))


def overview(root: str, scan: Scan, models: int) -> str:
    runs = sum(a.record is None or a.kind in ("finetune", "dpo") for a in scan.artifacts.values())
    return page("weightsmith", [
        f"<p>Workspace <code>{escape(root)}</code>: {len(scan.artifacts)} artifacts ({runs} training runs), "
        f"{len(scan.reports)} reports; {models} models in the store.</p>",
        '<ul><li><a href="/store">store</a></li><li><a href="/runs">runs and artifacts</a></li>'
        '<li><a href="/reports">reports</a></li></ul>',
        "<p>Read-only: nothing here starts work.</p>" + ("<p>(the scan stopped early: a very large folder)</p>"
                                                          if scan.truncated else ""),
    ])  # fmt: skip


def store(models: list[dict[str, Any]]) -> str:
    rows = [[escape(m["name"]), escape(m["kind"]), fmt(m.get("size_bytes")), escape(str(m.get("source"))),
             escape(str(m.get("license") or "—")), escape(str(m.get("problem") or ""))] for m in models]  # fmt: skip
    return page("store", [table(["name", "kind", "bytes", "source", "license", "problem"], rows, "models")])


def runs(scan: Scan) -> str:
    rows = [
        [link("/artifact", a.rel), escape(a.kind), escape(a.finished or "training…"), _headline(a.metrics),
         link("/lineage", a.rel, "lineage") if a.record else "—"]
        for a in sorted(scan.artifacts.values(), key=lambda a: a.rel)
    ]  # fmt: skip
    return page(
        "runs and artifacts", [table(["path", "kind", "finished", "headline", ""], rows, "artifacts")]
    )


def reports(scan: Scan) -> str:
    rows = [[link("/file", r)] for r in sorted(scan.reports)]
    return page("reports", [table(["report"], rows, "reports")])


def artifact(a: Artifact, curve: str | None, files: list[str], children: list[Artifact], live: bool) -> str:
    parts = [f"<p>{escape(a.kind)} <code>{escape(a.id or '')}</code> {escape(a.finished or '')}</p>"]
    if live:
        parts.append("<p>Training: no lineage record yet; this page reloads every 10 s.</p>")
    if curve:
        parts.append(f'<img id="loss" alt="loss curve" src="data:image/png;base64,{curve}">')
    if a.metrics:
        rows = [[escape(k), escape(json.dumps(v, default=str)[:200])] for k, v in a.metrics.items()]
        parts.append("<h2>metrics</h2>" + table(["metric", "value"], rows, "metrics"))
    links = [link("/lineage", a.rel, "lineage")] if a.record else []
    links += [link("/file", f, f.rsplit("/", 1)[-1]) for f in files if f.endswith(".html")]
    links += [link("/transcripts", f, "transcripts") for f in files if f.endswith("transcripts.jsonl")]
    parts.append('<h2>see</h2><ul id="links">' + "".join(f"<li>{x}</li>" for x in links) + "</ul>")
    if children:
        items = "".join(f"<li>{escape(c.kind)}: {link('/artifact', c.rel)}</li>" for c in children)
        parts.append(f'<h2>made from it</h2><ul id="children">{items}</ul>')
    return page(a.rel, parts, refresh=10 if live else None)


def _tree(node: dict[str, Any], where: Callable[[str], str | None]) -> str:
    bad = [o for o in node.get("outputs", []) if o["status"] != "ok"]
    state = f'<span class="down">{len(bad)} output(s) changed</span>' if bad else "outputs as recorded"
    items = []
    for i in node.get("inputs", []):
        status = escape(i["status"])
        mark = f'<span class="down">{status}</span>' if i["status"] in ("changed", "missing") else status
        sub = ""
        parent = i.get("parent")
        if parent and "inputs" in parent:
            sub = _tree(parent, where)
        elif parent:
            sub = f"<ul><li>{escape(parent.get('error') or parent.get('kind', ''))} (shown above)</li></ul>"
        items.append(f"<li>{escape(i['role'])}: <code>{escape(str(i.get('spec')))}</code> sha256 "
                     f"<code>{escape(str(i.get('sha256') or '—')[:12])}</code> {mark}{sub}</li>")  # fmt: skip
    rel = where(node["artifact"])
    name = link("/artifact", rel) if rel is not None else escape(node["artifact"])
    head = f"<b>{escape(node['kind'])}</b> <code>{escape(node['id'][:12])}</code> {name} — {state}"
    return f"<ul><li>{head}<ul>{''.join(items)}</ul></li></ul>"


def lineage(rel: str, result: dict[str, Any], where: Callable[[str], str | None]) -> str:
    """The checked tree; `where(path)` is an artifact's workspace path for a link (None: no link)."""
    problems = "".join(f"<li>{escape(p)}</li>" for p in result["problems"])
    summary = (f'<h2>problems</h2><ul id="problems">{problems}</ul>' if problems
               else '<p id="problems">Every recorded hash still matches.</p>')  # fmt: skip
    return page(f"lineage of {rel}", [f'<div id="tree">{_tree(result["tree"], where)}</div>', summary])


def transcripts(rel: str, rows: list[dict[str, Any]], limit: int) -> str:
    def text(value: Any) -> str:
        return escape(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))

    def prompt(r: dict[str, Any]) -> Any:
        messages = r.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            return messages[-1].get("content")
        return r.get("prompt")

    body = [[text(r.get("config")), text(r.get("kind")), f"<pre>{text(prompt(r))}</pre>",
             f"<pre>{text(r.get('reply'))}</pre>", text(r.get("success", r.get("over_refused")))] for r in rows]  # fmt: skip
    note = f"<p>The first {limit} rows.</p>" if len(rows) >= limit else ""
    return page(f"transcripts: {rel}", [note, table(["configuration", "kind", "prompt", "reply", "outcome"],
                                                    body, "transcripts")])  # fmt: skip
