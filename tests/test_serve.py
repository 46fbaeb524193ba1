"""The OpenAI-compatible server, driven on loopback by the official `openai` client.

What is checked, on a tiny random Llama served with two LoRA adapters: responses and
stream chunks have OpenAI's shape and order; streamed text equals non-streamed text and
the engine's text at temperature 0; n, stop, seed, logprobs (against the model's own
log-softmax), usage (against the tokenizer) and include_usage; an adapter picked by model
name answers like that adapter merged offline; 16 concurrent streams equal sequential runs
and really share batches; a client that disconnects frees its row (seen in /metrics); the
text completions, tokenize and detokenize endpoints; shutdown lets a running stream finish.
Bad input, auth, the queue limit and loading are in test_serve_errors.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import weightsmith
from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict
from weightsmith.lora import LoraConfig, apply_lora, lora_layers, save_adapter

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

USER = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def adapters(tiny_hf_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two adapters with non-zero weights, saved as PEFT directories: a LoRA one and a DoRA one."""
    model = weightsmith.load(tiny_hf_dir).model
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        cfg = LoraConfig(r=4, alpha=8, use_dora=name == "b")
        apply_lora(model, cfg, name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.3)
                if name in layer.lora_magnitude_vector:
                    m = layer.lora_magnitude_vector[name].weight
                    m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))
        out[name] = save_adapter(model, tmp_path_factory.mktemp("adapters") / name, cfg, name=name)
    return out


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path, adapters):
    cfg = config_from_dict(
        ServeConfig,
        {
            "model": str(tiny_hf_dir),
            "served_name": "tiny",
            "port": 0,
            "adapter": [f"{n}={d}" for n, d in adapters.items()],
            "max_batch": 16,
        },
    )
    running = start_server(cfg)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path):
    return weightsmith.load(tiny_hf_dir)


def offline(llm, messages, **params) -> weightsmith.engine.Completion:
    ids = llm.engine.chat_prompt(messages)
    return llm.engine.generate([ids], llm.sampling_params(**params))[0]


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- shapes and equalities -----------------------------------------------------------------


def test_chat_completion_shape_and_text_equal_the_engine(client, llm) -> None:
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    assert abs(r.created - time.time()) < 60
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    want = offline(llm, USER, max_tokens=12, temperature=0)
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    prompt = llm.tokenizer.apply_chat_template(USER, tokenize=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_chunks_come_in_openais_order_and_equal_the_whole_text(client) -> None:
    kw = dict(model="tiny", messages=USER, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in [first, *middle])
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish.choices[0].delta.content is None and finish.usage is None
    got, want = usage.usage.model_dump(), whole.usage.model_dump()
    assert usage.choices == [] and got.pop("completion_tokens_details") is None
    # the same prompt ran just before: all of it but the last token is copied from the kept row
    assert got.pop("prompt_tokens_details")["cached_tokens"] == got["prompt_tokens"] - 1
    assert got == {k: want[k] for k in got}
    assert "".join(c.choices[0].delta.content or "" for c in middle) == whole.choices[0].message.content


def test_raw_stream_ends_with_done_and_has_no_usage_without_include_usage(server) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    parsed = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in p for p in parsed) and parsed[-1]["choices"][0]["finish_reason"] == "length"


def test_n_two_with_seed_is_reproducible_and_choices_differ(client) -> None:
    kw = dict(model="tiny", messages=USER, max_tokens=10, temperature=1.0, n=2, seed=5)
    one = client.chat.completions.create(**kw)
    two = client.chat.completions.create(**kw)
    texts = [c.message.content for c in one.choices]
    assert [c.index for c in one.choices] == [0, 1]
    assert texts == [c.message.content for c in two.choices]
    assert texts[0] != texts[1]
    other = client.chat.completions.create(**(kw | {"seed": 6}))
    assert [c.message.content for c in other.choices] != texts
    # Streamed n=2: each choice's chunks rebuild that choice.
    parts = ["", ""]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
    assert parts == texts
    usage = one.usage
    assert usage.completion_tokens == 20  # 2 choices x max_tokens, with no end token in 10 draws here
    assert usage.prompt_tokens == client.chat.completions.create(**(kw | {"n": 1})).usage.prompt_tokens


