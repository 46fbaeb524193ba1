"""Structured output and tool calling in the server, driven by the official `openai` client.

On a tiny random Llama whose chat template renders tools (Hermes style, as Qwen's does):
`response_format` json_object / json_schema answers parse and validate, streamed and not;
`tools` with `tool_choice` required or named always yield calls whose arguments validate
against the function's parameters (greedy and sampled, streamed as deltas and not); a whole
round trip with an assistant call and a `tool` message; `tool_choice` auto reads the model's own
text (a random model answers in prose: content, no calls); the tools and tool messages reach the
template (seen through /tokenize); a template without tool support gets the fallback prompt.
`logit_bias` and `max_completion_tokens` change the answer. Every bad field is a 400 naming it
(`param`), never a 500; an unknown field is logged once. The parsers of the models' own formats
are in test_tool_parser.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_hf_dir

from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict
from weightsmith.serve.structured import FALLBACK_PROMPT

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

#: A Hermes-style template (the shape of Qwen 2.5's): tools in the system turn, calls in
#: <tool_call> blocks, tool results as <tool_response> in a user turn.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n"
    "{% endif %}# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    'Call a function with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}{% if m['role'] == 'system' %}"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] is defined %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"],
    "additionalProperties": False,
}  # fmt: skip


def _serve(model_dir: Path, name: str):
    cfg = config_from_dict(
        ServeConfig, {"model": str(model_dir), "served_name": name, "port": 0, "max_batch": 8}
    )
    return start_server(cfg)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """The tiny model with room for tools in the prompt (a 300-token vocabulary spells JSON
    almost a byte a token); its template knows nothing of tools."""
    return build_tiny_hf_dir(tmp_path_factory.mktemp("tools") / "tiny-plain", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(plain_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "tiny-tools"
    shutil.copytree(plain_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    running = _serve(path, "tiny")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def valid(value, schema) -> bool:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def check_calls(calls, names=("get_weather", "get_time")) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        args = json.loads(call.function.arguments)
        assert valid(args, SCHEMAS[call.function.name]), call.function.arguments
        out.append((call.function.name, args))
    return out


def streamed(client, **kwargs):
    """(content, calls as (name, arguments text), finish reason) from a stream, assembled as
    an agent framework does: tool-call deltas concatenated by their index."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


# ---- response_format -----------------------------------------------------------------------------


def test_json_schema_response_format_streamed_and_not(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(
        model="tiny", messages=USER, response_format=fmt, temperature=0, max_tokens=300
    )
    assert r.choices[0].finish_reason == "stop" and valid(json.loads(r.choices[0].message.content), PERSON)
    content, calls, finish = streamed(client, model="tiny", messages=USER, response_format=fmt, temperature=0,
                                      max_tokens=300)  # fmt: skip
    assert content == r.choices[0].message.content and not calls and finish == "stop"
    for seed in range(2):
        r = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, temperature=1.0,
                                           seed=seed, max_tokens=300, n=2)  # fmt: skip
        assert all(valid(json.loads(c.message.content), PERSON) for c in r.choices)


def test_json_object_response_format_and_completions_extension(client, server) -> None:
    # Any object: keys and values are unbounded, so a random model may run out of tokens; the
    # answers that end are objects, and with these seeds some end.
    ended = 0
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=USER, response_format={"type": "json_object"},
                                           temperature=1.0, seed=seed, max_tokens=150)  # fmt: skip
        if r.choices[0].finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:
            assert r.choices[0].message.content.startswith("{")
    assert ended
    body = {"model": "tiny", "prompt": "Hello", "temperature": 0, "max_tokens": 300,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}  # fmt: skip
    text = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert valid(json.loads(text), PERSON)


# ---- tools -----------------------------------------------------------------------------------------


