"""The UI's routes beyond reading files: log in and out, chat (with --allow-run), the arena.

`add_login_routes`: ``GET /login`` the form, ``POST /login`` (an urlencoded form: the key and
where to go next) sets the session cookie and goes on (303), or shows the form again with why
(401; 429 after too many failures); ``POST /logout`` ends the session. `add_run_routes`:
``GET /chat`` and ``POST /api/chat`` (403 with one line without --allow-run; chat.py), and
``GET /static/chat.js``. `add_arena_routes`: ``GET /arena`` every arena DB's ratings, saved
ratings and exports; ``GET /arena/board?path=&voters=`` one DB's whole leaderboard.

Not here: the checks every request passes (auth.py, serve's gate), the pages (pages.py).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from weightsmith.serve.gate import read_body
from weightsmith.serve.prepare import check_chars
from weightsmith.serve.schemas import ApiError, parse
from weightsmith.ui import pages
from weightsmith.ui.auth import read_form, safe_next, session_token, set_session
from weightsmith.ui.chat import KINDS, ChatBody, chat_events, find_target, store_paths, targets
from weightsmith.ui.leaderboard import VOTERS
from weightsmith.ui.policy import CHAT_HEADERS, HEADERS, html
from weightsmith.ui.workspace import PageError, is_arena_db

RUN_OFF = ("chat loads a model and uses this machine's CPU or GPU; this UI is read-only: restart it with "
           "--allow-run to chat")  # fmt: skip


def store_models() -> list[dict[str, Any]]:
    """The store's models as rows, with the catalog's licence where known."""
    from weightsmith.checkpoint import store
    from weightsmith.checkpoint.catalog import CATALOG

    out = []
    for entry in store.list_models():
        row = entry.to_dict()
        known = CATALOG.get(entry.name)
        row["license"] = known.license if known else None
        out.append(row)
    return out


def add_login_routes(app: FastAPI, state: Any) -> None:
    access = state.access

    @app.get("/login")
    def login_page(next: str = "/") -> Response:
        return html(pages.login(safe_next(next), needed=access.key is not None))

    @app.post("/login")
    async def login(request: Request) -> Response:
        if access.key is None:
            return RedirectResponse("/", status_code=303)
        client = request.client.host if request.client else "?"
        if access.throttle.blocked(client):
            return html(pages.login("/", "too many wrong keys; wait a minute and try again"), 429,
                        {**HEADERS, "Retry-After": "60"})  # fmt: skip
        try:
            form = read_form(await read_body(request, state.settings.limits))
        except ValueError:
            raise PageError(400, "the login form has too many fields; use the form on /login") from None
        target = safe_next(form.get("next"))
        if not access.key_matches(form.get("key", "")):
            access.throttle.failed(client)
            return html(pages.login(target, "that is not this UI's key"), 401)
        response = RedirectResponse(target, status_code=303)
        return set_session(response, request.scope, access.sessions.mint())

    @app.post("/logout")
    def logout(request: Request) -> Response:
        access.sessions.drop(session_token(request.scope))
        return set_session(RedirectResponse("/login", status_code=303), request.scope, None)


def add_run_routes(app: FastAPI, state: Any) -> None:
    ws, options = state.workspace, state.chat

    @app.get("/chat")
    def chat_page(model: str | None = None) -> Response:
        found = targets(ws, ws.scan(), store_paths(store_models()))
        text = pages.chat(
            found, model, allow_run=options.allow_run, max_tokens=options.max_tokens, kinds=KINDS
        )
        return html(text, headers=CHAT_HEADERS if options.allow_run else HEADERS)

    @app.get("/static/chat.js")
    def chat_script() -> Response:
        script = resources.files("weightsmith.ui").joinpath("static/chat.js").read_bytes()
        return Response(script, media_type="text/javascript; charset=utf-8", headers=HEADERS)

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        if not options.allow_run:
            raise ApiError(403, RUN_OFF, code="run_not_allowed")
        body = parse(ChatBody, await read_body(request, state.settings.limits))
        chars = sum(len(t.content) for t in body.messages)
        check_chars(chars, options.max_prompt_chars, "messages")
        target = find_target(ws, body.model, store_paths(store_models()))
        if target.problem:
            raise ApiError(422, f"{target.label}: {target.problem}", param="model")
        if not state.slot.busy.acquire(blocking=False):
            raise ApiError(429, "another reply is being generated; wait for it (or stop it) and send again",
                           headers={"Retry-After": "2"})  # fmt: skip
        events = chat_events(state.slot, target, body)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )


def add_arena_routes(app: FastAPI, state: Any) -> None:
    ws = state.workspace

    @app.get("/arena")
    def arena() -> Response:
        scan = ws.scan()
        boards = [(rel, state.boards.board(ws.root / rel)) for rel in sorted(scan.arenas)]
        saved = []
        for rel in sorted(scan.ratings):
            report = rel.rsplit("/", 1)[0] + "/report.html" if "/" in rel else "report.html"
            saved.append((rel, report if report in scan.reports else None))
        exports = sorted(
            (a for a in scan.artifacts.values() if a.kind == "arena export"), key=lambda a: a.rel
        )
        return html(pages.arena_index(boards, saved, exports))

    @app.get("/arena/board")
    def board(path: str, voters: str = "all") -> Response:
        target = ws.resolve(path, want="file")
        if not is_arena_db(target):
            raise PageError(404, f"{path}: not an arena DB in this workspace")
        if voters not in VOTERS:
            raise PageError(400, f"voters={voters[:40]!r}: choose one of {', '.join(VOTERS)}")
        return html(
            pages.arena_board(ws.rel(target), state.boards.board(target, voters), voters, list(VOTERS))
        )
