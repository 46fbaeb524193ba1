"""POST /v1/responses: OpenAI's Responses API over the chat path; GET and DELETE of stored ones.

A request (response_schemas.py) becomes the chat request it means and runs as one: the same
template, tools, structured output, guard and scheduler (app.start_chat). The answer is a
Response object: `output` holds a `reasoning` item (a reasoning model's thoughts: gpt-oss's
analysis channel, one `reasoning_text` part), an assistant `message` item with one
`output_text` part (the answer's content) and a `function_call` item per tool call; `status` is `completed`, or
`incomplete` with `incomplete_details.reason` `max_output_tokens` (the answer was cut) or
`content_filter` (a guard blocked it); `usage` counts `input_tokens` and `output_tokens`.
Unless the request says `store: false` (or `serve --response-store-mib 0`), the finished
response is stored (response_store.py): `GET /v1/responses/{id}` returns it, `DELETE` forgets it,
and a request with `previous_response_id` continues its conversation (404 for one not stored).

With `stream: true` the answer arrives as the Responses API's typed server-sent events, each
with a `sequence_number`: `response.created`, `response.in_progress`, then for the reasoning
`response.output_item.added`, `response.content_part.added`, `response.reasoning_text.delta`
per piece and the matching `.done` events, for the message
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`
per piece of text, `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`; for each tool call `response.output_item.added`,
`response.function_call_arguments.delta`, `.done` and `response.output_item.done`; and last
`response.completed` (or `response.incomplete`) carrying the whole response. A failure after
the stream started is an `error` event. Behind a guard with output rails the answer is checked
whole first, so its events come at once.

Not here: the request's fields and their chat translation (response_schemas.py).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from weightsmith.serve.jobs import cached_tokens
from weightsmith.serve.response_schemas import ResponsesRequest
from weightsmith.serve.response_store import ResponseStore, Stored
from weightsmith.serve.responses import ChoiceResult, sse
from weightsmith.serve.schemas import ApiError, ChatRequest, parse

#: (state, request, schema) -> (loaded model, scheduler, validated body): app._accept.
Accept = Callable[..., Awaitable[tuple[Any, Any, Any]]]
#: (state, loaded, scheduler, chat request) -> the submitted job: app.start_chat.
StartChat = Callable[..., Awaitable[Any]]

#: (the finished Response, its result) -> the Response, stored where it should be.
Keep = Callable[[dict[str, Any], ChoiceResult], dict[str, Any]]

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def add_response_route(app: FastAPI, state: Any, accept: Accept, start_chat: StartChat) -> None:
    store: ResponseStore = state.responses

    @app.post("/v1/responses")
    async def responses(http: Request) -> Response:
        loaded, scheduler, req = await accept(state, http, ResponsesRequest)
        req.check()
        history = _history(store, req.previous_response_id)
        chat = parse(ChatRequest, json.dumps(req.chat(history)).encode())
        job = await start_chat(state, loaded, scheduler, chat)
        shape = Shape(req, stored=store.enabled and req.store is not False)
        keep = _keeper(store, shape, [*history, *req.item_messages()])
        if req.stream:
            return StreamingResponse(_events(job, shape, keep), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        (result,) = await job.collect(http)
        return JSONResponse(
            keep(shape.response(result, job.prompt_tokens, cached=cached_tokens(job)), result)
        )

    @app.get("/v1/responses/{response_id}")
    async def stored(response_id: str) -> JSONResponse:
        state.require()
        return JSONResponse(_stored(store, response_id).response)

    @app.delete("/v1/responses/{response_id}")
    async def forget(response_id: str) -> JSONResponse:
        state.require()
        _stored(store, response_id)
        store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def _stored(store: ResponseStore, response_id: str, param: str | None = None) -> Stored:
    found = store.get(response_id)
    if found is None:
        why = (
            "this server stores no responses (--response-store-mib 0)"
            if not store.enabled
            else (f"no stored response {response_id!r} (never stored, deleted, or dropped for room)")
        )
        raise ApiError(404, why, param=param, code="response_not_found")  # fmt: skip
    return found


def _history(store: ResponseStore, previous: str | None) -> list[dict[str, Any]]:
    """The conversation a `previous_response_id` ended ([] without one)."""
    return [] if previous is None else list(_stored(store, previous, "previous_response_id").messages)


def _keeper(store: ResponseStore, shape: Shape, asked: list[dict[str, Any]]) -> Keep:
    """What to call with each finished Response (and its result): stores it when it should."""

    def keep(response: dict[str, Any], result: ChoiceResult) -> dict[str, Any]:
        if shape.stored:
            answer: dict[str, Any] = {"role": "assistant", "content": result.text or None}
            if result.tool_calls:
                answer["tool_calls"] = result.tool_calls
            store.put(response, [*asked, answer])
        return response

    return keep


class Shape:
    """One request's Response objects: its id, creation time, the ids of its output items."""

    def __init__(self, req: ResponsesRequest, *, stored: bool = False) -> None:
        self.req = req
        self.stored = stored  # the finished response is kept (response_store.py)
        self.id = "resp_" + secrets.token_hex(12)
        self.created = int(time.time())
        self.message_id = "msg_" + secrets.token_hex(12)
        self.reasoning_id = "rs_" + secrets.token_hex(12)
        self.seq = 0

    def response(
        self, result: ChoiceResult | None, input_tokens: int, status: str | None = None, cached: int = 0
    ) -> dict[str, Any]:
        """The Response object: in progress (`result` None) or finished with `result`."""
        req, fmt = self.req, (self.req.text.format if self.req.text else None)
        reason = INCOMPLETE.get(result.finish_reason or "") if result is not None else None
        body = {
            "id": self.id, "object": "response", "created_at": self.created, "model": req.model,
            "status": status or ("in_progress" if result is None else "incomplete" if reason else "completed"),
            "error": None, "incomplete_details": {"reason": reason} if reason else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "output": self.output(result) if result is not None else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": self.stored,
            "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": _tool_choice(req), "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled", "metadata": req.metadata or {}, "user": req.user,
            "usage": None,
        }  # fmt: skip
        if result is not None:
            body["usage"] = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                             "output_tokens": result.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": input_tokens + result.completion_tokens}  # fmt: skip
        return body

    def output(self, result: ChoiceResult) -> list[dict[str, Any]]:
        items = [self.reasoning(result.reasoning, "completed")] if result.reasoning else []
        items += [self.message(result.text, "completed")] if result.text or not result.tool_calls else []
        return items + [self.call(c, "completed") for c in result.tool_calls]

    def reasoning(self, text: str | None, status: str) -> dict[str, Any]:
        """A reasoning model's thoughts (gpt-oss's analysis channel) as a reasoning item."""
        content = [] if text is None else [_reasoning_part(text)]
        return {
            "type": "reasoning",
            "id": self.reasoning_id,
            "status": status,
            "summary": [],
            "content": content,
        }

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def call(call: dict[str, Any], status: str, arguments: str | None = None) -> dict[str, Any]:
        function = call["function"]
        return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
                "name": function["name"], "status": status,
                "arguments": function["arguments"] if arguments is None else arguments}  # fmt: skip

    def event(self, kind: str, **fields: Any) -> str:
        """One typed event, numbered."""
        self.seq += 1
        body = {"type": kind, "sequence_number": self.seq, **fields}
        return f"event: {kind}\n" + sse(body)


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _tool_choice(req: ResponsesRequest) -> Any:
    choice = req.tool_choice
    if choice is None:
        return "auto" if req.tools else "none"
    return choice if isinstance(choice, str) else choice.model_dump()


