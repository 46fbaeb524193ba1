"""What the server allows one connection: time to send its request headers, and how many at once.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but it waits forever
for the headers of a request that is arriving (its keep-alive timer stops at the first byte),
so connections that send a header byte now and then ("slow loris") are held open without
limit. `timed_h11_protocol(seconds)` is uvicorn's h11 protocol with one more timer: from the
moment a connection opens, or finishes a response and waits for its next request, the client
has `seconds` to complete that request's headers, or the connection is closed. The body has
its own time limit where it is read (gate.read_body), so a slow body gets a 408 it can read.
`uvicorn_limits` gathers every uvicorn setting that bounds a client.

Not here: the Host, API-key and body checks (gate.py), running uvicorn (weightsmith.commands.serve).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

#: The largest request head (request line and headers) uvicorn buffers, in bytes.
MAX_HEADER_BYTES = 64 * 1024


def timed_h11_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than
    `header_timeout` seconds to arrive."""

    class TimedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()  # waiting for the next request on this connection

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %g s", header_timeout)
                self.transport.close()

    return TimedH11Protocol


def uvicorn_limits(
    *, header_timeout: float, keep_alive_timeout: float, max_connections: int
) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` that bound what clients can hold: connections
    past `max_connections` get 503 at once."""
    return {
        "http": timed_h11_protocol(header_timeout),
        "timeout_keep_alive": keep_alive_timeout,
        "limit_concurrency": max_connections,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }
