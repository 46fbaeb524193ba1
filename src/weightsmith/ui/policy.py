"""What the UI's responses tell the browser: the Content-Security-Policy and the other headers.

Every page gets `HEADERS`: a policy with no scripts and no external URLs (styles inline, images
as data: URLs, forms only to this server, never framed), no MIME sniffing, no referrer to
other sites, no caching. The chat page alone may run a script, and only the one this server sends
(`CHAT_HEADERS`: `script-src 'self'`, `connect-src 'self'`). Report files written by other
commands are served as they are inside a CSP sandbox (`REPORT_HEADERS`: no scripts, no forms,
an opaque origin), so a report that holds a model's output cannot act as the UI.

Not here: the pages (pages.py), the routes (app.py, routes.py).
"""

from __future__ import annotations

from fastapi.responses import HTMLResponse

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it, browsers send `Origin: null` on the UI's own POSTs (Fetch spec,
    # "serializing a request origin"), and the CSRF check (auth.py) could not tell them apart
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: The chat page runs its one script, from this server, which may only talk to this server.
CHAT_HEADERS = {**HEADERS, "Content-Security-Policy": CSP + "; script-src 'self'; connect-src 'self'"}
#: Report files are shown as they are, in a sandbox (no scripts, no forms, no same-origin access).
REPORT_HEADERS = {**HEADERS, "Content-Security-Policy": "sandbox; " + CSP}
#: What /file serves, by suffix.
FILE_TYPES = {".html": "text/html; charset=utf-8", ".png": "image/png", ".json": "text/plain; charset=utf-8",
              ".jsonl": "text/plain; charset=utf-8", ".yaml": "text/plain; charset=utf-8",
              ".txt": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8"}  # fmt: skip


def html(text: str, status: int = 200, headers: dict[str, str] = HEADERS) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=headers)
