"""The connection limits (`ConnectionLimits`) on both HTTP stacks uvicorn_server can pick:
httptools + uvloop and h11 + asyncio behave the same to a client that is slow to send its
headers, sends too many of them, or keeps its connection for several requests. The app is a
bare ASGI callable, so no model loads."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from weightsmith.commands.serve import bind, uvicorn_server
from weightsmith.errors import UsageError
from weightsmith.serve.connections import MAX_HEADER_BYTES, installed
from weightsmith.serve.limits import ConnectionLimits, arena_limits

STACKS = [
    pytest.param(False, id="h11-asyncio"),
    pytest.param(
        True,
        id="httptools-uvloop",
        marks=pytest.mark.skipif(
            not (installed("httptools") and installed("uvloop")), reason="httptools or uvloop not installed"
        ),
    ),
]


async def hello(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=STACKS)
def server(request):
    limits = ConnectionLimits(read_timeout=0.5, keep_alive_timeout=5.0, drain_timeout=1.0)
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(hello, limits, fast=request.param)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sends until it closes the connection."""
    s.settimeout(timeout)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_a_head_that_takes_too_long_is_closed(server) -> None:
    with socket.create_connection(("127.0.0.1", server)) as s:
        start = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        assert read_all(s) == b""  # closed without an answer
        assert 0.4 < time.monotonic() - start < 4


def test_the_timer_starts_again_after_each_response(server) -> None:
    with socket.create_connection(("127.0.0.1", server)) as s:
        for _ in range(3):  # each request well within the limit: the connection stays
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.settimeout(5)
            reply = b""
            while not reply.endswith(b"\r\n\r\nok"):
                reply += s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
        s.sendall(b"GET / HTTP/1.1\r\n")  # then a head that never ends
        assert read_all(s) == b""


def test_an_oversized_head_is_refused(server) -> None:
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        line = b"X-Big: " + b"a" * 1000 + b"\r\n"
        for _ in range(MAX_HEADER_BYTES // len(line) + 2):  # just over the limit, then wait
            s.sendall(line)
        reply = read_all(s)
    assert reply.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), reply[:80]


def test_the_limits_record_checks_its_values_and_keeps_each_commands_defaults() -> None:
    assert ConnectionLimits().max_body == 4 << 20 and arena_limits().max_body == 64 << 10
    for bad in ({"max_body": 10}, {"max_connections": 0}, {"read_timeout": 0}, {"drain_timeout": -1}):
        with pytest.raises(UsageError, match="--"):
            ConnectionLimits(**bad)
