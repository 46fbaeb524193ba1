"""Structured output for a request: `response_format`, tool calling, and answers as `tool_calls`.

`plan_request(llm, req)` checks and compiles, before anything is queued (a bad schema, a bad
tool, a `tool_choice` naming a missing function: a 400 naming the field), and returns a
`Plan`: the tools the chat template sees, the grammar the answer follows and how the answer is
read back.

- `response_format` `json_object` / `json_schema`: the answer is JSON (valid against the schema),
  by grammar-constrained decoding (weightsmith/grammar.py); `strict` false is constrained too.
- `tools` with `tool_choice` `auto` (the default): the tools go to the checkpoint's chat template
  (its `tools` variable) and the answer is parsed for calls in the model's own format
  (tool_parser.py). `none`: the tools are not shown and nothing is parsed. `required`: the answer
  is forced to a JSON list of {"name", "arguments"} calls (one when `parallel_tool_calls` is
  false), valid against each function's parameters; a named function: the answer is forced to
  that function's arguments. Either way the call always parses.
- A template that does not read `tools` gets `FALLBACK_PROMPT` as (the start of) its system
  message, describing the tools and the Hermes `<tool_call>` format the parser reads; earlier
  tool calls and `tool` messages are written in that format into plain turns.

Not here: the formats' parsers (tool_parser.py), sampling under a grammar (sampling.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from weightsmith.grammar import Grammar, GrammarError
from weightsmith.harmony import HarmonyReader, Parts, call_arguments, is_harmony
from weightsmith.llm import LLM
from weightsmith.serve.schemas import ApiError, ChatRequest, Message, NamedToolChoice, SamplingFields, ToolDef
from weightsmith.serve.tool_parser import MARKERS, ToolCall, ToolStream, constrained_calls
from weightsmith.tokenizer import Tokenizer

#: The system text that describes tools to a model whose chat template cannot (Hermes' format).
FALLBACK_PROMPT = (
    "You may call one or more functions to answer. These are the functions, as JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one block per call, each holding a JSON object with the "
    "function's name and its arguments:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>'
)


@dataclass
class Plan:
    """How one request's answer is shaped and read."""

    grammar: Grammar | None = None
    tools: list[dict[str, Any]] | None = None  # for the template; None: tools are not shown
    names: set[str] = field(default_factory=set)
    named: str | None = None  # tool_choice naming a function
    native: bool = True  # the template reads `tools` itself

    def output(self, tokenizer: Tokenizer, n: int) -> ToolOutput | HarmonyOutput | None:
        """The reader of the answers' tool calls (None when the answer is not read for calls); a
        harmony model's (gpt-oss) answers are always read, for their reasoning."""
        if is_harmony(tokenizer) and self.grammar is None:  # a grammar forces the answer's shape
            return HarmonyOutput(self, tokenizer, n)
        return ToolOutput(self, tokenizer, n) if self.tools is not None else None


def plan_request(llm: LLM, req: SamplingFields) -> Plan:
    """Check and compile `response_format` and (chat) `tools`/`tool_choice`; 400 naming the field."""
    plan = Plan(grammar=_response_grammar(llm, req))
    if not isinstance(req, ChatRequest):
        return plan
    choice = req.tool_choice
    if req.tools is None:
        if choice not in (None, "none"):
            raise ApiError(
                400, "tool_choice needs tools; send tools or drop tool_choice", param="tool_choice"
            )
        return plan
    grammars = _tool_grammars(llm, req.tools)
    plan.names = {t.function.name for t in req.tools}
    if choice == "none":
        return plan
    if plan.grammar is not None and choice is not None:
        raise ApiError(400, "response_format cannot be combined with a tool_choice other than 'none'",
                       param="response_format")  # fmt: skip
    if plan.grammar is not None:  # tools offered with the default choice and a response_format
        raise ApiError(400, "response_format with tools needs tool_choice 'none'", param="response_format")
    plan.tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools]
    plan.native = "tools" in (llm.tokenizer.chat_template or "")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in grammars:
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not in tools "
                           f"({', '.join(sorted(plan.names))})", param="tool_choice")  # fmt: skip
        plan.named, plan.grammar = choice.function.name, grammars[choice.function.name]
    elif choice == "required":
        plan.grammar = _required_grammar(llm, req.tools, req.parallel_tool_calls is not False)
    return plan


def _response_grammar(llm: LLM, req: SamplingFields) -> Grammar | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return llm.engine.grammars.json_object()
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format.json_schema.schema")  # fmt: skip
        return llm.engine.json_schema(fmt.json_schema.schema_)
    except GrammarError as e:
        raise ApiError(
            400, str(e), param="response_format.json_schema.schema", code="invalid_schema"
        ) from None


def _parameters(tool: ToolDef) -> dict[str, Any]:
    params = tool.function.parameters
    return params if params is not None else {"type": "object", "properties": {}}


def _tool_grammars(llm: LLM, tools: list[ToolDef]) -> dict[str, Grammar]:
    """Each function's arguments grammar (so a bad parameters schema is a 400 whatever the choice)."""
    if not tools:
        raise ApiError(400, "tools must not be empty; drop it or give at least one function", param="tools")
    out: dict[str, Grammar] = {}
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in out:
            raise ApiError(400, f"two tools are named {name!r}; function names must be unique",
                           param=f"tools[{i}].function.name")  # fmt: skip
        try:
            out[name] = llm.engine.grammars.json_schema(_parameters(tool), f"the parameters of {name!r}")
        except GrammarError as e:
            raise ApiError(
                400, str(e), param=f"tools[{i}].function.parameters", code="invalid_schema"
            ) from None
    return out


