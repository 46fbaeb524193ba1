"""`weightsmith ui`: one local web app over a workspace folder and the model store.

Routes (GET, HTML unless said): ``/`` overview, ``/store`` the models with sizes, sources and
licences, ``/runs`` every artifact and training run, ``/artifact?path=`` one of them (loss
curve from metrics.jsonl, reloading while it trains; metrics; links to its reports,
transcripts, lineage, what was made from it, and chat when it is a model), ``/lineage?path=``
its checked lineage tree, ``/reports`` and ``/file?path=`` the existing HTML reports (served
sandboxed), ``/transcripts?path=`` a red-team run's replies as text, ``/arena`` and
``/arena/board?path=&voters=`` the arena leaderboards (leaderboard.py), ``/chat`` and ``POST
/api/chat`` (chat.py), ``/login``, ``POST /login`` and ``POST /logout`` (auth.py),
``/static/chat.js``, ``/health`` (JSON).

Read-only by default: what starts work (chat loads a model and uses the CPU or GPU) needs
`--allow-run`; without it the chat page says so and ``POST /api/chat`` answers 403 with one
line. On serve's stack: serve's gate (the Host header against DNS rebinding, JSON-only POST
bodies but the login form, body size), then `UiAccess` (CSRF, the API key as a Bearer header
or a login cookie; auth.py), uvicorn with serve's connection limits, and a
Content-Security-Policy without external URLs whose only script is the chat page's, from this
server. A path outside the workspace is a 403 page, a missing one 404, a damaged lineage
record 422: never a 500 for bad input.

Not here: the pages' HTML (pages.py), finding files (workspace.py), options (commands/ui.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from weightsmith.errors import WeightsmithError
from weightsmith.serve.gate import ClientGone, Gate, error_response
from weightsmith.serve.limits import ConnectionLimits
from weightsmith.serve.schemas import ApiError
from weightsmith.ui import pages
from weightsmith.ui.auth import Access, UiAccess, session_token
from weightsmith.ui.chat import ChatOptions, ModelSlot
from weightsmith.ui.leaderboard import Leaderboards
from weightsmith.ui.policy import FILE_TYPES, HEADERS, REPORT_HEADERS, html
from weightsmith.ui.routes import add_arena_routes, add_login_routes, add_run_routes, store_models
from weightsmith.ui.workspace import PageError, Workspace, read_jsonl

log = logging.getLogger(__name__)

TRANSCRIPT_ROWS = 500


@dataclass
class UiSettings:
    """What serve's gate reads (its key check is off: `UiAccess` checks the key, cookie or header)."""

    host: str
    limits: ConnectionLimits
    api_key: None = None


@dataclass
class UiState:
    settings: UiSettings
    workspace: Workspace
    access: Access
    chat: ChatOptions
    metrics: Any = None
    slot: ModelSlot = field(init=False)  # the one model chat has loaded
    boards: Leaderboards = field(default_factory=Leaderboards)

    def __post_init__(self) -> None:
        self.metrics = _Counts()
        self.slot = ModelSlot(self.chat)


@dataclass
class _Counts:
    counts: Counter = field(default_factory=Counter)

    def request(self, endpoint: str, status: int) -> None:
        self.counts[endpoint, status] += 1


