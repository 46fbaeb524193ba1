"""gpt-oss's answers ("harmony" format) read into reasoning, content and tool calls.

gpt-oss writes every message of its answer as a header and a body between special tokens:

    <|channel|>analysis<|message|>...its reasoning...<|end|>
    <|start|>assistant<|channel|>final<|message|>...the answer...<|return|>
    <|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>

(the prompt ends with `<|start|>assistant`, so the first header is the channel). A recipient
(`to=functions.NAME`, in the role or the channel header) makes the body a call's JSON arguments;
otherwise the `analysis` channel is reasoning and `final` (and `commentary`) is content. Text before
any marker (a model that ignores the format, or an answer forced by a grammar) is content.

`HarmonyReader` works on token ids, since the markers are special tokens that text decoding
drops: each body is decoded on its own (no character split across a marker), streamed as it
comes. `is_harmony` says whether a tokenizer has the markers (gpt-oss's o200k_harmony).

Not here: rendering the prompt (the model's own chat template does, chat_template.py), the
server's use of it (serve/structured.py), other models' tool-call formats (serve/tool_parser.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weightsmith.tokenizer import StreamDecoder, Tokenizer

#: The special tokens that structure an answer.
MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")
_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


def is_harmony(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` has every harmony marker as a token (gpt-oss's vocabulary)."""
    return all(tokenizer.token_to_id(m) is not None for m in MARKERS)


@dataclass
class HarmonyCall:
    """A function call the answer made: its name and JSON arguments as written."""

    name: str
    arguments: str


@dataclass
class Parts:
    """What one feed added: reasoning and content text (calls come whole, at their end)."""

    reasoning: str = ""
    content: str = ""
    calls: list[HarmonyCall] = field(default_factory=list)


class HarmonyReader:
    """One answer's tokens in, its reasoning, content and calls out, as they come."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids = {tokenizer.token_to_id(m): m for m in MARKERS}
        #: "role" (after <|start|>), "channel" (after <|channel|>, or <|constrain|>), "body" (after
        #: <|message|>), or "text" (before any marker: content).
        self._state = "text"
        self._header = ""  # the current message's role and channel header text
        self._body = ""  # a call's arguments so far
        self._decoder: StreamDecoder = tokenizer.stream_decoder(skip_special_tokens=True)

    def feed(self, tokens: list[int]) -> Parts:
        """The reasoning, content and completed calls `tokens` add."""
        out = Parts()
        for token in tokens:
            marker = self._ids.get(token)
            if marker is None:
                self._route(self._decoder.push(token), out)
            else:
                self._route(self._decoder.flush(), out)
                self._mark(marker, out)
        return out

    def finish(self, ended: bool) -> Parts:
        """What is still held. `ended`: the answer stopped at an end token (`<|return|>`, `<|call|>`:
        stop tokens, so they may never be fed), which closes the open message; a call cut short
        (length) is not made."""
        out = Parts()
        self._route(self._decoder.flush(), out)
        if ended and self._state == "body":
            self._mark("<|end|>", out)
        return out

    def _route(self, text: str, out: Parts) -> None:
        if not text:
            return
        if self._state in ("role", "channel"):
            self._header += text
        elif self._state == "text":
            out.content += text
        elif self._recipient() is not None:
            self._body += text
        elif self._channel() == "analysis":
            out.reasoning += text
        else:
            out.content += text

    def _mark(self, marker: str, out: Parts) -> None:
        if marker == "<|start|>":
            self._state, self._header, self._body = "role", "", ""
        elif marker in ("<|channel|>", "<|constrain|>"):
            if self._state == "text":
                self._header = "assistant"  # the prompt's `<|start|>assistant`
            self._header += " " + marker
            self._state = "channel"
        elif marker == "<|message|>":
            self._state = "body"
        elif self._state == "body":  # <|end|>, <|call|> or <|return|> closes the message
            name = self._recipient()
            if name is not None:
                out.calls.append(HarmonyCall(name, self._body.strip()))
            self._state, self._header, self._body = "text", "", ""

    def _recipient(self) -> str | None:
        found = _RECIPIENT.search(self._header)
        return None if found is None else found.group(1)

    def _channel(self) -> str:
        _, _, after = self._header.partition("<|channel|>")
        return after.split()[0] if after.split() else ""


def call_arguments(raw: str) -> str:
    """A call's arguments as JSON text: as written when they parse, else wrapped as a string
    under "input" (gpt-oss may write a code block to a tool that takes text)."""
    try:
        json.loads(raw)
    except ValueError:
        return json.dumps({"input": raw}, ensure_ascii=False)
    return raw