def _unkept(response: dict[str, Any], result: ChoiceResult) -> dict[str, Any]:
    return response


async def _events(job: Any, shape: Shape, keep: Keep = _unkept) -> AsyncIterator[str]:
    """The stream: live text from a plain job, or the whole checked answer from a guarded one."""
    yield shape.event("response.created", response=shape.response(None, 0))
    yield shape.event("response.in_progress", response=shape.response(None, 0))
    live = Live(shape)
    result = ChoiceResult()
    finished = False
    try:
        if hasattr(job, "pieces"):
            while not finished:
                ev = await job.events.get()
                if ev.error:
                    yield shape.event("error", code="generation_failed", message=ev.error, param=None)
                    return
                text, thought, calls, reason = job.pieces(ev)
                result.reasoning += thought
                result.text += text
                for e in live.think(thought) + live.say(text):
                    yield e
                if reason is not None:
                    result.finish_reason, result.tool_calls = reason, calls
                    result.completion_tokens = ev.completion_tokens
                    finished = True
        else:  # guarded: checked whole first
            whole = await job.whole()
            finished = True
            if isinstance(whole, str):
                yield shape.event("error", code="generation_failed", message=whole, param=None)
                return
            (result,) = whole
            for e in live.think(result.reasoning) + live.say(result.text):
                yield e
        for e in live.finish(result):
            yield e
        result.reasoning = live.thought  # the final output lists what the stream showed, in its order
        final = keep(shape.response(result, job.prompt_tokens, cached=cached_tokens(job)), result)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield shape.event(kind, response=final)
    finally:
        if not finished and getattr(job, "request", None) is not None:
            job.request.cancel()  # the client went away


