"""Request bodies of the OpenAI-compatible API, and the error every bad one becomes.

Bodies are validated strictly (a string where a number belongs is an error, not
coerced) by pydantic before any work starts. No field that changes the answer is silently
ignored: each is implemented, or refused with a 400 naming it (`REFUSED`: OpenAI's audio,
predicted outputs, web search, the deprecated `functions`; vLLM's sampling extensions we do not
have), unless it holds the value that changes nothing. Fields that never change the answer
(`user`, `metadata`, `store`, ...) are accepted. Fields this server does not know at all are
accepted and logged once per name, as OpenAI clients send new fields before servers learn them.
Every failure becomes an `ApiError`: an HTTP status and OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`.

Not here: what the server does with a valid request (app.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

#: Most alternatives per token (`top_logprobs`, completions' `logprobs`), as OpenAI allows.
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.extra,
            }
        }


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class CalledFunction(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(Strict):
    """A tool call the assistant made earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant turn that calls tools
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # 0: only with completions' echo (score the prompt)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    # Accepted, and they change nothing in the answer.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Extensions (vLLM and llama.cpp spell them the same way).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    # weightsmith's own: steer with directions the server offers (`serve --direction`), e.g.
    # "refusal:ablate" or ["refusal:layer=4:scale=1"] (weightsmith.inspect.steering's spec, NAME for FILE)
    steer: str | list[str] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
        if any(s == "" for s in stops):
            raise ApiError(400, "stop strings must not be empty", param="stop")
        return stops

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def token_bias(self, vocab: int) -> dict[int, float]:
        """`logit_bias` with integer keys; 400 naming it for a key that is not a token id."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab})",
                               param="logit_bias", code="invalid_value")  # fmt: skip
            if not -100 <= bias <= 100:
                raise ApiError(400, f"logit_bias for token {key} is {bias}; biases must be in [-100, 100]",
                               param="logit_bias", code="invalid_value")  # fmt: skip
            out[int(key)] = float(bias)
        return out


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def limit(self) -> int | None:
        if self.max_tokens == 0 and self.max_completion_tokens is None:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        """None when logprobs are off, else how many alternatives per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per batch entry (a string, or token ids)."""
        return entries(self.prompt, "prompt")

    def check_unsupported(self) -> None:
        if self.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(
                400, "max_tokens 0 generates nothing; it is allowed only with echo (to score the prompt "
                "with logprobs)", param="max_tokens",
            )  # fmt: skip

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the answer carries the prompt tokens' log-probabilities."""
        return self.echo and self.logprobs is not None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list[ToolDef] | None = None
    return_token_strs: bool = False
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(Strict):
    """POST /v1/embeddings (serve/embedding_route.py)."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def texts(self) -> list[str | list[int]]:
        """The inputs, one per vector (a string, or token ids)."""
        return entries(self.input, "input")


def entries(value: str | list[str] | list[int] | list[list[int]], param: str) -> list[str | list[int]]:
    """OpenAI's batchable text field as its entries: a string, or token ids, each; 400 when empty."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise ApiError(400, f"{param} must not be empty", param=param)
    if all(isinstance(x, int) for x in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


#: Plain words for the union fields, whose pydantic errors list every alternative.
_EXPECTED = {
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "input": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "tool_choice": "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
}

#: Fields that would change the answer but are not implemented here, with the value (if any)
#: that changes nothing; any other value is refused with a 400 naming the field.
REFUSED: dict[str, tuple[Any, str]] = {
    "audio": (None, "audio output is not supported"),
    "modalities": (["text"], "only text output is supported"),
    "prediction": (None, "predicted outputs are not supported"),
    "web_search_options": (None, "web search is not supported"),
    "functions": (None, "the deprecated 'functions' is not supported; send 'tools'"),
    "function_call": (None, "the deprecated 'function_call' is not supported; send 'tool_choice'"),
    "reasoning_effort": (None, "reasoning_effort is not supported"),
    "verbosity": (None, "verbosity is not supported"),
    "guided_json": (None, "guided_json is not supported; send response_format json_schema"),
    "guided_regex": (None, "guided_regex is not supported"),
    "guided_choice": (None, "guided_choice is not supported; send response_format json_schema with an enum"),
    "guided_grammar": (None, "guided_grammar is not supported"),
    "structured_outputs": (None, "structured_outputs is not supported; send response_format"),
    "min_tokens": (0, "min_tokens is not supported"),
    "bad_words": (None, "bad_words is not supported; send logit_bias -100 for their tokens"),
    "allowed_token_ids": (None, "allowed_token_ids is not supported; send logit_bias"),
    "use_beam_search": (False, "beam search is not supported"),
    "length_penalty": (1.0, "length_penalty is not supported"),
    "include_stop_str_in_output": (False, "include_stop_str_in_output is not supported"),
    "skip_special_tokens": (True, "skip_special_tokens false is not supported"),
    "chat_template": (None, "a request's own chat_template is not supported (the checkpoint's is used)"),
    "chat_template_kwargs": (None, "chat_template_kwargs is not supported"),
    "continue_final_message": (False, "continue_final_message is not supported"),
    "prompt_logprobs": (None, "prompt_logprobs is not supported; use /v1/completions with echo and logprobs"),
}

_logged_unknown: set[str] = set()
_logged_lock = threading.Lock()


#: Union branches pydantic names in an error's location (they are not fields).
_BRANCHES = {"str", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]", "int", "NamedToolChoice", "bool",
             "dict[str,any]", "none"}  # fmt: skip


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _BRANCHES or str(part).startswith(("literal[", "function-")):
            break  # a union branch pydantic tried, not a field
        else:
            out += ("." if out else "") + str(part)
    return out


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body into `model`; ApiError(400) naming the field otherwise."""
    try:
        obj = model.model_validate_json(body or b"")
    except pydantic.ValidationError as e:
        raise _to_api_error(e) from None
    extra = getattr(obj, "model_extra", None)
    if extra:
        _refuse_or_log(extra)
    return obj


def _refuse_or_log(extra: dict[str, Any]) -> None:
    """400 for a field in REFUSED with a value that would change the answer; log each truly
    unknown field name once (per server process)."""
    for name, value in extra.items():
        if name in REFUSED:
            harmless, why = REFUSED[name]
            if value is not None and value != harmless:
                raise ApiError(
                    400, f"{why} (got {name}={value!r:.60})", param=name, code="unsupported_parameter"
                )
    with _logged_lock:
        new = sorted(n for n in extra if n not in REFUSED and n not in _logged_unknown)
        _logged_unknown.update(new)
    if new:
        log.info("ignoring unknown request fields (logged once each): %s", ", ".join(new))


def _to_api_error(e: pydantic.ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err['msg']}", code="invalid_json")
    param = _param(tuple(err["loc"]))
    if not param:
        return ApiError(400, "the request body must be a JSON object", code="invalid_json")
    field = param.rsplit(".", 1)[-1].split("[")[0]
    if err["type"] == "missing":
        return ApiError(
            400, f"missing required parameter {param!r}", param=param, code="missing_required_parameter"
        )
    if field == "content" and any(x["type"] == "literal_error" for x in e.errors()):
        return ApiError(400, f"invalid {param!r}: only text content parts are supported", param=param,
                        code="invalid_value")  # fmt: skip
    if field in _EXPECTED and len(e.errors()) > 1 and err["type"] != "literal_error":
        return ApiError(
            400, f"invalid {param!r}: expected {_EXPECTED[field]}", param=param, code="invalid_type"
        )
    value = err.get("input")
    shown = (
        repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else type(value).__name__
    )
    return ApiError(400, f"invalid {param!r}: {err['msg']} (got {shown})", param=param, code="invalid_value")
