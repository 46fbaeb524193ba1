"""What the server allows one connection, in uvicorn's terms: time to send its request
headers, their size, and how many connections at once.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but it waits forever
for the headers of a request that is arriving (its keep-alive timer stops at the first byte),
so connections that send a header byte now and then ("slow loris") are held open without
limit. Our protocols add one timer: from the moment a connection opens, or finishes a
response and waits for its next request, the client has `--read-timeout` seconds to complete
that request's headers, or the connection is closed. The body has its own time limit where it
is read (gate.read_body), so a slow body gets a 408 it can read.

Two HTTP parsers, one behaviour. With `httptools` (llhttp, in C) installed, the server parses
with it, and with `uvloop` its event loop is libuv's: measured by benchmarks/arena.py on 2
cores, the two together serve about 3x the votes per second (the server is bound by Python
time per request, much of it in the parser and the loop). Without them (uvloop has no
Windows build), the pure-Python `h11` and asyncio's loop serve the same requests. h11 bounds
a request head by itself (`h11_max_incomplete_event_size`); llhttp does not, so the httptools
protocol counts head bytes and answers 431 past `MAX_HEADER_BYTES`.
`uvicorn_options(limits)` gathers every uvicorn setting that bounds a client.

Not here: the Host, API-key and body checks (gate.py), the limits record (limits.py), running
uvicorn (weightsmith.commands.serve).
"""

from __future__ import annotations

import abc
import asyncio
import importlib.util
import logging
from typing import Any

from weightsmith.serve.limits import ConnectionLimits

log = logging.getLogger(__name__)

#: The largest request head (request line and headers) uvicorn buffers, in bytes.
MAX_HEADER_BYTES = 64 * 1024


def _plain_response(status: bytes, text: bytes) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (written before any app runs)."""
    head = b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % (
        status,
        len(text),
    )
    return head + b"connection: close\r\n\r\n" + text


_TOO_LARGE = _plain_response(b"431 Request Header Fields Too Large", b"the request headers are too large")


class _HeaderTimer(abc.ABC):
    """The header timer shared by both protocols: armed while the connection waits for a
    request's head, disarmed once the head is in. Subclasses say when that is."""

    header_timeout: float
    header_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    @abc.abstractmethod
    def _waiting_for_head(self) -> bool:
        """Whether the connection is between requests or inside one's head."""

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _head_too_slow(self) -> None:
        self.header_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %g s", self.header_timeout)
            self.transport.close()


def timed_h11_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than
    `header_timeout` seconds to arrive."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(_HeaderTimer, H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._waiting_for_head():  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._waiting_for_head() and not self.transport.is_closing():
                self._arm()  # waiting for the next request on this connection

        def _waiting_for_head(self) -> bool:
            return self.conn.their_state is h11.IDLE

    TimedH11Protocol.header_timeout = header_timeout
    return TimedH11Protocol


def timed_httptools_protocol(header_timeout: float) -> type:
    """uvicorn's httptools protocol with the same header timer, and a 431 for a request head
    over `MAX_HEADER_BYTES` (llhttp has no limit of its own)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TimedHttpToolsProtocol(_HeaderTimer, HttpToolsProtocol):
        in_head = False  # between the end of a response (or the connection's start) and a full head
        head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.in_head:
                self.head_bytes += len(data)
            super().data_received(data)
            if self.in_head and self.head_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                log.info("refusing a request head of over %d bytes", MAX_HEADER_BYTES)
                self._disarm()
                self.transport.write(_TOO_LARGE)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self.in_head = False
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._start_head()  # waiting for the next request on this connection

        def _start_head(self) -> None:
            self.in_head, self.head_bytes = True, 0
            self._arm()

        def _waiting_for_head(self) -> bool:
            return self.in_head

    TimedHttpToolsProtocol.header_timeout = header_timeout
    return TimedHttpToolsProtocol


def installed(module: str) -> bool:
    """Whether `module` can be imported (httptools, uvloop: optional speed-ups)."""
    return importlib.util.find_spec(module) is not None


def uvicorn_options(limits: ConnectionLimits, *, fast: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` that bound what clients can hold (connections past
    `max_connections` get 503 at once) and choose the parser and the loop: httptools and uvloop
    when `fast`, h11 and asyncio when not, and None: each fast one that is installed."""
    parser = "httptools" if (installed("httptools") if fast is None else fast) else "h11"
    loop = "uvloop" if (installed("uvloop") if fast is None else fast) else "asyncio"
    timeout = limits.read_timeout
    options: dict[str, Any] = {
        "http": timed_httptools_protocol(timeout) if parser == "httptools" else timed_h11_protocol(timeout),
        "loop": loop,
        "timeout_keep_alive": limits.keep_alive_timeout,
        "limit_concurrency": limits.max_connections,
        "timeout_graceful_shutdown": int(limits.drain_timeout) if limits.drain_timeout else None,
    }
    if parser == "h11":
        options["h11_max_incomplete_event_size"] = MAX_HEADER_BYTES
    return options
