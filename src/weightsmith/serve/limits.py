"""What a web server of ours allows its clients: one record, `ConnectionLimits`.

`weightsmith serve` and `weightsmith arena serve` both embed it flattened
(`opt(default_factory=..., flatten=True)`), so their flags keep their names (`--max-body`,
`--read-timeout`, `--keep-alive-timeout`, `--max-connections`, `--allowed-host`,
`--drain-timeout`) and each command keeps its own defaults through its factory: the API
takes request bodies of up to 4 MiB (long chats), the arena page only small JSON
(`arena_limits`: 64 KiB) and drains sooner. The gate (Host header, body size), the body
reader (its time limit) and uvicorn (header timeout, keep-alive, connection cap, shutdown)
all read this one record.

Not here: enforcing the limits (gate.py, connections.py), running uvicorn
(weightsmith.commands.serve).
"""

from __future__ import annotations

from dataclasses import dataclass

from weightsmith.config import opt
from weightsmith.errors import UsageError


@dataclass(kw_only=True)
class ConnectionLimits:
    """What one client may send and hold: body size, time limits, connections, Host names."""

    max_body: int = opt(4 << 20, "largest request body in bytes")
    read_timeout: float = opt(
        30.0, "seconds a client has to send a request's headers, and again its body (then 408)"
    )
    keep_alive_timeout: float = opt(5.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = opt(1000, "most open connections; requests beyond get 503")
    allowed_host: list[str] = opt(
        default_factory=list,
        help="also answer requests whose Host header is this name ('*': any); loopback names and "
        "--host are always allowed, and any name when --host is 0.0.0.0 or :: and this is unset",
        split=False,
    )
    drain_timeout: float = opt(30.0, "on shutdown, seconds to let requests in flight finish")

    def __post_init__(self) -> None:
        for name, value, low in (
            ("max-body", self.max_body, 1024),
            ("max-connections", self.max_connections, 1),
        ):
            if value < low:
                raise UsageError(f"--{name} must be at least {low}, got {value}")
        for name, seconds in (
            ("read-timeout", self.read_timeout),
            ("keep-alive-timeout", self.keep_alive_timeout),
        ):
            if not seconds > 0:
                raise UsageError(f"--{name} must be a positive number of seconds, got {seconds}")
        if not self.drain_timeout >= 0:
            raise UsageError(f"--drain-timeout must be 0 or more seconds, got {self.drain_timeout}")


def arena_limits() -> ConnectionLimits:
    """The arena page's defaults: its requests are small JSON (a prompt of at most
    --max-prompt-chars, a vote), and answers in flight are short."""
    return ConnectionLimits(max_body=64 << 10, drain_timeout=10.0)


__all__ = ["ConnectionLimits", "arena_limits"]