class Live:
    """A streamed answer's output items as they open and close: the reasoning (gpt-oss's
    analysis), then the message, then the tool calls, numbered in the order `Shape.output`
    lists them in the final response."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.next = 0  # the next output index
        self.reasoning_at: int | None = None
        self.message_at: int | None = None
        self.reasoning_open = False
        self.thought = ""
        self.text = ""

    def think(self, text: str) -> list[str]:
        if not text or self.message_at is not None:  # thoughts after the answer began stay unshown
            return []
        sh, out = self.shape, []
        if self.reasoning_at is None:
            self.reasoning_at, self.next, self.reasoning_open = self.next, self.next + 1, True
            out += [sh.event("response.output_item.added", output_index=self.reasoning_at,
                             item=sh.reasoning(None, "in_progress")),
                    sh.event("response.content_part.added", item_id=sh.reasoning_id, output_index=self.reasoning_at,
                             content_index=0, part=_reasoning_part(""))]  # fmt: skip
        self.thought += text
        out.append(sh.event("response.reasoning_text.delta", item_id=sh.reasoning_id, output_index=self.reasoning_at,
                            content_index=0, delta=text))  # fmt: skip
        return out

    def say(self, text: str) -> list[str]:
        if not text:
            return []
        out = self._close_reasoning() + (self._open_message() if self.message_at is None else [])
        self.text += text
        out.append(self.shape.event("response.output_text.delta", item_id=self.shape.message_id,
                                    output_index=self.message_at, content_index=0, delta=text, logprobs=[]))  # fmt: skip
        return out

    def finish(self, result: ChoiceResult) -> list[str]:
        """The closing events: the reasoning's, the message's (an empty message when nothing was
        said and nothing called), then each tool call's."""
        sh, out = self.shape, self._close_reasoning()
        if self.message_at is None and not result.tool_calls:
            out += self._open_message()
        if self.message_at is not None:
            ids = {"item_id": sh.message_id, "output_index": self.message_at}
            out += [
                sh.event("response.output_text.done", **ids, content_index=0, text=self.text, logprobs=[]),
                sh.event("response.content_part.done", **ids, content_index=0, part=_text_part(self.text)),
                sh.event("response.output_item.done", output_index=self.message_at,
                         item=sh.message(self.text, "completed")),
            ]  # fmt: skip
        for call in result.tool_calls:
            index, self.next = self.next, self.next + 1
            item = sh.call(call, "in_progress", "")
            args = call["function"]["arguments"]
            out += [
                sh.event("response.output_item.added", output_index=index, item=item),
                sh.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                         delta=args),
                sh.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         arguments=args),
                sh.event("response.output_item.done", output_index=index, item=sh.call(call, "completed")),
            ]  # fmt: skip
        return out

    def _open_message(self) -> list[str]:
        sh = self.shape
        self.message_at, self.next = self.next, self.next + 1
        return [
            sh.event("response.output_item.added", output_index=self.message_at, item=sh.message(None, "in_progress")),
            sh.event("response.content_part.added", item_id=sh.message_id, output_index=self.message_at,
                     content_index=0, part=_text_part("")),
        ]  # fmt: skip

    def _close_reasoning(self) -> list[str]:
        if not self.reasoning_open:
            return []
        self.reasoning_open = False
        sh, ids = self.shape, {"item_id": self.shape.reasoning_id, "output_index": self.reasoning_at}
        return [
            sh.event("response.reasoning_text.done", **ids, content_index=0, text=self.thought),
            sh.event("response.content_part.done", **ids, content_index=0, part=_reasoning_part(self.thought)),
            sh.event("response.output_item.done", output_index=self.reasoning_at,
                     item=sh.reasoning(self.thought, "completed")),
        ]  # fmt: skip