def test_stop_string_cuts_the_text(client) -> None:
    kw = dict(model="tiny", messages=USER, max_tokens=20, temperature=0)
    text = client.chat.completions.create(**kw).choices[0].message.content
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    r = client.chat.completions.create(**kw, stop=[stop, "never-there"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[: text.find(stop)]
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=stop, stream=True)
    )
    assert streamed == r.choices[0].message.content


def test_logprobs_are_the_models_log_softmax(client, llm) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    prompt = llm.tokenizer.apply_chat_template(USER, tokenize=True)
    generated = offline(llm, USER, max_tokens=6, temperature=0).token_ids
    with torch.no_grad():
        logits = llm.model(torch.tensor([prompt + generated]))[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1)
    for i, e in enumerate(entries):
        assert e.logprob == pytest.approx(float(expected[i, generated[i]]), abs=1e-4)
        assert e.token == llm.tokenizer.decode([generated[i]]) and e.bytes == list(e.token.encode())
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(e.logprob, abs=1e-6)  # greedy: the chosen token is the top one
        assert tops == pytest.approx(expected[i].topk(3).values.tolist(), abs=1e-4)
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_adapter_is_chosen_by_model_name(client, tiny_hf_dir, adapters, llm) -> None:
    kw = dict(messages=USER, max_tokens=12, temperature=0)
    texts = {}
    for name in ("a", "b"):
        merged = weightsmith.load(tiny_hf_dir, adapter=adapters[name])
        r = client.chat.completions.create(model=f"tiny:{name}", **kw)
        assert r.model == f"tiny:{name}"
        texts[name] = r.choices[0].message.content
        assert texts[name] == offline(merged, USER, max_tokens=12, temperature=0).text
    texts["base"] = client.chat.completions.create(model="tiny", **kw).choices[0].message.content
    assert len(set(texts.values())) == 3


def test_models_lists_the_base_and_its_adapters(client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "tiny:a", "tiny:b"]
    assert all(m.object == "model" and m.owned_by == "weightsmith" for m in models)
    for m in models:  # GET /v1/models/{id}: the same card
        assert client.models.retrieve(m.id).model_dump() == m.model_dump()
    with pytest.raises(openai.NotFoundError, match="does not exist; this server has tiny, tiny:a, tiny:b"):
        client.models.retrieve("tiny:c")


def test_text_completions(client, llm) -> None:
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    want = llm.engine.generate(["Once upon a time"], llm.sampling_params(max_tokens=8, temperature=0))[0]
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode("Once upon a time"))
    ids = llm.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == want.text
    echo = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, echo=True
    )
    assert echo.choices[0].text == "Once upon a time" + want.text
    batch = client.completions.create(model="tiny", prompt=["Hola mundo", "Once upon a time"], max_tokens=8, n=2,
                                      temperature=0)  # fmt: skip
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[2].text == batch.choices[3].text == want.text
    lp = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2
    )
    assert len(lp.choices[0].logprobs.tokens) == 4 and all(
        len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs
    )
    assert "".join(lp.choices[0].logprobs.tokens) == lp.choices[0].text or "\ufffd" in "".join(
        lp.choices[0].logprobs.tokens
    )
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(model="tiny", prompt="Once upon a time",
                                                              max_tokens=8, temperature=0, stream=True)
    )  # fmt: skip
    assert streamed == want.text


def test_tokenize_and_detokenize(server, llm) -> None:
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "Hola mundo"}).json()
    assert r["tokens"] == llm.tokenizer.encode("Hola mundo") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    chat = httpx.post(server.url + "/tokenize", json={"messages": USER}).json()
    assert chat["tokens"] == llm.tokenizer.apply_chat_template(USER, tokenize=True)
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hola mundo"}


def test_health_page_and_metrics(server) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Model output reaches the page only as text, never as markup.
    assert 'id="send"' in page.text and not re.search(r"\.innerHTML\s*=|insertAdjacentHTML\(", page.text)
    text = httpx.get(server.url + "/metrics").text
    for name in ("weightsmith_requests_total", "weightsmith_prompt_tokens_total",
                 "weightsmith_generation_tokens_total", "weightsmith_queue_depth",
                 "weightsmith_running_sequences", "weightsmith_time_to_first_token_seconds_bucket",
                 "weightsmith_inter_token_latency_seconds_bucket"):  # fmt: skip
        assert name in text, name
    assert re.search(r'weightsmith_requests_total\{endpoint="/health",status="200"\} [1-9]', text)


