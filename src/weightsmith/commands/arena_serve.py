"""The `arena serve` command: the arena page on uvicorn, with serve's limits.

Everything a user can get wrong is checked before the server listens, each one line: the
options, a bad `--prompts` line (FILE:LINE), an adapter directory, an unreachable endpoint
contestant (`Contestants.check()`), a DB written by a newer schema, a busy port. The
socket, uvicorn and the connection limits are serve's (`weightsmith.serve.startup.listen`,
and `ConnectionLimits` with the arena's defaults: `arena_limits`); the vote
key is read like serve's API key (`--vote-key-file` or `$WEIGHTSMITH_VOTE_KEY`, as a key on
the command line shows in the process list).

`start_arena_server` runs the same server on a thread and takes the contestants as an
argument (tests and the benchmark pass their own).

Not here: the page and its routes (weightsmith.arena.page), the contestants
(weightsmith.arena.contestants), the banner (weightsmith.cli.arena_serve).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.safety.policy_file import ClassifierAccess
from weightsmith.serve.limits import ConnectionLimits, arena_limits

#: The variable the vote key is read from when no flag gives it.
VOTE_KEY_ENV = "WEIGHTSMITH_VOTE_KEY"


@dataclass(kw_only=True)
class ArenaServeConfig:
    """Serve the arena page: people compare two anonymous answers and vote."""

    contestants: list[str] = opt(
        default_factory=list,
        help="two or more contestants: a store or catalog model, MODEL:ADAPTER (a fork), or URL#MODEL "
        "(an OpenAI-compatible endpoint); any of them + @builtin:NAME or @POLICY.yaml answers behind "
        "that guard policy",
        positional=True,
        split=False,
    )
    adapter: list[str] = opt(
        default_factory=list, help="a LoRA adapter forks name as MODEL:NAME, given as NAME=DIR", split=False
    )
    db: str = opt("arena.sqlite", "the arena DB (SQLite; created if missing)")
    prompts: str | None = opt(None, "JSON lines of prompts for 'random prompt': {prompt|messages, category?}")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = opt(8010, "port to listen on (0: any free port)")
    vote_key: str | None = opt(
        None,
        "make the arena private: battles and votes need this key (visible in the process list: prefer "
        f"--vote-key-file or ${VOTE_KEY_ENV})",
    )
    vote_key_file: str | None = opt(None, "read the vote key from this file (its first line)")
    max_votes_per_minute: int = opt(30, "most votes one voter may cast in 60 s; more get 429")
    max_prompt_chars: int = opt(4000, "most characters in a prompt; longer ones get 413 before generation")
    max_active: int = opt(8, "most battles being answered at once; more get 429")
    battle_ttl: float = opt(
        1800.0,
        "seconds a battle stays open for votes; an unvoted battle then stops counting toward pairing "
        "(it stays in the DB) and a late vote gets 410",
    )
    max_tokens: int = opt(256, "most tokens in each answer")
    temperature: float = opt(0.7, "sampling temperature of both answers (each side gets its own seed)")
    top_p: float = opt(1.0, "nucleus sampling of both answers")
    # --max-body, --read-timeout, --keep-alive-timeout, --max-connections, --allowed-host, --drain-timeout
    limits: ConnectionLimits = opt(default_factory=arena_limits, flatten=True)
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto (local contestants)")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto (local contestants)")

    def __post_init__(self) -> None:
        for name, value, low in (("max-votes-per-minute", self.max_votes_per_minute, 1),
                                 ("max-prompt-chars", self.max_prompt_chars, 1), ("max-active", self.max_active, 1),
                                 ("max-tokens", self.max_tokens, 1)):  # fmt: skip
            if value < low:
                raise UsageError(f"--{name} must be at least {low}, got {value}")
        if not self.battle_ttl > 0:
            raise UsageError(f"--battle-ttl must be a positive number of seconds, got {self.battle_ttl}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise UsageError(
                f"--temperature must be >= 0 and --top-p in (0, 1], got {self.temperature}, {self.top_p}"
            )


@dataclass
class RunningArena:
    """An arena server on a background thread; `stop()` drains it like Ctrl-C does."""

    url: str
    app: Any
    server: Any
    thread: threading.Thread
    store: Any
    vote_key: str | None = None

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.store.close()


def load_contestants(cfg: ArenaServeConfig) -> Any:
    """The contestants of the command line, checked: a bad guard policy or an endpoint that does
    not answer is one line."""
    from weightsmith.arena.contestants import Contestants
    from weightsmith.commands.serve import parse_adapters

    contestants = Contestants(list(cfg.contestants), adapters=parse_adapters(cfg.adapter), device=cfg.device,
                              dtype=cfg.dtype, classifier=cfg.classifier)  # fmt: skip
    contestants.check()
    return contestants


def build_arena_app(
    cfg: ArenaServeConfig, contestants: Any = None, **app_options: Any
) -> tuple[Any, Any, str | None]:
    """Check the options, open the DB, register the contestants and prompts; return (app,
    store, vote key). `contestants` None: the command line's (loaded and checked here)."""
    from weightsmith.arena.page import create_arena_app
    from weightsmith.arena.prompt_file import read_prompts
    from weightsmith.arena.store import ArenaStore
    from weightsmith.commands.serve import resolve_secret

    if len(cfg.contestants) < 2 and contestants is None:
        raise UsageError("an arena needs at least two contestants; name them before the options")
    vote_key = resolve_secret(cfg.vote_key, cfg.vote_key_file, flag="--vote-key", env=VOTE_KEY_ENV)
    prompts = [] if cfg.prompts is None else read_prompts(cfg.prompts, max_chars=cfg.max_prompt_chars)
    if contestants is None:
        contestants = load_contestants(cfg)
    db = Path(cfg.db).expanduser()
    store = ArenaStore(db)
    try:
        store.add_contestants(contestants.contestants)
        ids = store.add_prompts(prompts)
    except BaseException:
        store.close()
        raise
    stored = [type(p)(p.messages, p.category, p.source, i) for p, i in zip(prompts, ids, strict=True)]
    app = create_arena_app(cfg, store, contestants, stored, vote_key=vote_key, **app_options)
    return app, store, vote_key


def run_arena_serve(cfg: ArenaServeConfig, progress: Any = None) -> dict[str, Any]:
    """Serve the arena until Ctrl-C/SIGTERM. `progress(url, info)` is told once the socket
    listens; `info` holds the contestants' count, the prompts' count and whether a vote key
    is required."""
    from weightsmith.serve.startup import listen

    app, store, vote_key = build_arena_app(cfg)
    try:
        listener = listen(app, cfg.host, cfg.port, cfg.limits)
        state = app.state.arena
        info = {"contestants": len(state.contestants.names), "prompts": len(state.prompts),
                "vote_key": vote_key is not None, "db": str(store.path)}  # fmt: skip
        if progress is not None:
            progress(listener.url, info)
        listener.serve()
        return {"url": listener.url, **info, "battles": store.battle_tally()}
    finally:
        store.close()


def start_arena_server(cfg: ArenaServeConfig, contestants: Any = None, **app_options: Any) -> RunningArena:
    """The arena server on a thread (tests, the benchmark, the demo), ready when this returns."""
    from weightsmith.serve.startup import listen

    app, store, vote_key = build_arena_app(cfg, contestants, **app_options)
    try:
        listener = listen(app, cfg.host, cfg.port, cfg.limits)
    except BaseException:
        store.close()
        raise
    thread = listener.start("weightsmith-arena")
    return RunningArena(listener.url, app, listener.server, thread, store, vote_key)
