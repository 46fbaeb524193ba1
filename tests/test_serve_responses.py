"""OpenAI's Responses API (POST /v1/responses) on the tiny random Llama, driven by the official
`openai` client: answers equal the chat-completions answers to the same conversation at
temperature 0 (instructions as the system turn, function calls and their outputs as the
assistant's tool calls and tool turns), usage counts the same tokens, a cut answer is
`incomplete`, the stream's typed events are in order and add up (the client's own stream
accumulator builds the final response from them), tools and JSON schemas constrain as in
chat, and what is not implemented is a 400 naming the field. Stored responses: a request
naming `previous_response_id` answers as chat does to the whole conversation (its prompt cached
from the turn before), GET and DELETE, `store: false`, and a server that stores none.
"""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                          "additionalProperties": False}}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import build_tiny_hf_dir

    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict

    # context for the tools' fallback system prompt (the tiny template does not read tools)
    model = build_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "tiny", max_position_embeddings=1024)
    running = start_server(config_from_dict(ServeConfig, {"model": str(model), "served_name": "tiny",
                                                          "port": 0}))  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_answer(client, messages, **params):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **params)


def test_an_answer_equals_the_chat_answer_to_the_same_conversation(client):
    r = client.responses.create(model="tiny", instructions="Be brief.", input="Once upon a time",
                                max_output_tokens=24, temperature=0)  # fmt: skip
    c = chat_answer(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}],
                    max_completion_tokens=24)  # fmt: skip
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny" and r.store is True
    assert r.output_text == c.choices[0].message.content and r.output_text
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert (
        r.usage.input_tokens == c.usage.prompt_tokens and r.usage.output_tokens == c.usage.completion_tokens
    )
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    expected_status = "incomplete" if c.choices[0].finish_reason == "length" else "completed"
    assert r.status == expected_status
    if expected_status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_function_call_items_are_the_chat_tool_turns(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]  # fmt: skip
    r = client.responses.create(model="tiny", input=items, tools=[WEATHER], tool_choice="none",
                                max_output_tokens=16, temperature=0)  # fmt: skip
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]  # fmt: skip
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    c = chat_answer(client, messages, tools=tools, tool_choice="none", max_completion_tokens=16)
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens


def test_the_stream_adds_up_to_the_answer(client, server):
    plain = client.responses.create(
        model="tiny", input="Once upon a time", max_output_tokens=40, temperature=0
    )
    with client.responses.stream(
        model="tiny", input="Once upon a time", max_output_tokens=40, temperature=0
    ) as s:
        events = list(s)
        final = s.get_final_response() if events[-1].type == "response.completed" else None
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] == ("response.completed" if plain.status == "completed" else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text and kinds.count("response.output_text.delta") > 1
    last = events[-1].response
    assert last.id == events[0].response.id and last.usage.output_tokens == plain.usage.output_tokens
    if final is not None:
        assert final.output_text == plain.output_text
    cut = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "Once", "max_output_tokens": 2,
                                                         "stream": True}, timeout=60)  # fmt: skip
    lines = [json.loads(x[6:]) for x in cut.text.splitlines() if x.startswith("data: ")]
    kinds = [x[7:] for x in cut.text.splitlines() if x.startswith("event: ")]
    assert kinds == [line["type"] for line in lines]  # each event's name is its data's type
    # every object validates against the official client's own types (pydantic, not lenient)
    openai.types.responses.Response.model_validate(lines[-1]["response"])
    import pydantic

    events = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
    for line in lines:
        events.validate_python(line)
    whole = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "Once", "max_output_tokens": 4},
                       timeout=60).json()  # fmt: skip
    openai.types.responses.Response.model_validate(whole)
    assert lines[-1]["type"] == "response.incomplete"
    assert lines[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert lines[-1]["response"]["usage"]["output_tokens"] == 2


def test_a_required_tool_and_a_json_schema_constrain_the_answer(client):
    r = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                max_output_tokens=200, temperature=0)  # fmt: skip
    calls = [o for o in r.output if o.type == "function_call"]
    assert (
        calls and calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments)["city"], str)
    )
    assert calls[0].call_id and calls[0].id.startswith("fc_")
    with client.responses.stream(model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                 max_output_tokens=200, temperature=0) as s:  # fmt: skip
        kinds = [e.type for e in s]
        streamed = s.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert [(o.name, o.arguments) for o in streamed.output] == [(c.name, c.arguments) for c in calls]
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    j = client.responses.create(model="tiny", input="A number?", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}})  # fmt: skip
    assert isinstance(json.loads(j.output_text)["n"], int)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "no stored response 'resp_1'"),
        ({"conversation": "conv_1"}, "conversation", "conversations are not served"),
        ({"include": ["reasoning.encrypted_content"]}, "include", "include is not supported"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning settings are not supported"),
        ({"background": True}, "background", "background responses are not supported"),
        ({"input": []}, "input", "input must not be empty"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "invalid"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "needs a name and a schema"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "invalid"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({"model": "other"}, "model", "does not exist"),
    ],
)  # fmt: skip
def test_what_is_not_implemented_is_a_400_naming_the_field(server, body, param, message):
    r = httpx.post(server.url + "/v1/responses", json={"model": "tiny", "input": "hi", **body}, timeout=30)
    assert r.status_code == (
        404 if body.get("model") == "other" or "previous_response_id" in body else 400
    ), r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and message in error["message"], error