def _required_grammar(llm: LLM, tools: list[ToolDef], parallel: bool) -> Grammar:
    """A JSON list of calls, each {"name": one of the functions, "arguments": valid for it}."""
    calls = [
        {"type": "object", "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]  # fmt: skip
    schema = {
        "type": "array",
        "items": {"anyOf": calls},
        "minItems": 1,
        **({} if parallel else {"maxItems": 1}),
    }
    try:
        return llm.engine.grammars.json_schema(schema, "the required tool calls")
    except GrammarError as e:
        raise ApiError(400, str(e), param="tools", code="invalid_schema") from None


# ---- the conversation -----------------------------------------------------------------------


def chat_messages(messages: list[Message], plan: Plan | None = None) -> list[dict[str, Any]]:
    """The request's messages for the chat template: `developer` as `system`; an assistant's
    calls with their arguments as objects (what templates index); with a template that does not
    read tools, calls and tool results written into plain turns and the tools described in the
    system message (FALLBACK_PROMPT)."""
    native = plan is None or plan.native
    out = [_message(i, m, native) for i, m in enumerate(messages)]
    if plan is not None and plan.tools is not None and not plan.native:
        described = FALLBACK_PROMPT.format(
            tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools)
        )
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": described + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _message(i: int, m: Message, native: bool) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    if m.content is None and not (m.role == "assistant" and m.tool_calls):
        raise ApiError(400, f"messages[{i}] has no content", param=f"messages[{i}].content")
    out: dict[str, Any] = {"role": role, "content": m.text()}
    calls = []
    for j, call in enumerate(m.tool_calls or []):
        try:
            args = json.loads(call.function.arguments)
        except ValueError:
            raise ApiError(400, "tool call arguments must be JSON text",
                           param=f"messages[{i}].tool_calls[{j}].function.arguments") from None  # fmt: skip
        calls.append(
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}
        )
    if not native:
        if role == "tool":
            return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
        blocks = [
            json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
            for c in calls
        ]
        out["content"] += "".join(f"\n<tool_call>\n{b}\n</tool_call>" for b in blocks)
        return out
    if calls:
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def message_chars(messages: list[dict[str, Any]], plan: Plan | None) -> int:
    """Characters of prompt text in the conversation and its tools (--max-prompt-chars)."""
    text = sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""))) for m in messages)
    return text + (len(json.dumps(plan.tools)) if plan is not None and plan.tools else 0)


# ---- the answer -----------------------------------------------------------------------------


class ToolOutput:
    """Reads each choice's answer for tool calls as its text arrives (serve/jobs.py calls it):
    content is passed on while it cannot be a call; at the end, the held text becomes calls
    (finish reason "tool_calls") or, when it holds none, content after all."""

    def __init__(self, plan: Plan, tokenizer: Tokenizer, n: int) -> None:
        self.plan = plan
        constrained = plan.grammar is not None
        self.streams = [ToolStream(plan.names, hold_all=constrained) for _ in range(n)]
        # A marker that is a special token (Mistral's [TOOL_CALLS]) is not in the shown text.
        self.specials: dict[int, str] = {}
        for marker in MARKERS:
            token = tokenizer.token_to_id(marker)
            if token is not None and tokenizer.decode([token], skip_special_tokens=True) == "":
                self.specials[token] = marker

    def feed(self, index: int, text: str, tokens: list[int]) -> str:
        marker = "".join(self.specials.get(t, "") for t in tokens)
        return self.streams[index].feed(marker + text)

    def finish(self, index: int, reason: str) -> tuple[str, list[dict[str, Any]], str]:
        """(the rest of the content, the calls as OpenAI dicts, the finish reason)."""
        stream = self.streams[index]
        if self.plan.grammar is not None:
            text, stream.pending = stream.pending, ""
            calls = constrained_calls(text, self.plan.named)
        else:
            text, calls = stream.finish()
        if not calls:
            return text, [], reason
        return text if self.plan.grammar is None else "", [c.to_openai() for c in calls], "tool_calls"


class HarmonyOutput:
    """gpt-oss's answers (harmony.py): the analysis channel as reasoning, the final one as content,
    messages to `functions.NAME` as calls of the offered functions (a call to another name, or
    when no tools were offered, stays out of the answer, as the model addressed a tool it lacks)."""

    def __init__(self, plan: Plan, tokenizer: Tokenizer, n: int) -> None:
        self.names = plan.names
        self.readers = [HarmonyReader(tokenizer) for _ in range(n)]
        self.reasoning = [""] * n  # what the last feed added to each choice's reasoning
        self.calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    def feed(self, index: int, text: str, tokens: list[int]) -> str:
        """The content `tokens` add (the text decoded without markers is not used)."""
        parts = self.readers[index].feed(tokens)
        return self._take(index, parts)

    def finish(self, index: int, reason: str) -> tuple[str, list[dict[str, Any]], str]:
        """(the rest of the content, the calls as OpenAI dicts, the finish reason); the rest of
        the reasoning is in `reasoning[index]`."""
        content = self._take(index, self.readers[index].finish(ended=reason == "stop"))
        calls = self.calls[index]
        return content, calls, "tool_calls" if calls else reason

    def _take(self, index: int, parts: Parts) -> str:
        self.reasoning[index] = parts.reasoning
        for call in parts.calls:
            if call.name in self.names:
                self.calls[index].append(ToolCall(call.name, call_arguments(call.arguments)).to_openai())
        return parts.content
