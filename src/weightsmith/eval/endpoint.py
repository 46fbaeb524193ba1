"""Evaluation of a model behind OpenAI-compatible endpoints (ours, vLLM): the local `Scorer`'s
requests as HTTP calls, spread over replicas by `weightsmith.endpoints.EndpointPool`.

Log-likelihood (lm-eval's `local-completions` reads the same fields): one `/v1/completions` call
per request, the context and continuation as one prompt (trailing spaces of the context moved to
the continuation, as the Scorer does), `echo: true`, `logprobs: 1`, `max_tokens: 0` (a server that
refuses 0, as vLLM does, gets 1 and its extra token is dropped). The continuation's tokens are the
prompt tokens that end past the context's last character (`text_offset`); its log-likelihood is
the sum of their log-probabilities, and it is greedy when each of them is the most likely token
there. The server tokenizes the text as the Scorer does, so with our server the scored tokens
are the Scorer's whenever the context's tokens are a prefix of the whole text's (the boundary
falls between two tokens; lm-eval assumes it too). The numbers are computed differently (one
forward pass over the whole prompt, not the Scorer's cached prefix), so they agree with a local
run to float rounding (~1e-6), and metrics (acc) agree exactly; over one replica or several,
they are the same floats.

Generation: `/v1/completions` with the prompt text, greedy (or lm-eval's sampling with seed 1234
when a task sets do_sample), `max_gen_toks` and the stop strings, every sampling field set so no
server default (a checkpoint's generation_config) changes the decode; the answer is cut at the
first stop string, as locally. With `--apply-chat-template` the server renders the template
(`/tokenize` with the messages, then `/detokenize`, on ours and vLLM), so prompts are the text the
local path builds and every request stays a completion.

Refused before any request: `loglikelihood_rolling` and an empty context, which need the model's
BOS/EOS token and context length to cut windows (run those tasks without --endpoint).

Not here: the pool (retries, order, concurrency), the runner and cache (runner.py, cache.py).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from typing import Any

from weightsmith.endpoints import EndpointError, EndpointPool
from weightsmith.errors import UsageError
from weightsmith.eval.prompts import ChatFormatter
from weightsmith.eval.scorer import Progress, cut_at_stops

#: The most stop strings sent (our server's limit); the answer is cut at all of them anyway.
MAX_STOPS = 16


def endpoint_fingerprint(identity: dict[str, Any]) -> str:
    """The cache's model fingerprint for what endpoints serve (`EndpointPool.served_model`):
    never the URLs, so a run over two replicas and a rerun over one share entries; never a
    local run's (its floats differ at rounding)."""
    payload = json.dumps(["endpoint", identity], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class EndpointScorer:
    """The Scorer's interface (`loglikelihood`, `generate_until`, `chat_formatter`) for
    `model` served by `pool`'s endpoints."""

    #: Requests answered between two cache writes (an interrupted run keeps what it got).
    chunk = 256

    def __init__(self, pool: EndpointPool, model: str, *, batch_size: int = 64) -> None:
        self.pool = pool
        self.model = model
        self.batch_size = batch_size  # reported in results.json; the pool sets the concurrency
        self._echo_tokens = 0  # max_tokens of a scoring call: 0, or 1 for servers that refuse 0
        self._lock = threading.Lock()

    # -- prompts --------------------------------------------------------------------------

    def chat_formatter(self) -> ChatFormatter:
        """Messages -> prompt text through the served model's chat template (its server's)."""

        def render(messages: list[dict[str, str]]) -> str:
            body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
            ids = self._field(self.pool.post("/tokenize", body, root=True), "tokens", "/tokenize")
            text = self.pool.post("/detokenize", {"model": self.model, "tokens": ids}, root=True)
            return self._field(text, "prompt", "/detokenize")

        return render

    # -- log-likelihood -------------------------------------------------------------------

    def check_requests(self, by_kind: dict[str, list[tuple]]) -> None:
        """Refuse, before any request is sent, what an endpoint cannot answer: rolling
        log-likelihoods and empty contexts (both need the model's BOS/EOS token)."""
        if by_kind.get("rolling"):
            self.loglikelihood_rolling([])
        for args in by_kind.get("ll", []):
            if args[0] == "":
                raise UsageError(
                    f"a request with an empty context (continuation {args[1][:40]!r}) needs the model's BOS "
                    "token, which an endpoint does not give; evaluate this task without --endpoint"
                )

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        self.check_requests({"ll": list(requests)})
        return self.pool.map(self._score, list(requests), progress=progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Progress | None = None) -> list[float]:
        raise UsageError(
            "loglikelihood_rolling tasks cut windows with the model's tokenizer and context length, "
            "which an endpoint does not give; evaluate them without --endpoint"
        )

    def _score(self, request: tuple[str, str]) -> tuple[float, bool]:
        context, continuation = request
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # as the Scorer (lm-eval): the spaces belong to the continuation's first token
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        prompt = context + continuation
        body = {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 1, "temperature": 0.0}
        extra = self._echo_tokens
        try:
            answer = self.pool.post("/completions", {**body, "max_tokens": extra})
        except EndpointError as e:
            if extra or e.status not in (400, 422) or "max_tokens" not in str(e):
                raise
            with self._lock:
                self._echo_tokens = extra = 1  # vLLM: max_tokens >= 1; the extra token is dropped
            answer = self.pool.post("/completions", {**body, "max_tokens": extra})
        return continuation_score(answer, prompt, len(context), generated=extra, where=self.pool.what)

    # -- generation -----------------------------------------------------------------------

    def generate_until(
        self, requests: Sequence[tuple[str, dict]], progress: Progress | None = None
    ) -> list[str]:
        return self.pool.map(self._generate, list(requests), progress=progress)

    def _generate(self, request: tuple[str, dict]) -> str:
        context, kwargs = request
        stops = [s for s in kwargs.get("until", []) if s]
        sample = bool(kwargs.get("do_sample"))
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": context,
            "max_tokens": int(kwargs.get("max_gen_toks", 256)),
            # Every field the Scorer's SamplingParams sets, so no server default applies.
            "temperature": float(kwargs.get("temperature", 0.0)) if sample else 0.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }
        if stops:
            body["stop"] = stops[:MAX_STOPS]
        if sample:
            body["seed"] = 1234
        answer = self.pool.post("/completions", body)
        try:
            text = answer["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise EndpointError(
                f"{self.pool.what} /completions returned a malformed reply: expected choices[0].text"
            )
        return cut_at_stops(text, stops)

    def _field(self, answer: Any, key: str, route: str) -> Any:
        if not isinstance(answer, dict) or key not in answer:
            raise EndpointError(
                f"{self.pool.what} {route} returned a malformed reply: expected a JSON object with "
                f"{key!r}; --apply-chat-template over an endpoint needs /tokenize and /detokenize "
                "(weightsmith serve, vLLM)"
            )
        return answer[key]


