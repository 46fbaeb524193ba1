"""Tool calls out of a model's text, in the formats open chat models are trained to write.

- Hermes, Qwen 2.5 and Qwen 3: one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  block per call (a last block may lack its closing tag: the model stopped at its end token);
  text before the first block is the message content.
- Llama 3.1 / 3.2 (JSON tool calling): the whole answer is `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`, several separated by `;`.
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers) or
  `[TOOL_CALLS]name[ARGS]{...}` (v11+), content before the marker.

Text that holds no call, a call whose JSON does not parse, or one naming a function the request
did not offer, stays content, as vLLM's parsers do: the client sees what the model said.
`ToolStream` is the streaming form: it passes content through as it comes and holds back what
may be the start of a call until the answer ends. `constrained_calls` reads the two shapes the
server's grammars force for `tool_choice` required and named (serve/tools.py).

Not here: rendering tools into the prompt and the grammars (serve/tools.py).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

#: Where a call starts, per format; the Llama form has no marker but a leading `{`.
MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call(obj: Any, names: set[str], args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall:
    """A ToolCall from {"name": ..., "arguments"|"parameters": {...}}; ValueError otherwise."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        raise ValueError("not a call to an offered function")
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):
        json.loads(args)  # a string must itself be JSON
        return ToolCall(obj["name"], args)
    if not isinstance(args, dict):
        raise ValueError("arguments must be an object")
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list[Any]:
    """Consecutive JSON values in `text`, separated by whitespace or `;`; ValueError otherwise."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return out
        value, i = decoder.raw_decode(text, i)
        out.append(value)


def _mistral(body: str, names: set[str]) -> list[ToolCall]:
    body = body.strip()
    if body.startswith("["):
        values = _json_values(body)
        if len(values) != 1 or not isinstance(values[0], list):
            raise ValueError("expected one JSON list")
        return [_call(v, names) for v in values[0]]
    calls = []
    for part in body.split("[TOOL_CALLS]"):  # v11+: name[ARGS]{...}, one marker per call
        name, sep, args = part.partition("[ARGS]")
        if not sep:
            raise ValueError("expected name[ARGS]{...}")
        calls.append(_call({"name": name.strip(), "arguments": _json_values(args)[0]}, names))
    return calls


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) from a whole answer; calls only to functions in `names`."""
    try:
        if "<tool_call>" in text:
            head = text[: text.index("<tool_call>")]
            calls = [_call(json.loads(body), names) for body in _HERMES.findall(text)]
            return head.strip(), calls
        if "[TOOL_CALLS]" in text:
            head, _, body = text.partition("[TOOL_CALLS]")
            return head.strip(), _mistral(body, names)
        stripped = text.strip()
        if stripped.startswith("<|python_tag|>"):
            stripped = stripped[len("<|python_tag|>") :]
        if stripped.startswith("{"):
            return "", [_call(v, names) for v in _json_values(stripped)]
    except (ValueError, TypeError):
        pass
    return text, []


def constrained_calls(text: str, named: str | None) -> list[ToolCall]:
    """The calls in an answer generated under a tool grammar: for a named function the answer is
    its arguments object; for `required`, a list of {"name", "arguments"} objects. Empty when the
    answer did not complete (it ran out of tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if named is not None:
        return [ToolCall(named, json.dumps(value, ensure_ascii=False))] if isinstance(value, dict) else []
    if not isinstance(value, list):
        return []
    return [ToolCall(v["name"], json.dumps(v["arguments"], ensure_ascii=False)) for v in value]


class ToolStream:
    """One choice's streamed text, split into content to show now and a held-back tail that may
    be a tool call; `finish()` parses the tail. With `hold_all` (a tool grammar) everything is
    held, as the whole answer is the call."""

    def __init__(self, names: set[str], hold_all: bool = False) -> None:
        self.names = names
        self.hold_all = hold_all
        self.pending = ""  # not yet shown: may be the start of a marker, or a call
        self.holding = hold_all
        self.shown = ""  # content already passed on

    def feed(self, text: str) -> str:
        """Add text; return the part that is certainly content."""
        self.pending += text
        if self.holding:
            return ""
        starts = [self.pending.find(m) for m in MARKERS if m in self.pending]
        if starts or (not self.shown.strip() and self.pending.lstrip().startswith("{")):
            cut = min(starts) if starts else 0
            return self._show(cut, hold=True)
        if not self.shown.strip() and not self.pending.strip():
            return ""  # leading whitespace: a Llama JSON call may follow
        keep = max((n for m in MARKERS for n in range(1, len(m)) if self.pending.endswith(m[:n])), default=0)
        return self._show(len(self.pending) - keep, hold=False)

    def _show(self, cut: int, hold: bool) -> str:
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.shown += out
        self.holding = hold
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest of the content and the calls, once the answer is complete."""
        rest, self.pending = self.pending, ""
        if not self.holding:
            return rest, []
        content, calls = parse_tool_calls(rest, self.names)
        return (content, calls) if calls else (rest, [])
