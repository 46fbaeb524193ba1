"""The request body of OpenAI's Responses API (POST /v1/responses), and its translation into a
chat request (serve/response_route.py answers it through the chat path).

What is read: `input` (a string, or a list of items: messages whose content is a string or
`input_text` / `output_text` parts, earlier `function_call`s and their
`function_call_output`s), `instructions` (a system turn first), `max_output_tokens`,
`temperature`, `top_p`, `tools` (function tools, in the Responses layout: `name` at the top),
`tool_choice`, `parallel_tool_calls`, `text.format` (`text`, `json_object`, or `json_schema`
with `name`/`schema`/`strict` at the top), `stream`, `store` and `previous_response_id` (the
route continues a stored conversation: response_store.py). Accepted and changing nothing:
`metadata`, `user`, `prompt_cache_key`, `safety_identifier`, `service_tier`, `truncation:
"disabled"`. Refused with a 400 naming the field: `conversation` (the Conversations API is not
served: chain responses with `previous_response_id`), `background`, `include`, `top_logprobs`,
`reasoning` with a value, `truncation: "auto"`, and any item or part of another type (images,
files, web search).

Not here: the route and the answer's shape (response_route.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from weightsmith.serve.schemas import ApiError, Strict

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class ContentPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class MessageItem(Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str
    id: str | None = None
    status: str | None = None


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None


class ResponsesRequest(Strict):
    model: str = Field(min_length=1)
    input: str | list[MessageItem | FunctionCallItem | FunctionOutputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool | None = None  # None: true, as OpenAI's default
    previous_response_id: str | None = None
    # Accepted, and they change nothing in the answer.
    metadata: dict[str, Any] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    # Refused unless empty (check).
    conversation: Any = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    reasoning: dict[str, Any] | None = None

    def check(self) -> None:
        """400 for a field that would change the answer and is not implemented here."""
        refused = [
            ("conversation", self.conversation is not None,
             "conversations are not served; continue a stored response with previous_response_id"),
            ("background", bool(self.background), "background responses are not supported"),
            ("include", bool(self.include), "include is not supported"),
            ("top_logprobs", bool(self.top_logprobs), "top_logprobs is not supported"),
            ("reasoning", any(v is not None for v in (self.reasoning or {}).values()),
             "reasoning settings are not supported"),
            ("truncation", self.truncation == "auto", "truncation 'auto' is not supported; the input must fit"),
        ]  # fmt: skip
        for name, bad, why in refused:
            if bad:
                raise ApiError(400, why, param=name, code="unsupported_parameter")
        if isinstance(self.input, list) and not self.input:
            raise ApiError(400, "input must not be empty", param="input")
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema" and (fmt.name is None or fmt.schema_ is None):
            raise ApiError(400, "a json_schema format needs a name and a schema", param="text.format")

    def chat(self, history: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        """The same request as a chat-completions body (schemas.ChatRequest): `instructions`,
        then `history` (a stored conversation this request continues), then the input."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages = [*system, *history, *self.item_messages()]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False}
        for key, value in (("max_completion_tokens", self.max_output_tokens), ("temperature", self.temperature),
                           ("top_p", self.top_p), ("parallel_tool_calls", self.parallel_tool_calls),
                           ("user", self.user), ("metadata", self.metadata)):  # fmt: skip
            if value is not None:
                body[key] = value
        if self.tools:
            body["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                for t in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            schema = {
                "name": fmt.name,
                "schema": fmt.schema_,
                "strict": fmt.strict,
                "description": fmt.description,
            }
            body["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items()
                                                                              if v is not None}}  # fmt: skip
        return body

    def item_messages(self) -> list[dict[str, Any]]:
        """The input items as chat messages; consecutive function calls are one assistant turn's
        tool calls, and each output a tool turn."""
        out: list[dict[str, Any]] = []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        calls: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, FunctionCallItem):
                calls.append({"id": item.call_id, "type": "function",
                              "function": {"name": item.name, "arguments": item.arguments}})  # fmt: skip
                continue
            if calls:
                out.append({"role": "assistant", "content": None, "tool_calls": calls})
                calls = []
            if isinstance(item, FunctionOutputItem):
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                text = (
                    item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
                )
                out.append({"role": item.role, "content": text})
        if calls:
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
        return out