def create_ui_app(workspace: Path, *, host: str = "127.0.0.1", limits: ConnectionLimits | None = None,
                  api_key: str | None = None, chat: ChatOptions | None = None) -> FastAPI:  # fmt: skip
    """The UI over `workspace` (the model store is always skipped by the scan); `api_key`
    None: no login (localhost); `chat`: what chat may do (default: off, no --allow-run)."""
    from weightsmith.files import weightsmith_home

    state = UiState(UiSettings(host, limits or ConnectionLimits()), Workspace(workspace, skip=(weightsmith_home(),)),
                    Access(api_key), chat or ChatOptions())  # fmt: skip
    app = FastAPI(title="weightsmith ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = state
    _add_error_pages(app)
    _add_list_routes(app, state)
    _add_artifact_routes(app, state)
    add_login_routes(app, state)
    add_run_routes(app, state)
    add_arena_routes(app, state)
    app.add_middleware(UiAccess, access=state.access)
    app.add_middleware(Gate, state=state, form_paths=frozenset({"/login", "/logout"}))
    return app


def _add_error_pages(app: FastAPI) -> None:
    @app.exception_handler(PageError)
    async def page_error(request: Request, e: PageError) -> HTMLResponse:
        return html(pages.error_page(e.status, str(e)), e.status)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # the client left while sending its body: nobody reads this

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        if request.url.path.startswith("/api/"):
            return error_response(e)  # serve's JSON error object, which the chat script reads
        return html(pages.error_page(e.status, e.message), e.status, {**HEADERS, **e.headers})

    @app.exception_handler(WeightsmithError)
    async def bad_file(request: Request, e: WeightsmithError) -> HTMLResponse:
        return html(pages.error_page(422, str(e)), 422)

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError) -> HTMLResponse:
        return html(pages.error_page(400, f"{request.url.path}: this page needs ?path=RELATIVE/PATH"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> HTMLResponse:
        return html(
            pages.error_page(e.status_code, f"{request.method} {request.url.path}: {e.detail}"), e.status_code
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> HTMLResponse:
        log.exception("unexpected error on %s", request.url.path)
        return html(pages.error_page(500, f"internal error: {type(e).__name__}"), 500)


def _add_list_routes(app: FastAPI, state: UiState) -> None:
    ws = state.workspace

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/")
    def overview(request: Request) -> HTMLResponse:
        login = session_token(request.scope) is not None and state.access.key is not None
        return html(pages.overview(str(ws.root), ws.scan(), len(store_models()), allow_run=state.chat.allow_run,
                                   login=login))  # fmt: skip

    @app.get("/store")
    def store_page() -> HTMLResponse:
        return html(pages.store(store_models()))

    @app.get("/runs")
    def runs() -> HTMLResponse:
        return html(pages.runs(ws.scan()))

    @app.get("/reports")
    def reports() -> HTMLResponse:
        return html(pages.reports(ws.scan()))


def _add_artifact_routes(app: FastAPI, state: UiState) -> None:
    ws = state.workspace

    @app.get("/artifact")
    def artifact(path: str) -> HTMLResponse:
        from weightsmith.report.loss_curve import loss_curve_png

        target = ws.resolve(path)
        scan = ws.scan()
        a = scan.artifacts.get(ws.rel(target))
        if a is None:
            raise PageError(404, f"{path}: no lineage record or training run there")
        folder = target if target.is_dir() else target.parent
        metrics = folder / "metrics.jsonl"
        curve = None
        if metrics.is_file():
            read_jsonl(metrics, 1)  # refuses a huge file before it is plotted
            curve = loss_curve_png(metrics, title=a.rel)
        under = "" if ws.rel(folder) == "." else ws.rel(folder) + "/"
        files = [r for r in scan.reports if r.startswith(under)][:50]
        if (folder / "transcripts.jsonl").is_file():
            files.append(ws.rel(folder / "transcripts.jsonl"))
        live = a.record is None and metrics.is_file()
        chat = f"path:{a.rel}" if a.rel in scan.models else None
        return html(pages.artifact(a, curve, files, ws.children(scan, a.id), live, chat))

    @app.get("/lineage")
    def lineage(path: str) -> HTMLResponse:
        from weightsmith.files import weightsmith_home
        from weightsmith.lineage import check_lineage

        target = ws.resolve(path)
        result = check_lineage(target, [ws.root, weightsmith_home()])
        return html(pages.lineage(path, result, ws.inside))

    @app.get("/transcripts")
    def transcripts(path: str) -> HTMLResponse:
        target = ws.resolve(path, want="file")
        return html(pages.transcripts(path, read_jsonl(target, TRANSCRIPT_ROWS), TRANSCRIPT_ROWS))

    @app.get("/file")
    def file(path: str) -> Response:
        target = ws.resolve(path, want="file")
        kind = FILE_TYPES.get(target.suffix.lower())
        if kind is None:
            raise PageError(415, f"{path}: the UI shows {', '.join(FILE_TYPES)} files only")
        if target.stat().st_size > 64 << 20:
            raise PageError(413, f"{path}: larger than 64 MiB")
        return Response(target.read_bytes(), media_type=kind, headers=REPORT_HEADERS)
