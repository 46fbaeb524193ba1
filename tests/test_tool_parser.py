"""Reading tool calls out of models' text (serve/tool_parser.py) in the formats the model families
are trained on (the examples follow each family's published chat-template documentation), whole
and streamed: however the text is cut into deltas, the streamed content plus the calls equal
the whole-text parse, and content is never held back when it cannot be a call."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsmith.serve.structured import Plan, ToolOutput
from weightsmith.serve.tool_parser import ToolStream, constrained_calls, parse_tool_calls

NAMES = {"get_weather", "get_time"}

CASES = [
    # Hermes / Qwen 2.5 / Qwen 3: blocks, content before them
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]),
    # the last block cut by the end token
    ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n', "", [("get_time", {"zone": "CET"})]),
    # Llama 3.1 / 3.2 JSON, with and without <|python_tag|>, several separated by ';'
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', "", [("get_time", {"zone": "UTC"})]),
    ('{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Rome"}}',
     "", [("get_time", {}), ("get_weather", {"city": "Rome"})]),
    # Mistral v3 and v11+
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}, {"name": "get_time", "arguments": {}}]',
     "", [("get_weather", {"city": "Lyon"}), ("get_time", {})]),
    ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}', "Sure.", [("get_weather", {"city": "Nice"})]),
    # arguments given as JSON text
    ('<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>', "",
     [("get_time", {"zone": "UTC"})]),
]  # fmt: skip

NOT_CALLS = [
    "The weather is fine.",
    '{"name": "rm_rf", "parameters": {}}',  # a function the request did not offer
    "<tool_call>\n{not json}\n</tool_call>",
    '{"answer": 42}',
    "[TOOL_CALLS]nonsense",
    "Use <tool_call> tags to call tools.",
]


@pytest.mark.parametrize("text, content, calls", CASES)
def test_formats(text, content, calls) -> None:
    got_content, got = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("text", NOT_CALLS)
def test_text_without_a_valid_call_stays_content(text) -> None:
    assert parse_tool_calls(text, NAMES) == (text, [])


def stream(text: str, cuts: list[int]) -> tuple[str, list, list[str]]:
    s = ToolStream(NAMES)
    pieces, shown, start = [], "", 0
    for cut in sorted(set(cuts)) + [len(text)]:
        out = s.feed(text[start:cut])
        pieces.append(out)
        shown += out
        start = max(start, cut)
    rest, calls = s.finish()
    return shown + rest, calls, pieces


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from([c[0] for c in CASES] + NOT_CALLS), st.lists(st.integers(0, 200), max_size=12))
def test_streaming_equals_the_whole_parse(text, cuts) -> None:
    content, calls = parse_tool_calls(text, NAMES)
    got_content, got_calls, _ = stream(text, [c for c in cuts if c <= len(text)])
    assert [(c.name, c.arguments) for c in got_calls] == [(c.name, c.arguments) for c in calls]
    if calls:
        assert got_content.strip() == content
    else:
        assert got_content == text


def test_plain_prose_streams_without_being_held() -> None:
    words = "The weather in Paris is mild today and tomorrow".split(" ")
    _, _, pieces = stream(" ".join(words), [sum(len(w) + 1 for w in words[:i]) for i in range(1, len(words))])
    assert all(pieces[:-1])  # every delta but the last carried text at once


def test_constrained_shapes() -> None:
    calls = constrained_calls('[{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", '
                              '"arguments": {"city": "Oslo"}}]', None)  # fmt: skip
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"}),
                                                                   ("get_weather", {"city": "Oslo"})]  # fmt: skip
    assert [(c.name, c.arguments) for c in constrained_calls('{"zone": "CET"}', "get_time")] == [
        ("get_time", '{"zone": "CET"}')
    ]
    assert constrained_calls('{"zone": "CE', "get_time") == []  # ran out of tokens: no call


class SpecialMarkerTokenizer:
    """A tokenizer whose [TOOL_CALLS] is a special token (dropped from shown text), as Mistral's."""

    def token_to_id(self, token: str):
        return 7 if token == "[TOOL_CALLS]" else None

    def decode(self, ids, skip_special_tokens=False):
        return "" if skip_special_tokens else "[TOOL_CALLS]"


def test_a_special_marker_token_is_seen_though_it_is_not_shown() -> None:
    out = ToolOutput(Plan(tools=[{}], names=NAMES), SpecialMarkerTokenizer(), n=1)  # type: ignore[arg-type]
    assert out.feed(0, "", [7]) == ""
    assert out.feed(0, '[{"name": "get_time", "arguments": {}}]', [8]) == ""
    rest, calls, reason = out.finish(0, "stop")
    assert rest == "" and reason == "tool_calls" and calls[0]["function"]["name"] == "get_time"
