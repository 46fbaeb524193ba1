"""OpenAI's response objects, built from the scheduler's events.

Chat: `chat.completion` and `chat.completion.chunk` (a role chunk per choice, content
chunks, a finish chunk with an empty delta, then, when `stream_options.include_usage`
is set, a chunk with empty `choices` and the usage, and every earlier chunk carrying
`"usage": null`). Text: `text_completion` for both. Log-probabilities use the chat
layout (`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`) or the legacy
completions layout (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

Not here: the HTTP layer (app.py) or generation (scheduler.py).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from weightsmith import __version__
from weightsmith.serve.events import SequenceEvent, TokenLogprob
from weightsmith.tokenizer import Tokenizer

SYSTEM_FINGERPRINT = f"weightsmith-{__version__}"


@dataclass
class ChoiceResult:
    """One choice's output, accumulated from its events."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's, when the answer called tools
    reasoning: str = ""  # a reasoning model's thoughts apart from its answer (gpt-oss's analysis)

    def add(self, ev: SequenceEvent) -> None:
        self.text += ev.text
        self.tokens += ev.tokens
        self.logprobs += ev.logprobs or []
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            self.completion_tokens = ev.completion_tokens


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached`: prompt tokens copied from a cache, not prefilled."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ResponseBuilder:
    """Builds one request's response objects; `chat` selects the chat or text layout."""

    def __init__(self, tokenizer: Tokenizer, model: str, *, chat: bool, include_usage: bool = False) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # text offset per choice, for legacy logprobs

    # ---- pieces -----------------------------------------------------------------------

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _token(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token])
        return text, list(text.encode("utf-8"))

    def logprobs(self, entries: list[TokenLogprob], index: int) -> dict[str, Any]:
        if self.chat:
            content = []
            for e in entries:
                text, raw = self._token(e.token)
                top = []
                for t, lp in e.top:
                    t_text, t_raw = self._token(t)
                    top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
                content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content}
        tokens, offsets = [], []
        offset = self._offsets.get(index, 0)
        for e in entries:
            text, _ = self._token(e.token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._token(t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def prompt_logprobs(
        self, index: int, ids: list[int], entries: list[TokenLogprob | None], offsets: list[int], length: int
    ) -> dict[str, Any]:
        """The legacy layout for an echoed prompt of `length` characters (its first token has no
        log-probability: null); this choice's generated tokens are placed after it."""
        self._offsets[index] = length
        return {
            "tokens": [self._token(t)[0] for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [
                None if e is None else {self._token(t)[0]: lp for t, lp in e.top} for e in entries
            ],
            "text_offset": list(offsets),
        }

    # ---- whole responses --------------------------------------------------------------

    def response(
        self, results: list[ChoiceResult], prompt_tokens: int, with_logprobs: bool, cached: int = 0
    ) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            lp = self.logprobs(r.logprobs, i) if with_logprobs else None
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": r.text}
                if r.tool_calls:
                    message = {"role": "assistant", "content": r.text or None, "tool_calls": r.tool_calls}
                if r.reasoning:
                    message["reasoning_content"] = r.reasoning
                choices.append(
                    {"index": i, "message": message, "logprobs": lp, "finish_reason": r.finish_reason}
                )
            else:
                choices.append({"index": i, "text": r.text, "logprobs": lp, "finish_reason": r.finish_reason})
        return {
            **self._head(chunk=False),
            "choices": choices,
            "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results), cached),
        }

    # ---- stream chunks ----------------------------------------------------------------

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = {**self._head(chunk=True), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def role_chunk(self, index: int) -> dict[str, Any]:
        return self.chunk(
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def text_chunk(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        lp = self.logprobs(logprobs, index) if logprobs is not None else None
        if self.chat:
            return self.chunk(
                {"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
            )
        return self.chunk({"index": index, "text": text, "logprobs": lp, "finish_reason": None})

    def reasoning_chunk(self, index: int, text: str) -> dict[str, Any]:
        """Reasoning as vLLM and llama.cpp's server stream it: `delta.reasoning_content`."""
        return self.chunk(
            {"index": index, "delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None}
        )

    def tool_call_chunks(self, index: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A call as OpenAI streams it: its id, type and name with empty arguments, then the
        arguments (clients concatenate `arguments` fragments by the call's `index`)."""
        out = []
        for k, call in enumerate(calls):
            head = {"index": k, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
            args = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
            for part in (head, args):
                out.append(self.chunk({"index": index, "delta": {"tool_calls": [part]}, "logprobs": None,
                                       "finish_reason": None}))  # fmt: skip
        return out

    def finish_chunk(self, index: int, reason: str) -> dict[str, Any]:
        if self.chat:
            return self.chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
        return self.chunk({"index": index, "text": "", "logprobs": None, "finish_reason": reason})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
        return {
            **self._head(chunk=True),
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached),
        }
