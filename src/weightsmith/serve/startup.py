"""Starting one of our web apps (serve, arena serve, ui): bind the socket, build uvicorn, run it.

`listen(app, host, port, limits)` binds the listening socket first, so a busy port is one
clear line (`ServeError`) before anything prints "listening", and returns a `Listener`:
`serve()` runs uvicorn in this thread until Ctrl-C or SIGTERM (uvicorn drains requests in
flight for `--drain-timeout` seconds, then re-raises the Ctrl-C it handled: a normal stop),
`start(name)` runs it on a daemon thread and returns once it accepts connections (tests, the
demo, benchmarks). uvicorn is bounded by `ConnectionLimits` (connections.py).

Not here: what each app checks before it listens (weightsmith.commands.serve, arena_serve, ui),
the limits themselves (limits.py, connections.py).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.serve.limits import ConnectionLimits

#: Seconds `Listener.start` waits for uvicorn to accept connections.
START_TIMEOUT_S = 30.0


class ServeError(WeightsmithError):
    """The server could not start or its model failed to load."""


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so a busy port is a clear error, not a log line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host"
        ) from None
    sock.listen(2048)
    return sock


def uvicorn_server(app: Any, limits: ConnectionLimits, *, fast: bool | None = None) -> Any:
    """A uvicorn server for `app` bounded by `limits` (serve's and the arena's); `fast`
    chooses httptools + uvloop over h11 + asyncio (None: when installed; see
    weightsmith.serve.connections)."""
    import uvicorn

    from weightsmith.serve.connections import uvicorn_options

    config = uvicorn.Config(app, log_level="warning", access_log=False, **uvicorn_options(limits, fast=fast))
    return uvicorn.Server(config)


@dataclass
class Listener:
    """A bound socket and the uvicorn server that will answer on it."""

    url: str
    sock: socket.socket
    server: Any

    def serve(self) -> None:
        """Answer until Ctrl-C or SIGTERM (requests in flight drain first)."""
        try:
            self.server.run(sockets=[self.sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled, after draining: a normal stop

    def start(self, name: str, *, wait: bool = True) -> threading.Thread:
        """Answer on a daemon thread; with `wait`, return once uvicorn accepts connections."""
        thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name=name, daemon=True
        )
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while wait and not self.server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return thread

    def stop(self, thread: threading.Thread, timeout: float) -> None:
        """Ask uvicorn to drain and stop, and wait up to `timeout` seconds for `thread`."""
        self.server.should_exit = True
        thread.join(timeout)


def listen(app: Any, host: str, port: int, limits: ConnectionLimits) -> Listener:
    """Bind `host:port` (0: any free port) and build uvicorn for `app`; nothing answers yet."""
    sock = bind(host, port)
    server = uvicorn_server(app, limits)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return Listener(f"http://{shown}:{bound_port}", sock, server)


__all__ = ["Listener", "ServeError", "bind", "listen", "uvicorn_server"]
