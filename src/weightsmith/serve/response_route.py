"""POST /v1/responses: OpenAI's Responses API over the chat path, stateless.

A request (response_schemas.py) becomes the chat request it means and runs as one: the same
template, tools, structured output, guard and scheduler (app.start_chat). The answer is a
Response object: `output` holds an assistant `message` item with one `output_text` part (the
answer's content) and a `function_call` item per tool call; `status` is `completed`, or
`incomplete` with `incomplete_details.reason` `max_output_tokens` (the answer was cut) or
`content_filter` (a guard blocked it); `usage` counts `input_tokens` and `output_tokens`.
Nothing is stored (`store: false`).

With `stream: true` the answer arrives as the Responses API's typed server-sent events, each
with a `sequence_number`: `response.created`, `response.in_progress`, then for the message
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

from weightsmith.serve.response_schemas import ResponsesRequest
from weightsmith.serve.responses import ChoiceResult, sse
from weightsmith.serve.schemas import ChatRequest, parse

#: (state, request, schema) -> (loaded model, scheduler, validated body): app._accept.
Accept = Callable[..., Awaitable[tuple[Any, Any, Any]]]
#: (state, loaded, scheduler, chat request) -> the submitted job: app.start_chat.
StartChat = Callable[..., Awaitable[Any]]

INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def add_response_route(app: FastAPI, state: Any, accept: Accept, start_chat: StartChat) -> None:
    @app.post("/v1/responses")
    async def responses(http: Request) -> Response:
        loaded, scheduler, req = await accept(state, http, ResponsesRequest)
        req.check()
        chat = parse(ChatRequest, json.dumps(req.chat()).encode())
        job = await start_chat(state, loaded, scheduler, chat)
        shape = Shape(req)
        if req.stream:
            return StreamingResponse(_events(job, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        (result,) = await job.collect(http)
        return JSONResponse(shape.response(result, job.prompt_tokens))


class Shape:
    """One request's Response objects: its id, creation time, the ids of its output items."""

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self.id = "resp_" + secrets.token_hex(12)
        self.created = int(time.time())
        self.message_id = "msg_" + secrets.token_hex(12)
        self.seq = 0

    def response(
        self, result: ChoiceResult | None, input_tokens: int, status: str | None = None
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
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": _tool_choice(req), "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled", "metadata": req.metadata or {}, "user": req.user,
            "usage": None,
        }  # fmt: skip
        if result is not None:
            body["usage"] = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": result.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": input_tokens + result.completion_tokens}  # fmt: skip
        return body

    def output(self, result: ChoiceResult) -> list[dict[str, Any]]:
        items = [self.message(result.text, "completed")] if result.text or not result.tool_calls else []
        return items + [self.call(c, "completed") for c in result.tool_calls]

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


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _tool_choice(req: ResponsesRequest) -> Any:
    choice = req.tool_choice
    if choice is None:
        return "auto" if req.tools else "none"
    return choice if isinstance(choice, str) else choice.model_dump()


async def _events(job: Any, shape: Shape) -> AsyncIterator[str]:
    """The stream: live text from a plain job, or the whole checked answer from a guarded one."""
    yield shape.event("response.created", response=shape.response(None, 0))
    yield shape.event("response.in_progress", response=shape.response(None, 0))
    result = ChoiceResult()
    opened = False
    finished = False
    try:
        if hasattr(job, "pieces"):
            while not finished:
                ev = await job.events.get()
                if ev.error:
                    yield shape.event("error", code="generation_failed", message=ev.error, param=None)
                    return
                text, _, calls, reason = job.pieces(ev)
                if text:
                    if not opened:
                        opened = True
                        for e in _open_message(shape):
                            yield e
                    result.text += text
                    yield shape.event("response.output_text.delta", item_id=shape.message_id, output_index=0,
                                      content_index=0, delta=text, logprobs=[])  # fmt: skip
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
            if result.text:
                opened = True
                for e in _open_message(shape):
                    yield e
                yield shape.event("response.output_text.delta", item_id=shape.message_id, output_index=0,
                                  content_index=0, delta=result.text, logprobs=[])  # fmt: skip
        for e in _close(shape, result, opened):
            yield e
        final = shape.response(result, job.prompt_tokens)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield shape.event(kind, response=final)
    finally:
        if not finished and getattr(job, "request", None) is not None:
            job.request.cancel()  # the client went away


def _open_message(shape: Shape) -> list[str]:
    return [
        shape.event("response.output_item.added", output_index=0, item=shape.message(None, "in_progress")),
        shape.event("response.content_part.added", item_id=shape.message_id, output_index=0, content_index=0,
                    part=_text_part("")),
    ]  # fmt: skip


def _close(shape: Shape, result: ChoiceResult, opened: bool) -> list[str]:
    """The message's closing events (opening it first when nothing came and nothing was
    called: an empty answer is an empty message), then each tool call's."""
    out = []
    if not opened and not result.tool_calls:
        out += _open_message(shape)
        opened = True
    if opened:
        ids = {"item_id": shape.message_id, "output_index": 0}
        out += [
            shape.event("response.output_text.done", **ids, content_index=0, text=result.text, logprobs=[]),
            shape.event("response.content_part.done", **ids, content_index=0, part=_text_part(result.text)),
            shape.event(
                "response.output_item.done", output_index=0, item=shape.message(result.text, "completed")
            ),
        ]
    for k, call in enumerate(result.tool_calls):
        index = k + int(opened)
        item = shape.call(call, "in_progress", "")
        args = call["function"]["arguments"]
        out += [
            shape.event("response.output_item.added", output_index=index, item=item),
            shape.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=args),
            shape.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=args),
            shape.event("response.output_item.done", output_index=index, item=shape.call(call, "completed")),
        ]  # fmt: skip
    return out
