"""The ui command: serve the workspace UI (`weightsmith.ui`) on localhost.

`run_ui(cfg, progress)` binds the socket first (a busy port is a clear error), tells
`progress(url)` and serves until Ctrl-C. Listening beyond the machine needs `--api-key`
(or its file; browsers log in with it, scripts send it as a Bearer header). The UI is
read-only unless `--allow-run` lets it start work: chat loads models (one at a time) on
`--device`. `start_ui_server` runs it on a thread (tests).

Not here: the app (`weightsmith.ui`), starting uvicorn (`weightsmith.serve.startup`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.serve.limits import ConnectionLimits

KEY_ENV = "WEIGHTSMITH_UI_KEY"


@dataclass(kw_only=True)
class UiConfig:
    """Serve a local web page of the store, runs, reports, lineage and arena of a workspace, and chat."""

    workspace: str = opt(".", "the folder whose runs and reports to show (nothing outside it is read)")
    host: str = opt("127.0.0.1", "address to listen on; anything but localhost needs --api-key")
    port: int = opt(8020, "port to listen on (0: any free port)")
    api_key: str | None = opt(
        None, f"require this key: a browser logs in with it, a script sends 'Authorization: Bearer KEY' "
        f"(prefer --api-key-file or ${KEY_ENV}: a key on the command line shows in the process list)",
    )  # fmt: skip
    api_key_file: str | None = opt(None, "read the API key from this file (its first line)")
    allow_run: bool = opt(
        False, "let the UI start work: chat with a store model or a workspace model or fork"
    )
    device: str = opt("auto", "where chat runs its model: cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "chat's dtype: fp32, bf16, fp16 or auto")
    max_tokens: int = opt(512, "most tokens in one chat reply")
    max_prompt_chars: int = opt(32_000, "most characters in one chat conversation")
    limits: ConnectionLimits = opt(default_factory=ConnectionLimits, flatten=True)

    def __post_init__(self) -> None:
        for name, value in (("max-tokens", self.max_tokens), ("max-prompt-chars", self.max_prompt_chars)):
            if value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")


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
    from weightsmith.serve.gate import LOOPBACK_HOSTS  # here: fastapi takes a third of a second to import
    from weightsmith.ui.app import create_ui_app
    from weightsmith.ui.chat import ChatOptions

    key = resolve_secret(cfg.api_key, cfg.api_key_file, flag="--api-key", env=KEY_ENV)
    if cfg.host not in LOOPBACK_HOSTS and key is None:
        raise UsageError(f"--host {cfg.host} shows your runs beyond this machine: give --api-key-file too")
    workspace = Path(cfg.workspace).expanduser()
    if not workspace.is_dir():
        raise UsageError(f"--workspace {cfg.workspace}: not a folder")
    if cfg.allow_run:  # a bad --device or --dtype is one line now, not on the first chat
        from weightsmith.device import pick_device, pick_dtype

        pick_dtype(cfg.dtype, pick_device(cfg.device))
    chat = ChatOptions(allow_run=cfg.allow_run, device=cfg.device, dtype=cfg.dtype, max_tokens=cfg.max_tokens,
                       max_prompt_chars=cfg.max_prompt_chars)  # fmt: skip
    return create_ui_app(workspace, host=cfg.host, limits=cfg.limits, api_key=key, chat=chat)


def run_ui(cfg: UiConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.serve.startup import listen

    listener = listen(_build(cfg), cfg.host, cfg.port, cfg.limits)
    if progress is not None:
        progress(listener.url)
    listener.serve()
    return {"url": listener.url}


def start_ui_server(cfg: UiConfig) -> RunningUi:
    """The UI on a thread, ready when this returns (tests)."""
    from weightsmith.serve.startup import listen

    listener = listen(_build(cfg), cfg.host, cfg.port, cfg.limits)
    thread = listener.start("weightsmith-ui")
    return RunningUi(listener.url, listener.server, thread)
