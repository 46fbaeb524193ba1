"""The UI's pages as HTML text: store, runs, one artifact (loss curve, metrics, links), its
lineage tree, reports, red-team transcripts, the arena leaderboards, chat and the login page.

Every value that comes from a file (names, paths, model outputs, metrics) goes through
`html.escape`: a reply that holds `<script>` shows as those characters. Pages have no inline
JavaScript and no external URLs (the app's Content-Security-Policy forbids both); the chat
page loads its one script from this server (static/chat.js), which writes replies as text.

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

NAV = [("/", "overview"), ("/store", "store"), ("/runs", "runs"), ("/reports", "reports"), ("/arena", "arena"),
       ("/chat", "chat")]  # fmt: skip
#: The chat page's own styles (on top of the reports' style sheet).
CHAT_CSS = """
#conversation { max-width: 60em; margin: 1em 0; }
.msg { white-space: pre-wrap; padding: 0.5em 0.7em; margin: 0.4em 0; border-radius: 6px; }
.msg.user { background: #eef3fb; } .msg.assistant { background: #f7f7f7; } .msg.system { color: #555; }
.msg .role { font-size: 0.8em; color: #666; display: block; }
textarea { width: 100%; max-width: 60em; font: inherit; }
label { margin-right: 1em; }
"""


def link(route: str, rel: str, text: str | None = None) -> str:
    return f'<a href="{route}?path={quote(rel)}">{escape(text if text is not None else rel)}</a>'


def page(title: str, parts: list[str], *, refresh: int | None = None, css: str = "") -> str:
    nav = " · ".join(f'<a href="{href}">{name}</a>' for href, name in NAV)
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    return "\n".join([
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>',
        f"<style>{CSS}{css}</style></head><body><nav>{nav}</nav><h1>{escape(title)}</h1>",
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


def overview(root: str, scan: Scan, models: int, *, allow_run: bool, login: bool) -> str:
    runs = sum(
        a.record is None or a.kind in ("finetune", "distill", "dpo", "kto", "reward", "grpo")
        for a in scan.artifacts.values()
    )
    run = ("<p>Chat is on (<code>--allow-run</code>): it loads models and uses this machine.</p>" if allow_run
           else "<p>Read-only: nothing here starts work (chat needs <code>--allow-run</code>).</p>")  # fmt: skip
    out = (
        '<form method="post" action="/logout"><button type="submit">log out</button></form>' if login else ""
    )
    return page("weightsmith", [
        f"<p>Workspace <code>{escape(root)}</code>: {len(scan.artifacts)} artifacts ({runs} training runs), "
        f"{len(scan.reports)} reports, {len(scan.arenas)} arena DBs, {len(scan.models)} models; "
        f"{models} models in the store.</p>",
        '<ul><li><a href="/store">store</a></li><li><a href="/runs">runs and artifacts</a></li>'
        '<li><a href="/reports">reports</a></li><li><a href="/arena">arena leaderboard</a></li>'
        '<li><a href="/chat">chat with a model or fork</a></li></ul>',
        run + ("<p>(the scan stopped early: a very large folder)</p>" if scan.truncated else "") + out,
    ])  # fmt: skip


def store(models: list[dict[str, Any]]) -> str:
    def chat(m: dict[str, Any]) -> str:
        return "" if m.get("problem") else f'<a href="/chat?model={quote("store:" + m["name"])}">chat</a>'

    rows = [[escape(m["name"]), escape(m["kind"]), fmt(m.get("size_bytes")), escape(str(m.get("source"))),
             escape(str(m.get("license") or "—")), escape(str(m.get("problem") or "")), chat(m)] for m in models]  # fmt: skip
    return page(
        "store", [table(["name", "kind", "bytes", "source", "license", "problem", ""], rows, "models")]
    )


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


def artifact(
    a: Artifact,
    curve: str | None,
    files: list[str],
    children: list[Artifact],
    live: bool,
    chat: str | None = None,
) -> str:
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
    if chat is not None:
        links.append(f'<a href="/chat?model={quote(chat)}">chat with it</a>')
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


# ----- arena -------------------------------------------------------------------------------------

ARENA_HOWTO = (
    "<code>weightsmith arena serve MODEL_A MODEL_B --db arena.sqlite</code> collects people's votes (or "
    "<code>arena judge</code> an LLM judge's, <code>arena import</code> a battle log); a DB in this folder "
    "shows here with its ratings."
)


def _voters_links(rel: str, voters: str, choices: list[str]) -> str:
    items = [escape(v) if v == voters else f'<a href="/arena/board?path={quote(rel)}&amp;voters={v}">{v}</a>'
             for v in choices]  # fmt: skip
    return "<p>Votes counted: " + " · ".join(items) + "</p>"


def _counts(counts: dict[str, Any]) -> str:
    if not counts:
        return ""
    tally = counts.get("tally") or {}
    extra = f" ({', '.join(f'{v} {escape(k)}' for k, v in tally.items())} battles in all)" if tally else ""
    return (f"<p>{counts['battles']} voted battles, {counts['votes']} votes, {counts['contestants']} "
            f"contestants{extra}.</p>")  # fmt: skip


def arena_index(
    boards: list[tuple[str, Any]], saved: list[tuple[str, str | None]], exports: list[Artifact]
) -> str:
    """Every arena DB with its overall ratings, saved ratings reports, preference-pair exports."""
    from weightsmith.arena.report import ratings_table

    if not boards and not saved and not exports:
        return page("arena", [f'<p id="no-arena">No arena in this workspace. {ARENA_HOWTO}</p>'])
    parts = []
    for rel, board in boards:
        parts.append(f"<h2>{escape(rel)}</h2>" + _counts(board.counts))
        if board.ratings is not None:
            parts.append(ratings_table(board.ratings.overall, board.ratings.level))
            parts.append(f'<p><a href="/arena/board?path={quote(rel)}">the whole leaderboard</a>: intervals plot, '
                         "win rates, pairs, categories, agreement</p>")  # fmt: skip
        else:
            parts.append(f'<p class="muted">No ratings yet: {escape(board.problem or "")}</p>')
    if saved:
        rows = [[link("/file", r), link("/file", rep, "report") if rep else "—"] for r, rep in saved]
        parts.append("<h2>saved ratings</h2>" + table(["ratings.json", "report"], rows, "saved-ratings"))
    if exports:
        rows = [[link("/artifact", a.rel), _headline(a.metrics)] for a in exports]
        parts.append(
            "<h2>preference pairs exported for DPO</h2>" + table(["pairs", "counts"], rows, "exports")
        )
    return page("arena", [f'<div id="arenas">{"".join(parts)}</div>'])


def arena_board(rel: str, board: Any, voters: str, choices: list[str]) -> str:
    """One DB's whole leaderboard: the arena's own report parts (tables, plot, matrices)."""
    from weightsmith.arena.report import report_parts

    head = [_voters_links(rel, voters, choices), _counts(board.counts)]
    if board.ratings is None:
        return page(
            f"arena: {rel}", [*head, f'<p id="problem">No ratings yet: {escape(board.problem or "")}</p>']
        )
    return page(f"arena: {rel}", [*head, '<div id="leaderboard">', *report_parts(board.ratings), "</div>"])


# ----- chat and login ----------------------------------------------------------------------------


def _options(targets: list[Any], chosen: str | None, kinds: dict[str, str]) -> str:
    groups: dict[str, list[str]] = {}
    for t in targets:
        why = f" — {t.problem}" if t.problem else ""
        attrs = (" selected" if t.key == chosen else "") + (" disabled" if t.problem else "")
        groups.setdefault(kinds[t.kind], []).append(
            f'<option value="{escape(t.key)}"{attrs}>{escape(t.label)}{escape(why)}</option>'
        )
    return "".join(f'<optgroup label="{escape(k)}">{"".join(v)}</optgroup>' for k, v in groups.items())


def chat(
    targets: list[Any], chosen: str | None, *, allow_run: bool, max_tokens: int, kinds: dict[str, str]
) -> str:
    """The chat page: with --allow-run a form its script drives; without, why it is off."""
    if not allow_run:
        rows = [[escape(t.label), escape(kinds[t.kind]), escape(t.problem or "")] for t in targets]
        return page("chat", [
            '<p id="run-note">Chat loads a model and uses this machine\'s CPU or GPU, so it is off unless the UI '
            "was started with <code>--allow-run</code>, e.g. <code>weightsmith ui --allow-run</code>. "
            "These are the models it could chat with:</p>",
            table(["model", "kind", "problem"], rows, "chat-models"),
        ])  # fmt: skip
    if not targets:
        return page("chat", ['<p id="run-note">No model to chat with: pull one (<code>weightsmith pull</code>) or '
                             "put a checkpoint, GGUF file or adapter in the workspace.</p>"])  # fmt: skip
    return page("chat", [
        '<form id="chat-form">',
        f'<p><label>model <select id="model">{_options(targets, chosen, kinds)}</select></label>',
        f'<label>max tokens <input id="max-tokens" type="number" min="1" max="{max_tokens}" '
        f'value="{min(256, max_tokens)}"></label>',
        '<label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" '
        'placeholder="the model\'s"></label></p>',
        '<p><label>system prompt <input id="system" type="text" size="60"></label></p>',
        '<div id="conversation" aria-live="polite"></div>',
        '<textarea id="prompt" rows="4" placeholder="Say something (Enter sends, Shift+Enter: new line)"></textarea>',
        '<p><button id="send" type="submit">send</button> <button id="stop" type="button" disabled>stop</button> '
        '<button id="reset" type="button">new chat</button></p>',
        '<p id="chat-status" class="muted">The model loads on the first message.</p></form>',
        '<script src="/static/chat.js"></script>',
    ], css=CHAT_CSS)  # fmt: skip


def login(target: str, message: str | None = None, *, needed: bool = True) -> str:
    if not needed:
        return page("log in", ['<p id="login-note">This UI needs no key (it listens on this machine only).</p>',
                               '<p><a href="/">to the overview</a></p>'])  # fmt: skip
    note = f'<p id="login-error" class="down">{escape(message)}</p>' if message else ""
    return page("log in", [
        note,
        '<form id="login" method="post" action="/login">',
        '<p><label>API key <input id="key" name="key" type="password" autocomplete="current-password" '
        "autofocus required></label>",
        f'<input type="hidden" name="next" value="{escape(target)}">',
        '<button id="login-button" type="submit">log in</button></p></form>',
        "<p class=\"muted\">The key the UI was started with (<code>--api-key-file</code>). Scripts can send it "
        "as <code>Authorization: Bearer KEY</code> instead.</p>",
    ])  # fmt: skip
