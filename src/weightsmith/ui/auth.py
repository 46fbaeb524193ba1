"""Who may use the UI, and from where: the API key (a Bearer header or a login cookie) and CSRF.

Without `--api-key` (the UI listens on localhost) every page is open to this machine. With a
key, `UiAccess`, a plain ASGI middleware behind serve's gate, lets a request through when it
carries ``Authorization: Bearer KEY`` (scripts) or the session cookie a browser gets from the
login page (`/login` takes the key in a form, compared with `hmac.compare_digest`, and sets a
random session token as an HttpOnly, SameSite=Strict cookie named after the port, so two UIs
on one machine do not log each other out). A browser that asks for a page without either is
sent to `/login?next=PAGE` (303); anything else gets 401 with one line saying how to
authenticate. Sessions live in memory for `SESSION_S` (a restart logs everyone out);
`/logout` ends one. Failed logins are limited per client address (`MAX_FAILURES` a minute,
then 429), so the key cannot be guessed at speed.

CSRF: every POST must come from the UI's own pages. The cookie is SameSite=Strict (a
cross-site request does not carry it); a request whose `Origin` names another site, or the
opaque origin "null" (a sandboxed page), or that says `Sec-Fetch-Site: cross-site`, gets 403
before any route runs, key or no key; JSON routes also need `Content-Type:
application/json` (serve's gate), which a cross-site form cannot send. A request with no
Origin header (curl, scripts) passes this check and still needs the key.

Not here: the Host-header and body checks (weightsmith.serve.gate), the login page's HTML
(pages.py), the routes (app.py).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

#: Routes open without the key: the login page itself, the health check, the icon.
PUBLIC_PATHS = frozenset({"/login", "/health", "/favicon.ico"})
#: Seconds a login lasts.
SESSION_S = 12 * 3600
#: Most sessions kept at once (the oldest is dropped beyond).
MAX_SESSIONS = 1000
#: Failed logins one client address may make per minute before 429.
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0


def cookie_name(scope: dict) -> str:
    """The session cookie's name: cookies are shared across ports, so the port is in it."""
    server = scope.get("server") or ("", 0)
    return f"weightsmith_ui_{server[1] or 0}"


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server, never another site ("/" otherwise)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


class Sessions:
    """Login session tokens in memory, each valid for `SESSION_S` seconds."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def mint(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = self._clock()
            self._tokens = {t: end for t, end in self._tokens.items() if end > now}
            while len(self._tokens) >= MAX_SESSIONS:
                self._tokens.pop(next(iter(self._tokens)))
            self._tokens[token] = now + SESSION_S
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            end = self._tokens.get(token)
            return end is not None and end > self._clock()

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._tokens.pop(token or "", None)


class Throttle:
    """Failed logins per client address in the last `FAILURE_WINDOW_S` seconds."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def blocked(self, client: str) -> bool:
        with self._lock:
            recent = self._recent(client)
            return len(recent) >= MAX_FAILURES

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client).append(self._clock())
            if len(self._failures) > 10 * MAX_SESSIONS:  # many addresses: forget the quiet ones
                self._failures = {c: d for c, d in self._failures.items() if d}

    def _recent(self, client: str) -> deque[float]:
        recent = self._failures.setdefault(client, deque())
        while recent and recent[0] < self._clock() - FAILURE_WINDOW_S:
            recent.popleft()
        return recent


class Access:
    """The key, the sessions and the login throttle of one UI (`key` None: no login needed)."""

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.sessions = Sessions()
        self.throttle = Throttle()

    def key_matches(self, given: str) -> bool:
        return self.key is not None and hmac.compare_digest(given.encode(), self.key.encode())


def _headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def session_token(scope: dict, headers: dict[str, str] | None = None) -> str | None:
    raw = (headers or _headers(scope)).get("cookie", "")
    try:
        morsel = SimpleCookie(raw).get(cookie_name(scope))
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


def cross_origin(headers: dict[str, str]) -> str | None:
    """Why a state-changing request does not come from this server's own pages (None: it does)."""
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        return "the request comes from another site (Sec-Fetch-Site: cross-site)"
    origin = headers.get("origin")
    if origin is None:
        return None
    parts = urlsplit(origin)
    if origin == "null" or not parts.netloc:
        return f"the request's Origin {origin!r} is not this server"
    if parts.netloc.lower() != headers.get("host", "").lower():
        return f"the request's Origin {origin} is not this server ({headers.get('host', '?')})"
    return None


def refusal(path: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error for a route: JSON under /api/ (what the page's script reads), else an HTML page."""
    if path.startswith("/api/"):
        code = {401: "invalid_api_key", 403: "forbidden"}.get(status)
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)
    from weightsmith.ui.pages import error_page

    return HTMLResponse(error_page(status, message), status_code=status, headers=headers)


class UiAccess:
    """The ASGI middleware: CSRF checks on every POST, then the key (see the module docstring)."""

    def __init__(self, app: Any, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refused = self.check(scope)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: dict) -> Response | None:
        headers = _headers(scope)
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            why = cross_origin(headers)
            if why is not None:
                return refusal(path, 403, f"{why}; use the UI's own pages (cross-site requests are refused)")
        if self.access.key is None or path in PUBLIC_PATHS:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme:
            if scheme.lower() == "bearer" and self.access.key_matches(given.strip()):
                return None
            return refusal(path, 401, "the API key is not valid; send 'Authorization: Bearer KEY' or log in "
                           "at /login", {"WWW-Authenticate": "Bearer"})  # fmt: skip
        if self.access.sessions.valid(session_token(scope, headers)):
            return None
        if (
            scope["method"] == "GET"
            and "text/html" in headers.get("accept", "")
            and not path.startswith("/api/")
        ):
            query = scope.get("query_string", b"").decode("latin-1")
            back = path + (f"?{query}" if query else "")
            return RedirectResponse(f"/login?next={quote(back, safe='')}", status_code=303)
        return refusal(path, 401, "this UI needs its API key: log in at /login, or send 'Authorization: "
                       "Bearer KEY'", {"WWW-Authenticate": "Bearer"})  # fmt: skip


def read_form(body: bytes) -> dict[str, str]:
    """An urlencoded form's fields (the first value of each)."""
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=8)
    return {k: v[0] for k, v in fields.items()}


def set_session(response: Response, scope: dict, token: str | None) -> Response:
    """Set (token) or clear (None) the session cookie on `response`."""
    name = cookie_name(scope)
    secure = scope.get("scheme") == "https"
    if token is None:
        response.delete_cookie(name, path="/", httponly=True, samesite="strict", secure=secure)
    else:
        response.set_cookie(name, token, max_age=SESSION_S, path="/", httponly=True, samesite="strict",
                            secure=secure)  # fmt: skip
    return response


__all__ = ["Access", "UiAccess", "read_form", "safe_next", "session_token", "set_session"]
