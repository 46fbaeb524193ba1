"""Request bodies of the OpenAI-compatible API, and the error every bad one becomes.

Bodies are validated strictly (a string where a number belongs is an error, not
coerced) by pydantic before any work starts. Fields this server does not know are
accepted and logged, as OpenAI clients send new fields before servers learn them;
fields it knows but cannot honour (`suffix`, non-text content parts) are refused.
Every failure becomes an `ApiError`: an HTTP status and OpenAI's error object
`{"error": {"message", "type", "param", "code"}}`.

Not here: what the server does with a valid request (app.py).
"""

from __future__ import annotations

import logging
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


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
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
    user: str | None = None
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


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

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
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

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


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


#: Plain words for the union fields, whose pydantic errors list every alternative.
_EXPECTED = {
    "content": "a string or a list of text parts ({'type': 'text', 'text': ...})",
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
}


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]", "int"):
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
        log.info("ignoring unknown request fields: %s", ", ".join(sorted(extra)))
    return obj


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