def continuation_score(
    answer: Any, prompt: str, context_len: int, *, generated: int = 0, where: str = "endpoint"
) -> tuple[float, bool]:
    """(sum of the continuation's token log-probabilities, whether each is the top token) from
    an echo answer for `prompt`, whose first `context_len` characters are the context;
    `generated` tokens after the prompt (max_tokens) are ignored."""

    def malformed(what: str) -> EndpointError:
        return EndpointError(f"{where} /completions (echo with logprobs) returned a malformed reply: {what}")

    try:
        choice = answer["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
        values, tops, offsets = lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]
    except (KeyError, IndexError, TypeError):
        raise malformed("expected choices[0].text and logprobs with token_logprobs, top_logprobs, "
                        "text_offset (does the server support echo with logprobs?)") from None  # fmt: skip
    if not (isinstance(text, str) and len(values) == len(tops) == len(offsets)):
        raise malformed("token_logprobs, top_logprobs and text_offset differ in length")
    if generated:  # drop the generated tokens (usage.completion_tokens says how many)
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        generated = int(usage.get("completion_tokens", generated))
    n = len(values) - generated
    echoed = text[: offsets[n]] if generated and n < len(offsets) else text
    if n < 1 or not echoed.endswith(prompt):
        raise malformed(f"the echoed text does not end with the prompt sent ({prompt[-40:]!r})")
    boundary = len(echoed) - len(prompt) + context_len  # a BOS text may precede the prompt
    ends = [*offsets[1:n], len(echoed)]
    first = next((k for k in range(n) if ends[k] > boundary), n)
    if first == 0:
        raise malformed(
            "the prompt's first token already reaches into the continuation, so the context has no "
            "token of its own to condition it on"
        )
    total, greedy = 0.0, True
    for k in range(first, n):
        value, top = values[k], tops[k]
        if not isinstance(value, (int, float)) or not isinstance(top, dict) or not top:
            raise malformed(f"token {k} has no log-probability or no top_logprobs")
        total += value
        greedy = greedy and value >= max(top.values())
    return total, greedy


__all__ = ["EndpointScorer", "continuation_score", "endpoint_fingerprint"]