# ---- concurrency ---------------------------------------------------------------------------


def test_sixteen_concurrent_streams_equal_sequential_runs(client, server) -> None:
    jobs = [
        dict(model=["tiny", "tiny:a", "tiny:b"][i % 3], messages=[{"role": "user", "content": f"Story {i}"}],
             max_tokens=16 + i % 5, temperature=0)
        for i in range(16)
    ]  # fmt: skip
    sequential = [client.chat.completions.create(**job).choices[0].message.content for job in jobs]
    scheduler = server.state.scheduler
    sizes: list[int] = []
    decode = scheduler._decode

    def recording_decode() -> None:
        sizes.append(len(scheduler.running))
        decode()

    scheduler._decode = recording_decode
    start = threading.Barrier(16)

    def stream(job) -> str:
        start.wait()
        return "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**job, stream=True)
        )

    try:
        with ThreadPoolExecutor(16) as pool:
            concurrent = list(pool.map(stream, jobs))
    finally:
        del scheduler._decode
    assert concurrent == sequential
    assert max(sizes) >= 8  # requests really shared decode steps
    wait_for(lambda: metric(server, "weightsmith_running_sequences") == 0)


def test_a_client_that_disconnects_frees_its_row(server) -> None:
    cancelled = 'weightsmith_sequences_finished_total{reason="cancelled"}'
    before = metric(server, cancelled)
    body = {"model": "tiny", "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(server, "weightsmith_running_sequences") == 1
    wait_for(lambda: metric(server, "weightsmith_running_sequences") == 0)
    wait_for(lambda: metric(server, cancelled) == before + 1)
    generated = metric(server, "weightsmith_generation_tokens_total")
    time.sleep(0.3)
    assert metric(server, "weightsmith_generation_tokens_total") == generated  # nothing runs on


def test_a_non_streaming_client_that_gives_up_is_cancelled_too(server) -> None:
    cancelled = 'weightsmith_sequences_finished_total{reason="cancelled"}'
    before = metric(server, cancelled)
    body = {"model": "tiny", "messages": USER, "max_tokens": 200, "ignore_eos": True}
    scheduler = server.state.scheduler
    decode = scheduler._decode
    scheduler._decode = lambda: (time.sleep(0.05), decode())  # 10 s or more for the whole answer
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
        wait_for(lambda: metric(server, cancelled) == before + 1, timeout=5)
    finally:
        del scheduler._decode
    assert metric(server, "weightsmith_running_sequences") == 0


def test_a_long_prompt_prefilled_in_chunks_answers_like_the_engine(tiny_hf_dir, llm) -> None:
    cfg = config_from_dict(
        ServeConfig, {"model": str(tiny_hf_dir), "served_name": "tiny", "port": 0, "prefill_chunk": 16}
    )
    running = start_server(cfg)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
        assert len(llm.engine.chat_prompt(messages)) > 3 * 16
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == offline(llm, messages, max_tokens=12, temperature=0).text
    finally:
        running.stop()


def test_shutdown_lets_a_running_stream_finish(tiny_hf_dir) -> None:
    cfg = config_from_dict(ServeConfig, {"model": str(tiny_hf_dir), "served_name": "tiny", "port": 0})
    running = start_server(cfg)
    body = {"model": "tiny", "messages": USER, "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        rest = [line for line in lines if line]
    stopper.join(30)
    assert not running.thread.is_alive()
    assert rest[-1] == "data: [DONE]"
    finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
    assert finishes[-1] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(running.url + "/health")


def test_the_serve_command_starts_answers_and_stops_on_ctrl_c(tiny_hf_dir) -> None:
    import signal
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "weightsmith"
    proc = subprocess.Popen(
        [str(exe), "serve", str(tiny_hf_dir), "--port", "0", "--served-name", "tiny"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stderr.readline()
        url = re.search(r"listening on (http://\S+)", first).group(1)
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, timeout=60)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hola", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stderr.read().strip().endswith("weightsmith serve: stopped")
    finally:
        proc.kill()
