"""A valid request in flight: its token budget and sampling settings, the scheduler job that
carries it, and the JSON or server-sent-event response built from the job's events.

A client that goes away cancels its job: a stream's generator is closed by Starlette, and a
non-streamed request waits on `receive` for the disconnect alongside its events.

Not here: HTTP routing, auth and validation (app.py, schemas.py), generation (scheduler.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from weightsmith.errors import WeightsmithError
from weightsmith.grammar import Grammar
from weightsmith.llm import LLM
from weightsmith.sampling import SamplingParams
from weightsmith.serve.events import SequenceEvent, TokenLogprob
from weightsmith.serve.gate import ClientGone
from weightsmith.serve.prompt_logprobs import text_offsets
from weightsmith.serve.responses import SSE_DONE, ChoiceResult, ResponseBuilder, sse
from weightsmith.serve.scheduler import QueueFull, Scheduler
from weightsmith.serve.scheduler import Request as GenRequest
from weightsmith.serve.schemas import ApiError, SamplingFields
from weightsmith.serve.structured import ToolOutput
from weightsmith.tokenizer import Tokenizer


def token_budget(prompt_len: int, limit: int | None, n_ctx: int, prompt_param: str, limit_param: str) -> int:
    """How many tokens a choice may generate; 400 naming the prompt or the limit when the
    two do not fit in the context (with OpenAI-style counts for clients to adjust)."""
    extra = {"n_prompt_tokens": prompt_len, "n_ctx": n_ctx}
    if prompt_len == 0:
        raise ApiError(400, "the prompt is empty", param=prompt_param)
    if prompt_len >= n_ctx:
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens but the context is {n_ctx}, which leaves no room to "
            "generate; shorten it",
            code="context_length_exceeded",
            param=prompt_param,
            extra=extra,
        )
    if limit is None:
        return n_ctx - prompt_len
    if prompt_len + limit > n_ctx:
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens and {limit_param} is {limit}, more than the context of "
            f"{n_ctx} tokens; lower {limit_param} to at most {n_ctx - prompt_len} or shorten the prompt",
            code="context_length_exceeded",
            param=limit_param,
            extra=extra,
        )
    return limit


def sampling_params(
    llm: LLM, req: SamplingFields, max_tokens: int, grammar: Grammar | None = None
) -> SamplingParams:
    """The request's sampling settings (`grammar`: from its response_format or tool_choice)."""
    bias = req.token_bias(llm.model.config.vocab_size)
    if grammar is not None and req.ignore_eos:
        raise ApiError(400, "ignore_eos cannot be combined with response_format or a forced tool call",
                       param="ignore_eos")  # fmt: skip
    try:
        return llm.sampling_params(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=0 if req.top_k == -1 else req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=req.seed,
            stop=req.stops(),
            ignore_eos=req.ignore_eos,
            logit_bias=bias,
            grammar=grammar,
        )
    except WeightsmithError as e:
        raise ApiError(400, str(e)) from None


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Per-choice settings: choice i of a seeded request uses seed + i (wrapping past 2**64,
    the end of torch's seed range), so choices differ and the whole request is reproducible."""
    if params.seed is None:
        return [params] * n
    seeds = [params.seed + i for i in range(n)]
    return [replace(params, seed=s - 2**64 if s >= 2**64 else s) for s in seeds]


async def _disconnected(http: Request) -> None:
    """Return when the client closes the connection. (Starlette's `is_disconnected` only
    sees a disconnect the server already read, and uvicorn stops reading a connection
    once its request body is in, so we wait on `receive` as streaming responses do.)"""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def cached_tokens(job: Any) -> int:
    """Prompt tokens of `job` (any of the job kinds here) copied from a cache, not prefilled."""
    request = getattr(job, "request", None)
    return request.cached_tokens if request is not None else 0


class Job:
    """A request in flight: its scheduler request and the queue its events arrive on."""

    def __init__(
        self, prompts: list[list[int]], params: list[SamplingParams], adapter, logprobs, steer=None
    ) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[SequenceEvent] = asyncio.Queue()

        def emit(ev: SequenceEvent) -> None:  # called on the scheduler thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        self.request = GenRequest(prompts, params, emit=emit, adapter=adapter, logprobs=logprobs, steer=steer)
        self.prompt_tokens = sum(len(p) for p in {tuple(p) for p in prompts})
        #: reads the answers for tool calls (serve/structured.py), when the request offers tools
        self.tools: ToolOutput | None = None

    def _add(self, result: ChoiceResult, ev: SequenceEvent) -> None:
        """Add an event to its choice; with tools, only the text that is content, and at the end
        the calls the answer made."""
        if self.tools is None:
            result.add(ev)
            return
        result.add(replace(ev, text=self.tools.feed(ev.index, ev.text, ev.tokens)))
        result.reasoning += self._reasoning(ev.index)
        if ev.finish_reason is not None:
            rest, result.tool_calls, result.finish_reason = self.tools.finish(ev.index, ev.finish_reason)
            result.text += rest
            result.reasoning += self._reasoning(ev.index)

    def _reasoning(self, index: int) -> str:
        """The reasoning the tools reader's last feed or finish read (gpt-oss's analysis)."""
        return getattr(self.tools, "reasoning", [""] * (index + 1))[index]

    def submit(self, scheduler: Scheduler, retry_after: int) -> None:
        try:
            scheduler.submit(self.request)
        except QueueFull as e:
            raise ApiError(
                429,
                f"the server is busy ({e}); retry after {retry_after} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(retry_after)},
            ) from None

    async def collect(self, http: Request) -> list[ChoiceResult]:
        """Wait for every choice; cancel if the client goes away meanwhile."""
        results = [ChoiceResult() for _ in self.request.prompts]
        remaining = len(results)
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            while remaining:
                event = asyncio.ensure_future(self.events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise ClientGone
                ev = event.result()
                if ev.error:
                    raise ApiError(500, ev.error, type="server_error", code="generation_failed")
                self._add(results[ev.index], ev)
                remaining -= ev.finish_reason is not None
        finally:
            gone.cancel()
            if remaining:
                self.request.cancel()
        return results

    async def stream(self, builder: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
        n = len(self.request.prompts)
        done, completion_tokens = 0, 0
        try:
            if builder.chat:
                for i in range(n):
                    yield sse(builder.role_chunk(i))
            while done < n:
                ev = await self.events.get()
                if ev.error:
                    body = ApiError(500, ev.error, type="server_error", code="generation_failed").body()
                    yield sse(body)
                    break
                for chunk in self._chunks(builder, ev):
                    yield sse(chunk)
                if ev.finish_reason is not None:
                    done += 1
                    completion_tokens += ev.completion_tokens
            else:
                if include_usage:
                    yield sse(builder.usage_chunk(self.prompt_tokens, completion_tokens, cached_tokens(self)))
            yield SSE_DONE
        finally:
            if done < n:
                self.request.cancel()  # the client went away (or the stream failed)

    def pieces(self, ev: SequenceEvent) -> tuple[str, str, list[dict[str, Any]], str | None]:
        """What one streamed event adds: (content text: with tools, what is certainly content;
        reasoning text; at the end the tool calls made; the finish reason, at the end)."""
        text, reason, calls, thought = ev.text, ev.finish_reason, [], ""
        if self.tools is not None:
            text = self.tools.feed(ev.index, ev.text, ev.tokens)
            thought = self._reasoning(ev.index)
            if reason is not None:
                rest, calls, reason = self.tools.finish(ev.index, reason)
                text, thought = text + rest, thought + self._reasoning(ev.index)
        return text, thought, calls, reason

    def _chunks(self, builder: ResponseBuilder, ev: SequenceEvent) -> list[dict[str, Any]]:
        """The stream chunks of one event: its text (with tools: what is certainly content), and
        at the end the tool calls and the finish chunk."""
        text, thought, calls, reason = self.pieces(ev)
        out = [builder.reasoning_chunk(ev.index, thought)] if thought else []
        out += [builder.text_chunk(ev.index, text, ev.logprobs)] if text or ev.logprobs else []
        if calls:
            out += builder.tool_call_chunks(ev.index, calls)
        if reason is not None:
            out.append(builder.finish_chunk(ev.index, reason))
        return out


async def respond(
    job: Job, http: Request, builder: ResponseBuilder, req: SamplingFields, with_logprobs: bool
) -> Response:
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            job.stream(builder, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await job.collect(http)
    prompt_parts = job.prompt_logprobs(builder) if isinstance(job, EchoJob) else None
    body = builder.response(results, job.prompt_tokens, with_logprobs, cached_tokens(job))
    if prompt_parts is not None:  # echo with logprobs: the prompt's tokens, then the generated ones
        for choice, part in zip(body["choices"], prompt_parts, strict=True):
            choice["logprobs"] = {k: part[k] + choice["logprobs"][k] for k in part}
    return JSONResponse(body)


class EchoJob:
    """A completions job with `echo`: each choice's text starts with its prompt. With
    `logprobs`, the prompt's own token log-probabilities (prompt_logprobs.py) come first in
    the choice's logprobs, the generated tokens' after them; with max_tokens 0 (`job` None)
    the prompt is all there is."""

    def __init__(
        self,
        job: Any,
        prompts: list[list[int]],
        tokenizer: Tokenizer,
        logprobs: list[list[TokenLogprob | None]] | None = None,
    ) -> None:
        self.job, self.ids, self.scored = job, prompts, logprobs
        self.tokenizer = tokenizer
        self.prompts = [tokenizer.decode(p) for p in prompts]
        self.request = job.request if job is not None else None
        self.prompt_tokens = (
            job.prompt_tokens if job is not None else sum(len(p) for p in {tuple(p) for p in prompts})
        )

    def prompt_logprobs(self, builder: ResponseBuilder) -> list[dict[str, Any]] | None:
        """Each choice's prompt part of the legacy logprobs layout (generated tokens' offsets
        continue after the echoed prompt)."""
        if self.scored is None:
            return None
        return [
            builder.prompt_logprobs(i, ids, entries, text_offsets(self.tokenizer, ids), len(text))
            for i, (ids, entries, text) in enumerate(zip(self.ids, self.scored, self.prompts, strict=True))
        ]

    async def collect(self, http: Request) -> list[ChoiceResult]:
        if self.job is None:
            return [ChoiceResult(text=p, finish_reason="length") for p in self.prompts]
        results = await self.job.collect(http)
        for r, p in zip(results, self.prompts, strict=True):
            r.text = p + r.text
        return results

    async def stream(self, builder: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
        parts = self.prompt_logprobs(builder)
        for i, p in enumerate(self.prompts):
            lp = parts[i] if parts is not None else None
            yield sse(builder.chunk({"index": i, "text": p, "logprobs": lp, "finish_reason": None}))
        if self.job is not None:
            async for event in self.job.stream(builder, include_usage):
                yield event
            return
        for i in range(len(self.prompts)):
            yield sse(builder.finish_chunk(i, "length"))
        if include_usage:
            yield sse(builder.usage_chunk(self.prompt_tokens, 0))
        yield SSE_DONE


class GuardedJob:
    """A request behind a guardrail policy (`serve --guard`).

    Choices whose input the policy blocked are answered with its refusal and
    `finish_reason: "content_filter"` without reaching the model; the others run as `job`
    (the unblocked choices, in order). With output rails
    every answer is checked when complete, so a stream then arrives as one chunk per
    choice after the check; without output rails and nothing blocked, use the plain job.
    """

    def __init__(self, job: Job | None, guard, n: int, blocked: dict[int, str]) -> None:
        self.job, self.guard, self.n, self.blocked = job, guard, n, blocked
        self.index = [i for i in range(n) if i not in blocked]  # inner choice k -> outer choice
        self.request = job.request if job is not None else None
        self.prompt_tokens = job.prompt_tokens if job is not None else 0

    def _finish(self, inner: list[ChoiceResult]) -> list[ChoiceResult]:
        from weightsmith.safety.guarded import CONTENT_FILTER

        results = [ChoiceResult() for _ in range(self.n)]
        for i, refusal in self.blocked.items():
            results[i] = ChoiceResult(text=refusal, finish_reason=CONTENT_FILTER)
        verdicts = (
            self.guard.check_many([r.text for r in inner], "output") if self.guard.has_output_rails else None
        )
        for k, r in enumerate(inner):
            v = verdicts[k] if verdicts is not None else None
            if v is not None and v.blocked:
                r = ChoiceResult(text=v.refusal or "", finish_reason=CONTENT_FILTER,
                                 completion_tokens=r.completion_tokens)  # fmt: skip
            elif v is not None and v.action == "redact":
                r = ChoiceResult(
                    text=v.text, finish_reason=r.finish_reason, completion_tokens=r.completion_tokens
                )
            results[self.index[k]] = r
        return results

    async def collect(self, http: Request) -> list[ChoiceResult]:
        inner = await self.job.collect(http) if self.job is not None else []
        return self._finish(inner)

    async def whole(self) -> list[ChoiceResult] | str:
        """Every choice, checked: read from the job's events (a stream's, whose response watches
        for the client going away); the error's message if generation failed."""
        inner = [ChoiceResult() for _ in self.index]
        remaining = len(inner)
        try:
            while remaining:
                ev = await self.job.events.get()  # type: ignore[union-attr]
                if ev.error:
                    return ev.error
                inner[ev.index].add(ev)
                remaining -= ev.finish_reason is not None
        finally:
            if remaining and self.request is not None:
                self.request.cancel()  # the client went away (or generation failed)
        return self._finish(inner)

    async def stream(self, builder: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
        results = await self.whole()
        if isinstance(results, str):
            yield sse(ApiError(500, results, type="server_error", code="generation_failed").body())
            yield SSE_DONE
            return
        for i, r in enumerate(results):
            if builder.chat:
                yield sse(builder.role_chunk(i))
            if r.text:
                yield sse(builder.text_chunk(i, r.text, None))
            yield sse(builder.finish_chunk(i, r.finish_reason or "stop"))
        if include_usage:
            completion_tokens = sum(r.completion_tokens for r in results)
            yield sse(builder.usage_chunk(self.prompt_tokens, completion_tokens, cached_tokens(self)))
        yield SSE_DONE
