"""The arena's contestants as the command line names them, loaded and ready to answer.

A spec is one of:

- `NAME` (kind "local"): a store or catalog model, an HF directory or a .gguf file;
- `NAME:ADAPTER` (kind "fork"): that model with the LoRA adapter `--adapter ADAPTER=DIR`;
- `http(s)://HOST:PORT/v1#MODEL` (kind "endpoint"): a model behind an OpenAI-compatible
  server (the network is reached only because the command line named the URL).

`Contestants` loads each distinct base model once; its forks share it, with their adapters
loaded beside the base weights (as `serve` does) and switched on per answer. A local model
answers one prompt at a time (a lock per base model), so the page's worker threads may ask
two contestants at once. Endpoint contestants stream from their server.

Not here: which pair meets (pairing.py), storing battles (store.py), the page (page.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from weightsmith.arena.endpoint import EndpointContestant
from weightsmith.arena.records import Contestant
from weightsmith.errors import ConfigError
from weightsmith.grants import Grants
from weightsmith.sampling import SamplingParams


def _label(model: str) -> str:
    """How a local model is called in tables: a path's folder or file name, else the name."""
    return Path(model).name if ("/" in model or model.endswith(".gguf")) else model


def is_endpoint_spec(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def split_endpoint(spec: str) -> tuple[str, str]:
    """`URL#MODEL` -> (base URL, model); the model is "default" when no `#MODEL` is given."""
    url, _, model = spec.partition("#")
    parts = urlsplit(url)
    if not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"contestant {spec!r}: expected an endpoint as http(s)://HOST:PORT/v1#MODEL")
    return url.rstrip("/"), model.strip() or "default"


def parse_contestant(spec: str, adapters: dict[str, Path]) -> Contestant:
    """A `Contestant` from a command-line spec (see the module docstring); one-line errors."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("a contestant spec is empty; give NAME, NAME:ADAPTER or URL#MODEL")
    spec = spec.strip()
    if is_endpoint_spec(spec):
        url, model = split_endpoint(spec)
        name = model if model != "default" else urlsplit(url).netloc
        return Contestant(name, spec, "endpoint")
    if ":" in spec:
        base, _, adapter = spec.rpartition(":")
        if not base:
            raise ConfigError(f"contestant {spec!r}: no model before ':'; write MODEL:ADAPTER")
        if adapter not in adapters:
            known = ", ".join(sorted(adapters)) or "none"
            raise ConfigError(
                f"contestant {spec!r}: no adapter named {adapter!r} (given: {known}); "
                f"pass --adapter {adapter}=DIR"
            )
        return Contestant(f"{_label(base)}:{adapter}", spec, "fork")
    return Contestant(_label(spec), spec, "local")


def fork_parts(c: Contestant) -> tuple[str, str | None]:
    """(base model, adapter name or None) of a local or fork contestant."""
    if c.kind == "fork":
        base, _, adapter = c.spec.rpartition(":")
        return base, adapter
    return c.spec, None


@dataclass
class _Local:
    """One loaded base model, the adapters loaded beside it, and the lock that serialises it."""

    llm: Any
    adapters: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Contestants:
    """The contestants named on a command line, loaded (see the module docstring).

    `loader(model, device=, dtype=)` loads a base model (default `weightsmith.llm.load`; the
    commands pass theirs, which shows a spinner). `grants.api_key_env` names the environment
    variable whose value is sent as the bearer key to endpoint contestants."""

    def __init__(
        self,
        specs: list[str],
        *,
        adapters: dict[str, Path] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        grants: Grants | None = None,
        loader: Callable[..., Any] | None = None,
    ) -> None:
        adapters = dict(adapters or {})
        self.contestants = [parse_contestant(s, adapters) for s in specs]
        self.names = [c.name for c in self.contestants]
        seen: dict[str, str] = {}
        for c in self.contestants:
            if c.name in seen:
                raise ConfigError(
                    f"contestants {seen[c.name]!r} and {c.spec!r} are both called {c.name!r}; name each once"
                )
            seen[c.name] = c.spec
        self._by_name = {c.name: c for c in self.contestants}
        key = _api_key(grants)
        self._endpoints = {
            c.name: EndpointContestant(c.name, *split_endpoint(c.spec), key)
            for c in self.contestants
            if c.kind == "endpoint"
        }
        self._locals: dict[str, _Local] = {}
        self._load(adapters, loader, device, dtype)

    def _load(
        self, adapters: dict[str, Path], loader: Callable[..., Any] | None, device: str, dtype: str
    ) -> None:
        if loader is None:
            from weightsmith.llm import load as loader
        for c in self.contestants:
            if c.kind == "endpoint":
                continue
            base, adapter = fork_parts(c)
            local = self._locals.get(base)
            if local is None:
                local = self._locals[base] = _Local(loader(base, device=device, dtype=dtype))
            if adapter is not None and adapter not in local.adapters:
                from weightsmith.lora import load_adapter, set_adapter

                load_adapter(local.llm.model, adapters[adapter], name=adapter)
                set_adapter(local.llm.model, None)
                local.llm.model.requires_grad_(False)
                local.adapters.add(adapter)

    def contestant(self, name: str) -> Contestant:
        if name not in self._by_name:
            raise ConfigError(f"no contestant called {name!r}; the contestants are {', '.join(self.names)}")
        return self._by_name[name]

    def check(self) -> None:
        """Make sure every endpoint contestant answers (at start-up): one line naming the first that does not."""
        for endpoint in self._endpoints.values():
            endpoint.check()

    def stream(self, name: str, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        """The answer's text deltas. A local model answers one call at a time (others wait)."""
        c = self.contestant(name)
        if c.kind == "endpoint":
            yield from self._endpoints[name].stream(messages, params)
            return
        base, adapter = fork_parts(c)
        local = self._locals[base]
        with local.lock:
            if local.adapters:
                from weightsmith.lora import set_adapter

                set_adapter(local.llm.model, adapter)
            engine = local.llm.engine
            ids = engine.chat_prompt(messages)
            for delta in engine.stream(ids, params):
                if delta.text:
                    yield delta.text

    def answer(self, name: str, messages: list[dict], params: SamplingParams) -> tuple[str, dict]:
        """The whole answer and its timings: {"first_token_s", "total_s"} in seconds."""
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        for text in self.stream(name, messages, params):
            if first is None:
                first = time.perf_counter() - start
            parts.append(text)
        total = time.perf_counter() - start
        return "".join(parts), {"first_token_s": first if first is not None else total, "total_s": total}


def _api_key(grants: Grants | None) -> str | None:
    """The endpoint contestants' key: the value of the variable the command line named."""
    var = grants.api_key_env if grants is not None else None
    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"environment variable {var} is not set; export it or drop the API-key option")
    return value


__all__ = ["Contestants", "fork_parts", "is_endpoint_spec", "parse_contestant", "split_endpoint"]
