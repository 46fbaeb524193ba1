"""An OpenAI-compatible endpoint as an arena contestant: streamed chat completions.

The connection settings (base URL, model, bearer key, timeouts) are the eval judge's
(`weightsmith.eval.judge.EndpointJudge`): one way to reach an endpoint. This adds what a
contestant needs and a judge does not: the battle's sampling settings and a streamed
answer (server-sent events, `data: {...}` lines, `data: [DONE]` at the end).

The URL comes from the command line (the trust model: a shared file never names one).

Not here: parsing contestant specs, local models (contestants.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.eval.judge import EndpointJudge
from weightsmith.sampling import SamplingParams

#: The longest answer line (one SSE event) read from an endpoint, in characters.
MAX_EVENT_CHARS = 1 << 20


def request_body(model: str, messages: list[dict], params: SamplingParams) -> dict[str, Any]:
    """The chat-completions request for `params` (the fields OpenAI's API defines)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    return body


class EndpointContestant:
    """One `URL#model` contestant; `stream` is safe to call from several threads."""

    def __init__(
        self, name: str, base_url: str, model: str, api_key: str | None, *, timeout: float = 120.0
    ) -> None:
        self.name = name
        self.conn = EndpointJudge(base_url, model, api_key, timeout=timeout)

    def check(self, timeout: float = 5.0) -> None:
        """Ask the server for its models; a connection failure or a refused key is one line."""
        check_endpoint(self.conn, f"contestant {self.name!r}", "drop it from the contestants", timeout)

    def stream(self, messages: list[dict], params: SamplingParams) -> Iterator[str]:
        """The answer's text deltas, as the server streams them."""
        import httpx

        body = request_body(self.conn.model, messages, params)
        url = self.conn.url
        try:
            with self.conn.client() as client, client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise WeightsmithError(
                        f"contestant {self.name!r}: {url} answered HTTP {r.status_code}: {r.text[:200]!r}"
                    )
                for line in r.iter_lines():
                    text = _event_text(self.name, url, line)
                    if text is None:
                        return
                    if text:
                        yield text
        except httpx.HTTPError as e:
            raise WeightsmithError(
                f"contestant {self.name!r}: {url}: request failed ({type(e).__name__}: {e})"
            ) from None


def check_endpoint(conn: EndpointJudge, who: str, instead: str, timeout: float = 5.0) -> None:
    """Ask `conn`'s server for its models (GET {base_url}/models) before any work starts: a
    server that does not answer, or refuses the key, is one line naming `who` (a contestant,
    the judge) and what to do `instead` of starting it."""
    import httpx

    url = conn.base_url + "/models"
    try:
        with conn.client() as client:
            r = client.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        raise WeightsmithError(
            f"{who}: {url} is unreachable ({type(e).__name__}); start its server or {instead}"
        ) from None
    if r.status_code in (401, 403):
        raise WeightsmithError(f"{who}: {url} refused the request (HTTP {r.status_code}); check the API key")


def _event_text(name: str, url: str, line: str) -> str | None:
    """The text one SSE line adds ("" for none); None at `data: [DONE]`."""
    if len(line) > MAX_EVENT_CHARS:
        raise WeightsmithError(f"contestant {name!r}: {url} sent an event over {MAX_EVENT_CHARS} characters")
    if not line.startswith("data:"):
        return ""  # blank separators, comments, event names
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    try:
        choice = json.loads(data)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise WeightsmithError(
            f"contestant {name!r}: {url} sent a malformed event: {data[:120]!r}; expected choices[0].delta"
        ) from None
    if not isinstance(choice, dict):
        return ""
    delta = choice.get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


__all__ = ["EndpointContestant", "check_endpoint", "request_body"]