def test_a_stored_conversation_continues_by_previous_response_id(client):
    """Turn 2 names turn 1 instead of resending it: the answer is chat's to the whole
    conversation (turn 2's own instructions, not turn 1's), its prompt mostly cached."""
    first = client.responses.create(model="tiny", instructions="Be brief.", input="Where do owls sleep?",
                                    max_output_tokens=8, temperature=0)  # fmt: skip
    second = client.responses.create(model="tiny", instructions="Be kind.", input="And herons?",
                                     previous_response_id=first.id, max_output_tokens=8, temperature=0)  # fmt: skip
    c = chat_answer(client, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Where do owls sleep?"},
                             {"role": "assistant", "content": first.output_text},
                             {"role": "user", "content": "And herons?"}], max_completion_tokens=8)  # fmt: skip
    assert second.previous_response_id == first.id and second.output_text == c.choices[0].message.content
    assert second.usage.input_tokens == c.usage.prompt_tokens
    third = client.responses.create(model="tiny", instructions="Be kind.", input="And swans?", previous_response_id=second.id,
                                    max_output_tokens=4, temperature=0, stream=False)  # fmt: skip
    assert third.usage.input_tokens_details.cached_tokens >= 16  # turn 2 was prefilled and kept
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()


def test_function_call_outputs_continue_a_stored_call(client):
    tools = [WEATHER]
    asked = client.responses.create(model="tiny", input="Weather in Rome?", tools=tools, tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=200, temperature=0)  # fmt: skip
    (call,) = [o for o in asked.output if o.type == "function_call"]
    result = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    answer = client.responses.create(model="tiny", input=result, previous_response_id=asked.id, tools=tools,
                                     max_output_tokens=6, temperature=0)  # fmt: skip
    whole = [{"role": "user", "content": "Weather in Rome?"}, {"type": "function_call", "call_id": call.call_id,
             "name": call.name, "arguments": call.arguments}, *result]  # fmt: skip
    again = client.responses.create(
        model="tiny", input=whole, tools=tools, max_output_tokens=6, temperature=0, store=False
    )
    assert answer.output_text == again.output_text and again.store is False


def test_stored_responses_are_deleted_and_store_false_keeps_nothing(client, server):
    kept = client.responses.create(
        model="tiny", input="Hello", max_output_tokens=2, temperature=0, stream=True
    )
    final = [e for e in kept if e.type in ("response.completed", "response.incomplete")][-1].response
    assert final.store is True and client.responses.retrieve(final.id).output_text == final.output_text
    client.responses.delete(final.id)
    for path, how in ((f"/v1/responses/{final.id}", httpx.get), (f"/v1/responses/{final.id}", httpx.delete)):
        assert how(server.url + path, timeout=30).status_code == 404
    gone = httpx.post(server.url + "/v1/responses", timeout=30,
                      json={"model": "tiny", "input": "hi", "previous_response_id": final.id})  # fmt: skip
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "previous_response_id"
    unkept = client.responses.create(model="tiny", input="Hello", max_output_tokens=2, store=False)
    assert (
        unkept.store is False
        and httpx.get(f"{server.url}/v1/responses/{unkept.id}", timeout=30).status_code == 404
    )


def test_the_store_keeps_to_its_budget_oldest_first():
    from weightsmith.serve.response_store import ResponseStore

    store = ResponseStore(budget=1000)
    bodies = [{"id": f"resp_{i}", "pad": "x" * 300} for i in range(4)]
    for b in bodies:
        assert store.put(b, [{"role": "user", "content": "hi"}])
    assert list(store.items) == ["resp_2", "resp_3"] and store.size <= 1000
    assert not store.put({"id": "big", "pad": "x" * 2000}, []) and store.get("big") is None
