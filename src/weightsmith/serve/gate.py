"""The server's gate: Host, API key, body type and size, and request counting, before any
route runs.

`Gate` is a plain ASGI middleware, so streaming and disconnects pass through untouched. A web
page the user visits must not be able to drive a server on their machine, so the gate answers
421 to a Host header the server was not asked to answer to (DNS rebinding: a page whose name
now points at 127.0.0.1 reads `/v1/*`), and 415 to a POST body that is not
`application/json` (a cross-origin form or `text/plain` POST needs no CORS preflight).
`read_body` reads a body with the same size limit for chunked uploads, within a time limit
(slow bodies get 408), and turns a client that drops mid-upload into `ClientGone`, a quiet
499. It reads `state.settings` (its `host`, `api_key` and `limits`, a ConnectionLimits:
max_body, allowed_host) and counts on `state.metrics`.
Not here: the routes and the model (app.py), request schemas (schemas.py), header timeouts
and connection limits (connections.py).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from weightsmith.serve.limits import ConnectionLimits
from weightsmith.serve.schemas import ApiError

log = logging.getLogger(__name__)

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


#: Host names a server always answers to (browsers send these only for the machine itself).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Bind addresses that mean every interface: the host check is then off unless --allowed-host is given.
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})


class ClientGone(Exception):
    """The client disconnected before its answer was ready (a 499 nobody reads, no traceback)."""


def allowed_hosts(bind: str, extra: list[str]) -> frozenset[str] | None:
    """The Host names the server answers to; None: any (bound to every interface, no
    --allowed-host given, or '*' among them)."""
    extra = [h.strip().lower() for h in extra]
    if "*" in extra or (bind in ANY_ADDRESS and not extra):
        return None
    return LOOPBACK_HOSTS | {bind.lower().strip("[]")} | {h.strip("[]") for h in extra}


def host_name(header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lowercased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, port = header.rpartition(":")
    if name and port.isdigit():
        try:
            ipaddress.IPv6Address(header)  # a bare IPv6 address has colons but no port
        except ValueError:
            return name
    return header


class Gate:
    """A plain ASGI middleware (so streaming and disconnects pass through untouched) that
    checks the API key and Content-Length, and counts responses by endpoint and status."""

    def __init__(self, app: Any, state: Any, *, form_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.state = state
        #: POST routes that also take an HTML form body (the UI's login page): they check Origin themselves.
        self.form_paths = form_paths

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
        settings = self.state.settings
        limits = settings.limits
        hosts = allowed_hosts(settings.host, limits.allowed_host)
        host = host_name(headers.get("host", ""))
        if hosts is not None and host and host not in hosts:
            return ApiError(
                421,
                f"this server does not answer to the host name {host!r}; if you meant to reach it by "
                f"that name, start it with --allowed-host {host}",
                code="host_not_allowed",
            )
        length = headers.get("content-length", "")
        limit = limits.max_body
        if length.isdigit() and int(length) > limit:
            return too_large(limit)
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        form = scope["path"] in self.form_paths and media == "application/x-www-form-urlencoded"
        if scope["method"] == "POST" and media != "application/json" and not form:
            return ApiError(
                415,
                f"a POST body must be sent as 'Content-Type: application/json', not {media or 'nothing'!r}",
                code="unsupported_media_type",
            )
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


async def read_body(request: Request, limits: ConnectionLimits) -> bytes:
    """The body, refused with 413 as soon as it passes `limits.max_body` (chunked uploads too)
    and with 408 when it takes more than `limits.read_timeout` seconds to arrive; ClientGone if
    the client leaves."""
    limit, timeout = limits.max_body, limits.read_timeout

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except ClientDisconnect:
        log.info("%s %s: the client disconnected while sending its body", request.method, request.url.path)
        raise ClientGone from None
    except asyncio.TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s (--read-timeout); send it faster",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
