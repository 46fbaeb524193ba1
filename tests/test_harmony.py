"""gpt-oss's answers (the harmony format, harmony.py) read into reasoning, content and calls: whole
and token by token, with the end token fed or not, calls in both header forms, text that breaks
the format, and the server's chat response and stream built from them."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_tokenizer_dir
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from weightsmith.harmony import MARKERS, HarmonyReader, is_harmony
from weightsmith.serve.responses import ChoiceResult, ResponseBuilder
from weightsmith.serve.scheduler import SequenceEvent
from weightsmith.serve.structured import HarmonyOutput, Plan, ToolOutput
from weightsmith.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """The tiny byte-level tokenizer with harmony's markers as special tokens."""
    path = tmp_path_factory.mktemp("harmony")
    build_tiny_tokenizer_dir(path)
    backend = Backend.from_file(str(path / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(m, special=True) for m in MARKERS])
    backend.save(str(path / "tokenizer.json"))
    return Tokenizer.from_dir(path)


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


ANSWER = (
    "<|channel|>analysis<|message|>The user greets; answer in Köln style 🙂.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Grüße aus Köln! 你好<|return|>"
)
CALL_IN_ROLE = (
    "<|channel|>analysis<|message|>Need the weather.<|end|>"
    '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
)
CALL_IN_CHANNEL = (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>'
)


def _read(tok: Tokenizer, text: str, *, one_by_one: bool, drop_last: bool = False):
    ids = _ids(tok, text)
    if drop_last:  # the end token is a stop token: the scheduler may not hand it over
        ids = ids[:-1]
    reader = HarmonyReader(tok)
    parts = [reader.feed([t]) for t in ids] if one_by_one else [reader.feed(ids)]
    parts.append(reader.finish(ended=True))
    reasoning = "".join(p.reasoning for p in parts)
    content = "".join(p.content for p in parts)
    calls = [(c.name, json.loads(c.arguments)) for p in parts for c in p.calls]
    return reasoning, content, calls


def test_the_tokenizer_is_harmonys(tok) -> None:
    assert is_harmony(tok)