def test_required_tool_choice_yields_valid_calls_streamed_and_not(client) -> None:
    kwargs = dict(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=400
    )
    r = client.chat.completions.create(parallel_tool_calls=False, **kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(check_calls(choice.message.tool_calls)) == 1
    content, calls, finish = streamed(client, parallel_tool_calls=False, **kwargs)
    assert finish == "tool_calls" and content == ""
    expected = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls] == expected and all(c["id"] for c in calls)
    for seed in range(3):  # sampled: every call is valid
        r = client.chat.completions.create(
            parallel_tool_calls=False, **{**kwargs, "temperature": 1.0, "seed": seed}
        )
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
        assert len(check_calls(r.choices[0].message.tool_calls)) == 1


def test_named_tool_choice_always_calls_that_function(client) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=named,
                                           temperature=1.0, seed=seed, max_tokens=200)  # fmt: skip
        calls = check_calls(r.choices[0].message.tool_calls)
        assert [name for name, _ in calls] == ["get_time"]
    content, calls, finish = streamed(client, model="tiny", messages=USER, tools=TOOLS, tool_choice=named,
                                      temperature=0, max_tokens=200)  # fmt: skip
    assert finish == "tool_calls" and [c["name"] for c in calls] == ["get_time"]
    assert valid(json.loads(calls[0]["arguments"]), TIME)


def test_auto_reads_the_models_text_and_none_hides_the_tools(client, server) -> None:
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=20)
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content  # a random model's prose
    content, calls, _ = streamed(
        client, model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=20
    )
    assert content == r.choices[0].message.content and not calls
    plain = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=20)
    hidden = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=20)  # fmt: skip
    assert hidden.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools were in the prompt


def test_round_trip_with_a_tool_message(client, server) -> None:
    first = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=400)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages = USER + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=10
    )
    assert second.choices[0].finish_reason in ("stop", "length")
    ids = httpx.post(server.url + "/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '"name": "get_weather"' in prompt and "# Tools" in prompt  # the tools, rendered by the template
    assert (
        f'<tool_call>\n{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}' in prompt
    )
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt
    assert second.usage.prompt_tokens == len(ids)


def test_template_without_tools_gets_the_fallback_prompt(plain_dir) -> None:
    running = _serve(plain_dir, "plain")
    try:
        body = {"messages": USER + [{"role": "tool", "tool_call_id": "c1", "content": "21"}], "tools": TOOLS}
        ids = httpx.post(running.url + "/tokenize", json=body).json()["tokens"]
        prompt = httpx.post(running.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
        assert FALLBACK_PROMPT.split("\n")[0] in prompt and '"get_time"' in prompt
        assert "<tool_response>\n21\n</tool_response>" in prompt
        chat = {"model": "plain", "messages": USER, "tools": TOOLS, "tool_choice": "required", "temperature": 0,
                "max_tokens": 400, "parallel_tool_calls": False}  # fmt: skip
        r = httpx.post(running.url + "/v1/chat/completions", json=chat, timeout=60).json()
        assert r["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        running.stop()


# ---- sampling fields ---------------------------------------------------------------------------


def test_logit_bias_and_max_completion_tokens(client, server) -> None:
    plain = client.chat.completions.create(
        model="tiny", messages=USER, temperature=0, max_completion_tokens=5
    )
    assert plain.usage.completion_tokens <= 5
    forced = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_completion_tokens=5,
                                            logit_bias={"65": 100})  # fmt: skip
    token = httpx.post(server.url + "/detokenize", json={"tokens": [65]}).json()["prompt"]
    assert forced.choices[0].message.content == token * 5 and forced.usage.completion_tokens == 5


# ---- bad input -------------------------------------------------------------------------------------

BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}, "then": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools[2].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 500}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                           "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
]  # fmt: skip


@pytest.mark.parametrize("extra, param", BAD, ids=[p for _, p in BAD])
def test_bad_fields_are_400_naming_the_param(server, extra, param) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 5, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_harmless_fields_are_accepted_and_unknown_ones_logged_once(server, caplog) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 2, "user": "u", "metadata": {"k": "v"}, "store": False,
            "modalities": ["text"], "service_tier": "auto", "some_new_field": 1}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="weightsmith.serve.schemas"):
        for _ in range(2):
            assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    logged = [r for r in caplog.records if "some_new_field" in r.getMessage()]
    assert len(logged) == 1 and "modalities" not in logged[0].getMessage()
