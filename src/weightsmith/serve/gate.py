"""The server's gate: API key, body size, and request counting, before any route runs.

`Gate` is a plain ASGI middleware, so streaming and disconnects pass through untouched;
`read_body` reads a body with the same size limit for chunked uploads. It reads
`state.settings.api_key` and `state.settings.max_body` and counts on `state.metrics`.
Not here: the routes and the model (app.py), request schemas (schemas.py).
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from weightsmith.serve.schemas import ApiError

#: Routes that answer without an API key.
PUBLIC_PATHS = frozenset({"/", "/health"})
#: Endpoint labels for the request counter (anything else counts as "other").
ENDPOINTS = frozenset(
    {
        "/",
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/detokenize",
    }
)


class Gate:
    """A plain ASGI middleware (so streaming and disconnects pass through untouched) that
    checks the API key and Content-Length, and counts responses by endpoint and status."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        try:
            error = self._check(scope)
            if error is not None:
                await error_response(error)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.request(path if path in ENDPOINTS else "other", status)

    def _check(self, scope: dict) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        limit = self.state.settings.max_body
        if length.isdigit() and int(length) > limit:
            return too_large(limit)
        key = self.state.settings.api_key
        if key is None or scope["path"] in PUBLIC_PATHS or scope["method"] == "OPTIONS":
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            what = "no API key was given" if not given else "the API key is not valid"
            return ApiError(
                401,
                f"{what}; send the server's key as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None


def too_large(limit: int) -> ApiError:
    """413 for a body over `limit` bytes."""
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (chunked uploads too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
