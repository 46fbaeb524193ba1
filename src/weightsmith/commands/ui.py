"""The ui command: serve the read-only workspace UI (`weightsmith.ui`) on localhost.

`run_ui(cfg, progress)` binds the socket first (a busy port is a clear error), tells
`progress(url)` and serves until Ctrl-C. Listening beyond the machine needs `--api-key`
(serve's gate checks it); `start_ui_server` runs it on a thread (tests).

Not here: the app (`weightsmith.ui.app`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.serve.gate import LOOPBACK_HOSTS
from weightsmith.serve.limits import ConnectionLimits

KEY_ENV = "WEIGHTSMITH_UI_KEY"


@dataclass(kw_only=True)
class UiConfig:
    """Serve a local, read-only web page of the store, runs, reports and lineage of a workspace."""

    workspace: str = opt(".", "the folder whose runs and reports to show (nothing outside it is read)")
    host: str = opt("127.0.0.1", "address to listen on; anything but localhost needs --api-key")
    port: int = opt(8020, "port to listen on (0: any free port)")
    api_key: str | None = opt(None, f"require Authorization: Bearer KEY (or --api-key-file, ${KEY_ENV})")
    api_key_file: str | None = opt(None, "read the API key from this file (its first line)")
    limits: ConnectionLimits = opt(default_factory=ConnectionLimits, flatten=True)


@dataclass
class RunningUi:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _build(cfg: UiConfig) -> Any:
    from weightsmith.commands.serve import resolve_secret
    from weightsmith.ui.app import create_ui_app

    key = resolve_secret(cfg.api_key, cfg.api_key_file, flag="--api-key", env=KEY_ENV)
    if cfg.host not in LOOPBACK_HOSTS and key is None:
        raise UsageError(f"--host {cfg.host} shows your runs beyond this machine: give --api-key-file too")
    workspace = Path(cfg.workspace).expanduser()
    if not workspace.is_dir():
        raise UsageError(f"--workspace {cfg.workspace}: not a folder")
    return create_ui_app(workspace, host=cfg.host, limits=cfg.limits, api_key=key)


def run_ui(cfg: UiConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.commands.serve import bind, uvicorn_server

    app = _build(cfg)
    sock = bind(cfg.host, cfg.port)
    server = uvicorn_server(app, cfg.limits)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    if progress is not None:
        progress(url)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return {"url": url}


def start_ui_server(cfg: UiConfig) -> RunningUi:
    """The UI on a thread, ready when this returns (tests)."""
    from weightsmith.commands.serve import bind, uvicorn_server

    app = _build(cfg)
    sock = bind(cfg.host, cfg.port)
    server = uvicorn_server(app, cfg.limits)
    host, port = sock.getsockname()[:2]
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="weightsmith-ui", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return RunningUi(f"http://{host}:{port}", server, thread)