@pytest.mark.parametrize("one_by_one", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_reasoning_and_answer_apart(tok, one_by_one, drop_last) -> None:
    got = _read(tok, ANSWER, one_by_one=one_by_one, drop_last=drop_last)
    assert got == ("The user greets; answer in Köln style 🙂.", "Grüße aus Köln! 你好", [])


@pytest.mark.parametrize("text, city", [(CALL_IN_ROLE, "Paris"), (CALL_IN_CHANNEL, "Oslo")])
@pytest.mark.parametrize("drop_last", [False, True])
def test_calls_in_either_header(tok, text, city, drop_last) -> None:
    reasoning, content, calls = _read(tok, text, one_by_one=True, drop_last=drop_last)
    assert content == "" and calls == [("get_weather", {"city": city})]
    assert reasoning == ("Need the weather." if text == CALL_IN_ROLE else "")


def test_a_call_cut_short_is_not_made(tok) -> None:
    reader = HarmonyReader(tok)
    parts = reader.feed(_ids(tok, CALL_IN_CHANNEL)[:-4])
    assert not parts.calls and not reader.finish(ended=False).calls


def test_text_outside_the_format_is_content(tok) -> None:
    assert _read(tok, "Plain text, no markers.", one_by_one=True) == ("", "Plain text, no markers.", [])


def _output(tok: Tokenizer, names: set[str]) -> HarmonyOutput:
    out = Plan(tools=[{}] if names else None, names=names).output(tok, 1)
    assert isinstance(out, HarmonyOutput)
    return out


def test_the_chat_response_carries_reasoning_and_offered_calls_only(tok) -> None:
    """A whole response: reasoning_content beside content; a call to a function the request did
    not offer is not made (finish reason stays "stop")."""
    builder = ResponseBuilder(tok, "m", chat=True)
    for names, reason in (({"get_weather"}, "tool_calls"), ({"get_time"}, "stop")):
        out = _output(tok, names)
        result = ChoiceResult()
        ids = _ids(tok, CALL_IN_ROLE)[:-1]
        result.text = out.feed(0, "", ids)
        result.reasoning = out.reasoning[0]
        rest, result.tool_calls, result.finish_reason = out.finish(0, "stop")
        message = builder.response([result], 3, False)["choices"][0]["message"]
        assert message["reasoning_content"] == "Need the weather." and result.finish_reason == reason
        if names == {"get_weather"}:
            call = message["tool_calls"][0]["function"]
            assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
        else:
            assert "tool_calls" not in message and message["content"] == ""


def test_the_stream_sends_reasoning_then_content(tok) -> None:
    from weightsmith.serve.jobs import Job

    job = Job.__new__(Job)  # the stream's chunking only; no scheduler
    job.tools = _output(tok, set())
    builder = ResponseBuilder(tok, "m", chat=True)
    ids = _ids(tok, ANSWER)
    chunks = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        ev = SequenceEvent(0, "", [t], finish_reason="stop" if last else None, completion_tokens=len(ids))
        chunks += job._chunks(builder, ev)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert reasoning == "The user greets; answer in Köln style 🙂." and content == "Grüße aus Köln! 你好"
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_other_tokenizers_keep_the_tool_reader(tmp_path) -> None:
    build_tiny_tokenizer_dir(tmp_path)
    plain = Tokenizer.from_dir(tmp_path)
    assert not is_harmony(plain)
    assert isinstance(Plan(tools=[{}], names={"f"}).output(plain, 1), ToolOutput)
    assert Plan().output(plain, 1) is None


def test_the_engine_keeps_the_final_answer_as_text_and_ends_at_return_or_call(tok) -> None:
    """`LLM.chat`, `generate` and every command built on the engine see gpt-oss's final answer as
    the text (its analysis as `reasoning`), and its answers end at <|return|> or <|call|>."""
    import torch

    from weightsmith.engine import Answers, Engine
    from weightsmith.models import CausalLM, ModelConfig

    ids = _ids(tok, ANSWER)
    answer = Answers(tok)
    pieces = [answer.read(t, "stop" if i == len(ids) - 1 else None) for i, t in enumerate(ids)]
    assert "".join(c for c, _ in pieces) == answer.content == "Grüße aus Köln! 你好"
    assert "".join(r for _, r in pieces) == answer.reasoning == "The user greets; answer in Köln style 🙂."
    shape = dict(vocab_size=tok.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    cfg = ModelConfig.from_hf({"model_type": "llama", "num_attention_heads": 2, **shape})
    with torch.device("meta"):
        model = CausalLM(cfg)
    engine = Engine(model, tok, cpu_decode=False)
    assert engine.harmony
    assert {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")} <= engine.eos_token_ids


def test_a_whole_response_collects_reasoning_content_and_calls(tok) -> None:
    """The non-streamed path (`Job._add`, event by event) gathers what the stream sends."""
    from weightsmith.serve.jobs import Job

    job = Job.__new__(Job)
    job.tools = _output(tok, {"get_weather"})
    result = ChoiceResult()
    ids = _ids(tok, CALL_IN_ROLE)
    for i in range(0, len(ids), 3):  # several tokens an event
        last = i + 3 >= len(ids)
        job._add(result, SequenceEvent(0, "", ids[i : i + 3], finish_reason="stop" if last else None))
    message = ResponseBuilder(tok, "m", chat=True).response([result], 1, False)["choices"][0]["message"]
    assert message["reasoning_content"] == "Need the weather." and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert result.finish_reason == "tool_calls"


def test_chat_shows_the_thoughts_apart_and_keeps_only_the_answer() -> None:
    """`weightsmith chat` with a reasoning model: the thoughts first (marked), then the answer; the
    history keeps the answer alone (gpt-oss's template drops earlier turns' analysis anyway)."""
    import io
    from types import SimpleNamespace

    from weightsmith.cli.run import _Thoughts
    from weightsmith.commands.run import ChatSession
    from weightsmith.engine import Delta
    from weightsmith.sampling import SamplingParams

    deltas = [
        Delta("", reasoning="Greet "),
        Delta("", reasoning="back."),
        Delta("Hel"),
        Delta("lo!", 0, "stop"),
    ]
    engine = SimpleNamespace(stream=lambda ids, sp: iter(deltas), context_length=64, encode_prompt=list)
    tokenizer = SimpleNamespace(apply_chat_template=lambda messages, **kw: [1, 2, 3])
    llm = SimpleNamespace(engine=engine, tokenizer=tokenizer, sampling_params=lambda **kw: SamplingParams())
    session = ChatSession(llm, {})
    out = io.StringIO()
    session.reply("hi", out.write, _Thoughts(out, interactive=False))
    assert out.getvalue() == "[thinking] Greet back.\n[answer] Hello!"
    assert session.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]


def test_the_responses_api_streams_the_reasoning_item_before_the_message(tok) -> None:
    """/v1/responses: gpt-oss's analysis is a `reasoning` item (output 0) streamed as
    reasoning_text deltas, then the answer is the message (output 1); the final response lists
    them in that order and is a valid Response for the official client's types."""
    import asyncio

    openai = pytest.importorskip("openai")
    from weightsmith.serve.jobs import Job
    from weightsmith.serve.response_route import Shape, _events
    from weightsmith.serve.response_schemas import ResponsesRequest

    async def run() -> list[dict]:
        job = Job.__new__(Job)  # the stream's events only; no scheduler
        job.tools, job.events, job.prompt_tokens, job.request = _output(tok, set()), asyncio.Queue(), 5, None
        ids = _ids(tok, ANSWER)
        for i, t in enumerate(ids):
            last = i == len(ids) - 1
            job.events.put_nowait(SequenceEvent(0, "", [t], finish_reason="stop" if last else None,
                                                completion_tokens=len(ids)))  # fmt: skip
        shape = Shape(ResponsesRequest(model="m", input="hi"))
        return [json.loads(chunk.split("data: ", 1)[1]) async for chunk in _events(job, shape)]

    events = asyncio.run(run())
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    thought = [e for e in events if e["type"] == "response.reasoning_text.delta"]
    said = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(e["delta"] for e in thought) == "The user greets; answer in Köln style 🙂."
    assert "".join(e["delta"] for e in said) == "Grüße aus Köln! 你好"
    assert events.index(thought[-1]) < events.index(said[0])
    assert {e["output_index"] for e in thought} == {0} and {e["output_index"] for e in said} == {1}
    final = events[-1]
    assert final["type"] == "response.completed"
    import pydantic

    for e in events:  # each event is one of the official client's stream event types
        pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent).validate_python(e)
    response = openai.types.responses.Response.model_validate(final["response"])
    assert [o.type for o in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "The user greets; answer in Köln style 🙂."
    assert response.output_text == "Grüße aus Köln! 你好"
