"""Where synthetic text comes from: a model in this process through the batching engine, or
an OpenAI-compatible endpoint through the shared endpoint pool.

A model spec is a model reference (catalog or store name, HF directory, .gguf) or an
endpoint `http(s)://HOST:PORT/v1#MODEL` (`#MODEL` defaults to "default"; replicas:
comma-separated URLs before the `#`). Both generators take chat requests, each with its own
seed, and return one `Reply` per request in order. A request that fails (a prompt longer
than the context, an endpoint's error after the pool's retries, a reply that is not
OpenAI's shape) is a `Reply` with `error` set, never an exception, so one bad answer costs
one example and is counted; the pipeline stops only when a whole step fails.

In process, `batch_size` requests decode together in the engine (one prefill per request,
one decode step for all rows in flight; a finished row leaves the batch). On an endpoint,
`concurrency` requests are in flight per replica, retried with backoff and `Retry-After`
(weightsmith.endpoints).

Not here: what is asked (synth.recipes), what is kept (synth.filters).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weightsmith.endpoints import (
    EndpointError,
    EndpointPool,
    RetryPolicy,
    is_endpoint,
    snippet,
    split_endpoint,
)
from weightsmith.errors import GenerationError


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    seed: int


@dataclass
class Reply:
    text: str = ""
    finish: str = "stop"
    tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


class LocalGenerator:
    """A loaded `weightsmith.LLM`; requests decode `batch_size` at a time in its engine."""

    def __init__(self, llm: Any, sampling: Sampling, *, batch_size: int = 32) -> None:
        self.llm, self.sampling, self.batch_size = llm, sampling, batch_size
        self._identity: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            from weightsmith.eval.cache import model_fingerprint

            self._identity = {"kind": "in-process", "model": self.llm.name,
                              "weights_sha256": model_fingerprint(self.llm.model)}  # fmt: skip
        return self._identity

    def complete(self, requests: list[Request], progress: Callable[[int], None] | None = None) -> list[Reply]:
        engine = self.llm.engine
        out: list[Reply | None] = [None] * len(requests)
        ready: list[tuple[int, list[int]]] = []
        for i, r in enumerate(requests):
            try:
                ready.append((i, engine.chat_prompt(r.messages)))
            except GenerationError as e:
                out[i] = Reply(error=str(e))
        s = self.sampling
        for start in range(0, len(ready), self.batch_size):
            batch = ready[start : start + self.batch_size]
            params = [
                self.llm.sampling_params(
                    temperature=s.temperature,
                    top_p=s.top_p,
                    max_tokens=s.max_tokens,
                    seed=requests[i].seed,
                    stop=list(s.stop),
                )  # fmt: skip
                for i, _ in batch
            ]
            done = engine.generate([ids for _, ids in batch], params)
            for (i, _), c in zip(batch, done, strict=True):
                out[i] = Reply(c.text, c.finish_reason, c.completion_tokens)
            if progress:
                progress(len(batch))
        return [r if r is not None else Reply(error="not generated") for r in out]


class EndpointGenerator:
    """An OpenAI-compatible server (or replicas): POST /chat/completions per request."""

    def __init__(
        self, spec: str, sampling: Sampling, *, api_key: str | None = None, concurrency: int = 8,
        timeout: float = 120.0, retry: RetryPolicy | None = None, transport: Any = None,
    ) -> None:  # fmt: skip
        url, self.model = split_endpoint(spec)
        self.sampling = sampling
        self.pool = EndpointPool(
            url, api_key=api_key, concurrency=concurrency, timeout=timeout, retry=retry, transport=transport,
            what="--model endpoint",
        )  # fmt: skip
        self._identity: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = {
                "kind": "endpoint",
                "urls": self.pool.urls,
                **self.pool.served_model(self.model),
            }
        return self._identity

    def _one(self, request: Request) -> Reply:
        s = self.sampling
        body = {"model": self.model, "messages": request.messages, "temperature": s.temperature,
                "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": request.seed}  # fmt: skip
        if s.stop:
            body["stop"] = list(s.stop)
        try:
            answer = self.pool.post("/chat/completions", body)
        except EndpointError as e:
            return Reply(error=str(e))
        try:
            choice = answer["choices"][0]
            text, finish = choice["message"]["content"], choice.get("finish_reason") or "stop"
            tokens = (answer.get("usage") or {}).get("completion_tokens") or 0
        except (KeyError, IndexError, TypeError, AttributeError):
            text, finish, tokens = None, "stop", 0
        if not isinstance(text, str) or not isinstance(tokens, int):
            return Reply(
                error=f"{self.pool.urls[0]} returned a malformed reply: expected choices[0].message.content, "
                f"got {snippet(json.dumps(answer, default=str))}"
            )
        return Reply(text, str(finish), tokens)

    def complete(self, requests: list[Request], progress: Callable[[int], None] | None = None) -> list[Reply]:
        return self.pool.map(self._one, requests, progress=progress)


def make_generator(spec: str, sampling: Sampling, *, load: Callable[[str], Any], batch_size: int,
                   concurrency: int, timeout: float, api_key: str | None) -> Any:  # fmt: skip
    """An EndpointGenerator for a URL spec, else a LocalGenerator on `load(spec)`."""
    if is_endpoint(spec):
        return EndpointGenerator(spec, sampling, api_key=api_key, concurrency=concurrency, timeout=timeout)
    return LocalGenerator(load(spec), sampling, batch_size=batch_size)
