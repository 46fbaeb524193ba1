"""The arena's contestants as the command line names them, loaded and ready to answer.

A spec is one of:

- `NAME` (kind "local"): a store or catalog model, an HF directory or a .gguf file;
- `NAME:ADAPTER` (kind "fork"): that model with the LoRA adapter `--adapter ADAPTER=DIR`;
- `http(s)://HOST:PORT/v1#MODEL` (kind "endpoint"): a model behind an OpenAI-compatible
  server (the network is reached only because the command line named the URL);
- any of these followed by `@POLICY`, where POLICY is `builtin:NAME` or a `.yaml`/`.yml`
  policy file: that contestant behind a guardrail policy, as `chat --guard` and `serve
  --guard` apply it (`weightsmith.safety.guarded`): input rails first (a block answers with
  the policy's refusal without asking the model), then the model, then output rails over the
  whole answer (so a policy with output rails sends its answer in one piece). Its name is the
  inner contestant's name with `@POLICY` (a file by its name), e.g.
  `smollm2-135m-instruct@builtin:school`; its kind is the inner one's. An `@` followed by
  anything else is part of a model name.

`Contestants` loads each distinct base model once; its forks and guarded versions share it,
with adapters loaded beside the base weights (as `serve` does) and switched on per answer.
Policies are read when the contestants are made, before any model loads, so a bad policy is
one line at start-up. A local model answers one prompt at a time (a lock per base model), so
the page's worker threads may ask two contestants at once. Endpoint contestants stream from
their server.

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

from weightsmith import endpoints
from weightsmith.arena.endpoint import EndpointContestant
from weightsmith.arena.records import Contestant
from weightsmith.errors import ConfigError, UsageError
from weightsmith.grants import Grants
from weightsmith.safety.policy_file import ClassifierAccess
from weightsmith.sampling import SamplingParams


def _label(model: str) -> str:
    """How a local model is called in tables: a path's folder or file name, else the name."""
    return Path(model).name if ("/" in model or model.endswith(".gguf")) else model


def split_endpoint(spec: str) -> tuple[str, str]:
    """A contestant's `URL#MODEL` -> (base URL, model); the model is "default" when not given."""
    return endpoints.split_endpoint(spec, "contestant", ConfigError)


def split_guard(spec: str) -> tuple[str, str | None]:
    """`SPEC@POLICY` -> (SPEC, POLICY) when POLICY is `builtin:NAME` or a .yaml/.yml file;
    (spec, None) otherwise (an `@` inside a model name stays there)."""
    inner, at, policy = spec.rpartition("@")
    policy = policy.strip()
    if at and (policy.startswith("builtin:") or policy.lower().endswith((".yaml", ".yml"))):
        if not inner.strip():
            raise ConfigError(f"contestant {spec!r}: no model before '@'; write MODEL@{policy}")
        return inner.strip(), policy
    return spec, None


def _policy_label(policy: str) -> str:
    """How a policy shows in a contestant's name: `builtin:NAME`, or a file's name."""
    return policy if policy.startswith("builtin:") else Path(policy).name


def parse_contestant(spec: str, adapters: dict[str, Path]) -> Contestant:
    """A `Contestant` from a command-line spec (see the module docstring); one-line errors."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("a contestant spec is empty; give NAME, NAME:ADAPTER or URL#MODEL (then @POLICY)")
    spec = spec.strip()
    inner, policy = split_guard(spec)
    if policy is not None:
        c = _parse_unguarded(inner, adapters)
        return Contestant(f"{c.name}@{_policy_label(policy)}", spec, c.kind)
    return _parse_unguarded(spec, adapters)


def _parse_unguarded(spec: str, adapters: dict[str, Path]) -> Contestant:
    if endpoints.is_endpoint(spec):
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
    """(base model, adapter name or None) of a local or fork contestant (guarded or not)."""
    spec, _ = split_guard(c.spec)
    if c.kind == "fork":
        base, _, adapter = spec.rpartition(":")
        return base, adapter
    return spec, None


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
    variable whose value is sent as the bearer key to endpoint contestants; `classifier`
    (the command line's `ClassifierAccess`) is what a guard policy's classifier may reach."""

    def __init__(
        self,
        specs: list[str],
        *,
        adapters: dict[str, Path] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        grants: Grants | None = None,
        loader: Callable[..., Any] | None = None,
        classifier: ClassifierAccess | None = None,
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
            c.name: EndpointContestant(c.name, *split_endpoint(split_guard(c.spec)[0]), key)
            for c in self.contestants
            if c.kind == "endpoint"
        }
        if loader is None:
            from weightsmith.llm import load as loader
        self._guards = self._read_policies(classifier, loader, device, dtype)
        self._locals: dict[str, _Local] = {}
        self._load(adapters, loader, device, dtype)

    def _read_policies(
        self, classifier: ClassifierAccess | None, loader: Callable[..., Any], device: str, dtype: str
    ) -> dict[str, Any]:
        """Each guarded contestant's policy, read and checked (a local classifier model loads
        on first use; an endpoint classifier must be granted by `classifier` now)."""
        from weightsmith.safety.guarded import load_guard

        grants = (classifier or ClassifierAccess()).grants()
        guards = {}
        for c in self.contestants:
            _, policy = split_guard(c.spec)
            if policy is None:
                continue
            try:
                guards[c.name] = load_guard(
                    policy, load_model=lambda ref: loader(ref, device=device, dtype=dtype), grants=grants
                )
            except (ConfigError, UsageError) as e:  # a policy file that is missing or bad
                raise type(e)(f"contestant {c.spec!r}: {e}") from None
        return guards

    def _load(self, adapters: dict[str, Path], loader: Callable[..., Any], device: str, dtype: str) -> None:
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

    def local_models(self) -> list[tuple[str, Any]]:
        """(base model as the command line names it, its loaded `LLM`) of each local base."""
        return [(base, local.llm) for base, local in self._locals.items()]

    def contestant(self, name: str) -> Contestant:
        if name not in self._by_name:
            raise ConfigError(f"no contestant called {name!r}; the contestants are {', '.join(self.names)}")
        return self._by_name[name]

    def check(self) -> None:
        """Make sure every endpoint contestant answers (at start-up): one line naming the first that does not."""
        for endpoint in self._endpoints.values():
            endpoint.check()

    def guard(self, name: str) -> Any:
        """The policy a contestant answers behind (a `safety.policy.Guard`), or None."""
        return self._guards.get(self.contestant(name).name)

    def stream(self, name: str, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        """The answer's text deltas. A local model answers one call at a time (others wait).
        A guarded contestant's answer passes its policy first (see the module docstring)."""
        guard = self.guard(name)
        if guard is None:
            yield from self._stream(name, messages, params)
            return
        from weightsmith.safety.guarded import guarded_replies

        if not guard.has_output_rails:  # input rails only: the answer streams as it comes
            verdict, sent = guard.guard_messages(list(messages))
            if verdict.blocked:
                yield verdict.refusal or ""
            else:
                yield from self._stream(name, sent, params)
            return

        def whole(conversations: list[list[dict]]) -> list[tuple[str, str]]:
            return [("".join(self._stream(name, conversations[0], params)), "stop")]

        (reply,) = guarded_replies(guard, [messages], whole)
        yield reply.text

    def _stream(self, name: str, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        """The model's own answer, without a policy."""
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


__all__ = [
    "Contestants",
    "fork_parts",
    "parse_contestant",
    "split_endpoint",
    "split_guard",
]
