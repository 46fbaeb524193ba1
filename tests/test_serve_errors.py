"""How the server refuses bad input, callers without the key, and work it cannot take.

What is checked, against live servers on a tiny random Llama (and one LoRA adapter "a"):
- a table of bad requests: each gets its exact 4xx status and OpenAI's error object
  (message, type, param, code), never a 500; unknown extra fields are accepted;
- bodies over the size limit get 413, by Content-Length and by a chunked upload;
- the API key: 401 with WWW-Authenticate without it, `/` and `/health` stay public,
  the official `openai` client sees AuthenticationError;
- a full queue gets 429 with Retry-After while the batch is busy;
- while the model loads (or after it failed) `/health` and the API answer 503;
- `weightsmith serve` fails with one line for a bad adapter, model or busy port,
  before any server starts.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
SMALL_BODY = 2048  # the auth server's --max-body
#: How long a request that should answer at once may take before it counts as hung.
PROMPT_ANSWER_S = 10.0


# ---- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_hf_dir: Path, tmp_path_factory) -> Path:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import LoraConfig, apply_lora, save_adapter

    model = load_checkpoint(tiny_hf_dir, device=torch.device("cpu"), dtype=torch.float32).model
    cfg = LoraConfig(r=4, alpha=8)
    apply_lora(model, cfg, "default")
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", cfg)


@pytest.fixture(scope="module")
def n_ctx(tiny_hf_dir: Path) -> int:
    """The tiny model's context, which bounds every request (the server's default is larger)."""
    return json.loads((tiny_hf_dir / "config.json").read_text())["max_position_embeddings"]


def serving(tiny_hf_dir: Path, **options):
    """A live server for the tiny model, named "tiny", on a free port."""
    cfg = config_from_dict(
        ServeConfig, {"model": str(tiny_hf_dir), "port": 0, "served_name": "tiny", **options}
    )
    srv = start_server(cfg, timeout=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path, adapter_dir: Path):
    yield from serving(tiny_hf_dir, adapter=[f"a={adapter_dir}"])


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=PROMPT_ANSWER_S) as c:
        yield c


@pytest.fixture(scope="module")
def guarded(tiny_hf_dir: Path):
    """A server with an API key, one batch row, one queue slot and a small body limit."""
    yield from serving(tiny_hf_dir, api_key=KEY, max_batch=1, max_queue=1, max_body=SMALL_BODY)


@pytest.fixture(scope="module")
def gclient(guarded) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, timeout=PROMPT_ANSWER_S) as c:
        yield c


# ---- helpers -------------------------------------------------------------------------------


def chat(drop: tuple[str, ...] = (), **fields) -> dict:
    body = {"model": "tiny", "messages": HI, "max_tokens": 2, **fields}
    for key in drop:
        body.pop(key)
    return body


def comp(drop: tuple[str, ...] = (), **fields) -> dict:
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 2, **fields}
    for key in drop:
        body.pop(key)
    return body


def send(c: httpx.Client, target: str, body, headers: dict | None = None) -> httpx.Response:
    """`target` is "PATH" (POST) or "METHOD PATH"; a dict body goes as JSON, bytes as they are."""
    method, _, path = target.rpartition(" ")
    method = method or "POST"
    if isinstance(body, bytes):  # as a JSON client would label it
        return c.request(
            method, path, content=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
    return c.request(method, path, json=body, headers=headers)


def error_of(r: httpx.Response) -> dict:
    """The error object of an error response, checked for OpenAI's shape."""
    assert r.status_code != 500, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err


def metric(c: httpx.Client, name: str, headers: dict | None = None) -> float:
    text = c.get("/metrics", headers=headers).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def throttle_decode(monkeypatch, scheduler, seconds: float = 0.02) -> None:
    """Slow every decode step, so a long request is still running when the next one comes."""
    decode = scheduler._decode

    def slow() -> None:
        time.sleep(seconds)
        decode()

    monkeypatch.setattr(scheduler, "_decode", slow)


def sse_events(r: httpx.Response) -> Iterator[dict]:
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


# ---- 1. bad input --------------------------------------------------------------------------

LONG_USER = [{"role": "user", "content": "hello world " * 300}]

BAD = [
    # The body itself.
    pytest.param(CHAT, b'{"model": "tiny",', 400, None, "invalid_json", id="malformed-json"),
    pytest.param(CHAT, b"[]", 400, None, "invalid_json", id="json-array"),
    pytest.param(CHAT, b"", 400, None, "invalid_json", id="empty-body"),
    pytest.param(CHAT, b"null", 400, None, "invalid_json", id="json-null"),
    pytest.param(CHAT, b"[" * 100_000, 400, None, "invalid_json", id="deep-nesting"),
    pytest.param(CHAT, b"\xff\xfe{", 400, None, "invalid_json", id="not-utf8"),
    # Chat: model and messages.
    pytest.param(CHAT, chat(drop=("model",)), 400, "model", "missing_required_parameter", id="no-model"),
    pytest.param(CHAT, chat(model=""), 400, "model", None, id="empty-model"),
    pytest.param(
        CHAT, chat(drop=("messages",)), 400, "messages", "missing_required_parameter", id="no-messages"
    ),
    pytest.param(CHAT, chat(messages=[]), 400, "messages", None, id="empty-messages"),
    pytest.param(CHAT, chat(messages="Hi"), 400, "messages", None, id="messages-string"),
    pytest.param(
        CHAT,
        chat(messages=[{"role": "wizard", "content": "Hi"}]),
        400,
        "messages[0].role",
        None,
        id="unknown-role",
    ),
    pytest.param(
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
        "invalid_type",
        id="content-number",
    ),
    pytest.param(
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content",
        None,
        id="image-part",
    ),
    pytest.param(
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "messages[0].content",
        None,
        id="part-without-text",
    ),
    pytest.param(
        CHAT,
        chat(messages=[{"role": "user", "content": "Hi", "name": 7}]),
        400,
        "messages[0].name",
        None,
        id="name-number",
    ),
    pytest.param(CHAT, chat(model="nope"), 404, "model", "model_not_found", id="unknown-model"),
    pytest.param(CHAT, chat(model="tiny:zzz"), 404, "model", "model_not_found", id="unknown-adapter"),
    pytest.param(CHAT, chat(model="tiny:"), 404, "model", "model_not_found", id="empty-adapter"),
    # Chat: limits.
    pytest.param(CHAT, chat(max_tokens=0), 400, "max_tokens", None, id="max-tokens-0"),
    pytest.param(CHAT, chat(max_tokens=-5), 400, "max_tokens", None, id="max-tokens-negative"),
    pytest.param(CHAT, chat(max_tokens="10"), 400, "max_tokens", None, id="max-tokens-string"),
    pytest.param(
        CHAT, chat(max_tokens=1_000_000), 400, "max_tokens", "context_length_exceeded", id="max-tokens-huge"
    ),
    pytest.param(
        CHAT,
        chat(drop=("max_tokens",), max_completion_tokens=1_000_000),
        400,
        "max_completion_tokens",
        "context_length_exceeded",
        id="max-completion-tokens-huge",
    ),
    pytest.param(
        CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None, id="max-completion-tokens-0"
    ),
    pytest.param(
        CHAT,
        chat(drop=("max_tokens",), messages=LONG_USER),
        400,
        "messages",
        "context_length_exceeded",
        id="prompt-longer-than-context",
    ),
    pytest.param(CHAT, chat(n=0), 400, "n", None, id="n-0"),
    pytest.param(CHAT, chat(n=1000), 400, "n", None, id="n-1000"),
    pytest.param(CHAT, chat(n="2"), 400, "n", None, id="n-string"),
    # Chat: logprobs.
    pytest.param(CHAT, chat(top_logprobs=2), 400, "top_logprobs", None, id="top-logprobs-alone"),
    pytest.param(CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", None, id="top-logprobs-50"),
    pytest.param(CHAT, chat(logprobs="yes"), 400, "logprobs", None, id="logprobs-string"),
    # Chat: stop strings.
    pytest.param(CHAT, chat(stop=123), 400, "stop", "invalid_type", id="stop-number"),
    pytest.param(CHAT, chat(stop=[1]), 400, "stop", None, id="stop-list-of-number"),
    pytest.param(CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop", None, id="stop-17"),
    pytest.param(CHAT, chat(stop=""), 400, "stop", None, id="stop-empty"),
    pytest.param(CHAT, chat(stop=["a", ""]), 400, "stop", None, id="stop-list-with-empty"),
    # Chat: sampling settings.
    pytest.param(CHAT, chat(temperature=-1), 400, "temperature", None, id="temperature-negative"),
    pytest.param(CHAT, chat(temperature=3), 400, "temperature", None, id="temperature-3"),
    pytest.param(CHAT, chat(temperature="hot"), 400, "temperature", None, id="temperature-string"),
    pytest.param(
        CHAT,
        b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        400,
        "temperature",
        None,
        id="temperature-nan",
    ),
    pytest.param(CHAT, chat(top_p=0), 400, "top_p", None, id="top-p-0"),
    pytest.param(CHAT, chat(presence_penalty=3), 400, "presence_penalty", None, id="presence-3"),
    pytest.param(CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty", None, id="frequency-neg3"),
    pytest.param(CHAT, chat(seed="x"), 400, "seed", None, id="seed-string"),
    pytest.param(CHAT, chat(top_k=-2), 400, "top_k", None, id="top-k-neg2"),
    pytest.param(CHAT, chat(min_p=1), 400, "min_p", None, id="min-p-1"),
    pytest.param(CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", None, id="repetition-0"),
    # Chat: streaming.
    pytest.param(CHAT, chat(stream="yes"), 400, "stream", None, id="stream-string"),
    pytest.param(
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        None,
        id="stream-options-without-stream",
    ),
    pytest.param(
        CHAT,
        chat(stream=True, stream_options={"include_usage": "x"}),
        400,
        "stream_options.include_usage",
        None,
        id="include-usage-string",
    ),
    # Completions.
    pytest.param(
        COMPLETIONS, comp(drop=("prompt",)), 400, "prompt", "missing_required_parameter", id="comp-no-prompt"
    ),
    pytest.param(COMPLETIONS, comp(prompt=5), 400, "prompt", "invalid_type", id="comp-prompt-number"),
    pytest.param(COMPLETIONS, comp(prompt=[]), 400, "prompt", None, id="comp-prompt-empty-list"),
    pytest.param(COMPLETIONS, comp(prompt=""), 400, "prompt", None, id="comp-prompt-empty-string"),
    pytest.param(COMPLETIONS, comp(prompt=[5, 99999]), 400, "prompt", None, id="comp-token-outside-vocab"),
    pytest.param(
        COMPLETIONS, comp(prompt=["Once", ""]), 400, "prompt[1]", None, id="comp-second-prompt-empty"
    ),
    pytest.param(
        COMPLETIONS,
        comp(prompt=[[5, 6], [99999]]),
        400,
        "prompt[1]",
        None,
        id="comp-second-ids-outside-vocab",
    ),
    pytest.param(COMPLETIONS, comp(prompt=["a"] * 9, n=2), 400, "n", None, id="comp-n-times-prompts"),
    pytest.param(
        COMPLETIONS,
        comp(max_tokens=1_000_000),
        400,
        "max_tokens",
        "context_length_exceeded",
        id="comp-max-tokens-huge",
    ),
    pytest.param(
        COMPLETIONS,
        comp(drop=("max_tokens",), prompt=LONG_USER[0]["content"]),
        400,
        "prompt",
        "context_length_exceeded",
        id="comp-prompt-longer-than-context",
    ),
    pytest.param(COMPLETIONS, comp(logprobs=50), 400, "logprobs", None, id="comp-logprobs-50"),
    pytest.param(COMPLETIONS, comp(suffix="x"), 400, "suffix", None, id="comp-suffix"),
    pytest.param(COMPLETIONS, comp(best_of=3, n=1), 400, "best_of", None, id="comp-best-of"),
    pytest.param(
        COMPLETIONS, comp(max_tokens=0), 400, "max_tokens", None, id="comp-max-tokens-0-without-echo"
    ),
    pytest.param(
        COMPLETIONS, comp(model="tiny:zzz"), 404, "model", "model_not_found", id="comp-unknown-adapter"
    ),
    # Tokenizer endpoints.
    pytest.param("/tokenize", {"prompt": "Hi", "messages": HI}, 400, "prompt", None, id="tokenize-both"),
    pytest.param("/tokenize", {"model": "tiny"}, 400, "prompt", None, id="tokenize-neither"),
    pytest.param(
        "/tokenize",
        {"model": "nope", "prompt": "Hi"},
        404,
        "model",
        "model_not_found",
        id="tokenize-unknown-model",
    ),
    pytest.param("/detokenize", {"tokens": ["a"]}, 400, "tokens[0]", None, id="detokenize-string"),
    pytest.param("/detokenize", {"tokens": [5, -1]}, 400, "tokens[1]", None, id="detokenize-negative"),
    pytest.param("/detokenize", {}, 400, "tokens", "missing_required_parameter", id="detokenize-no-tokens"),
    # Routing.
    pytest.param(f"GET {CHAT}", None, 405, None, "method_not_allowed", id="get-chat"),
    pytest.param("POST /v1/nope", {}, 404, None, "not_found", id="unknown-path"),
]


@pytest.mark.parametrize("target, body, status, param, code", BAD)
def test_bad_input_gets_a_4xx_with_the_error_object(client, n_ctx, target, body, status, param, code):
    r = send(client, target, body)
    assert r.status_code == status, r.text
    err = error_of(r)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if code == "context_length_exceeded":
        n_prompt = err.get("n_prompt_tokens")
        assert type(n_prompt) is int and n_prompt > 0, err
        assert err.get("n_ctx") == n_ctx, err
        if param in ("messages", "prompt"):
            assert n_prompt > n_ctx, err
        else:  # the prompt fits; the limit asked for does not
            assert n_prompt < n_ctx < n_prompt + body[param], err


def test_the_context_in_errors_is_the_one_models_lists(client, n_ctx):
    models = client.get("/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"tiny", "tiny:a"}
    assert {m["max_model_len"] for m in models} == {n_ctx}


def test_ordinary_requests_still_work_after_the_table(client):
    """After the table, ordinary requests on every endpoint still work."""
    for target, body in [
        (CHAT, chat()),
        (CHAT, chat(model="tiny:a")),
        (COMPLETIONS, comp()),
        ("/tokenize", {"prompt": "Hi"}),
        ("/detokenize", {"tokens": [5, 6]}),
    ]:
        r = send(client, target, body)
        assert r.status_code == 200, (target, r.text)


def test_unknown_extra_fields_are_accepted(client):
    extra = {"foo": 1, "metadata": {"k": "v"}, "logit_bias": {}, "service_tier": "auto"}
    r = client.post(CHAT, json=chat(**extra))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1
    r = client.post(COMPLETIONS, json=comp(**extra))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_a_body_under_the_limit_is_served(gclient):
    body = json.dumps(chat(padding="x" * (SMALL_BODY // 2))).encode()  # an unknown field
    assert len(body) < SMALL_BODY
    r = gclient.post(CHAT, content=body, headers=AUTH)
    assert r.status_code == 200, r.text


def _too_big_body() -> bytes:
    body = json.dumps(chat(padding="x" * SMALL_BODY)).encode()
    assert len(body) > SMALL_BODY
    return body


def test_a_body_over_the_limit_by_content_length_gets_413(gclient):
    body = _too_big_body()
    r = gclient.post(CHAT, content=body, headers=AUTH)
    assert r.status_code == 413, r.text
    assert error_of(r)["code"] == "request_too_large"


def test_a_chunked_body_over_the_limit_gets_413(gclient):
    body = _too_big_body()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    r = gclient.post(CHAT, content=pieces(), headers=AUTH)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413, r.text
    assert error_of(r)["code"] == "request_too_large"


# ---- settings at the edge of what sampling can take ----------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"seed": 2**64, "temperature": 1.0}, id="seed-2^64"),
        pytest.param({"seed": 2**64 - 1, "temperature": 1.0, "n": 2}, id="seed-plus-choice-overflows"),
    ],
)
def test_an_out_of_range_seed_is_answered(client, fields):
    """A 2-token answer takes milliseconds; the bug hangs, so wait only a few seconds."""
    try:
        r = client.post(CHAT, json=chat(**fields), timeout=3.0)
    except httpx.TimeoutException:
        pytest.fail("no answer within 3 s")
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert error_of(r)["param"] == "seed"


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"temperature": 1e-40}, id="temperature-1e-40"),
        pytest.param({"temperature": 1.0, "repetition_penalty": 1e-40}, id="repetition-1e-40"),
    ],
)
def test_a_tiny_positive_setting_is_not_a_server_error(client, fields):
    r = client.post(CHAT, json=chat(**fields))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert error_of(r)["param"] in fields


def test_one_failing_request_does_not_end_the_others(client, server, monkeypatch):
    """A failure in one row's sampling (here: logprobs, broken on purpose) ends that request
    with an error and leaves the rest of the batch running."""
    throttle_decode(monkeypatch, server.state.scheduler)

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr("weightsmith.serve.scheduler.token_logprob", broken)
    body = chat(stream=True, ignore_eos=True, max_tokens=200, temperature=0)
    with client.stream("POST", CHAT, json=body) as a:
        assert a.status_code == 200
        events = sse_events(a)
        while not any(c["delta"].get("content") for c in next(events)["choices"]):
            pass  # the role chunk; then A's first token: A is running
        failed = client.post(CHAT, json=chat(logprobs=True))  # fails inside the scheduler
        assert failed.status_code == 500 and "broken on purpose" in failed.json()["error"]["message"]
        for _ in range(3):
            event = next(events)
            assert "error" not in event, event
            assert event["choices"][0]["finish_reason"] is None, event
    wait_for(lambda: metric(client, "weightsmith_running_sequences") == 0.0, what="an idle batch")


# ---- 2. auth -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, what",
    [
        pytest.param({}, "no API key", id="none"),
        pytest.param({"Authorization": "Bearer wrong"}, "not valid", id="wrong"),
        pytest.param({"Authorization": f"Basic {KEY}"}, "not valid", id="not-bearer"),
        pytest.param({"Authorization": "Bearer"}, "no API key", id="empty"),
    ],
)
@pytest.mark.parametrize("target", ["GET /v1/models", CHAT, "/tokenize", "GET /metrics"])
def test_without_the_key_the_api_answers_401(gclient, headers, what, target):
    r = send(gclient, target, chat() if target == CHAT else {"prompt": "Hi"}, headers=headers)
    assert r.status_code == 401, r.text
    err = error_of(r)
    assert err["code"] == "invalid_api_key"
    assert what in err["message"]
    assert KEY not in r.text
    assert r.headers.get("www-authenticate") == "Bearer"


def test_with_the_key_the_api_answers(gclient):
    r = gclient.get("/v1/models", headers=AUTH)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]
    assert gclient.get("/metrics", headers=AUTH).status_code == 200


def test_health_and_the_chat_page_need_no_key(gclient):
    r = gclient.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = gclient.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()


def test_the_openai_client_sees_an_authentication_error(guarded):
    openai = pytest.importorskip("openai")
    wrong = openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    right = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0, timeout=10)
    assert [m.id for m in right.models.list()] == ["tiny"]


# ---- 3. a full queue -----------------------------------------------------------------------


def test_a_full_queue_gets_429_with_retry_after(guarded, gclient, monkeypatch):
    """One batch row and one queue slot: A runs, B waits, C is turned away."""
    throttle_decode(monkeypatch, guarded.state.scheduler)
    body = chat(stream=True, ignore_eos=True, max_tokens=200, temperature=0)
    with gclient.stream("POST", CHAT, json=body, headers=AUTH) as a:
        assert a.status_code == 200
        events = sse_events(a)
        while not any(c["delta"].get("content") for c in next(events)["choices"]):
            pass  # the role chunk comes before A is scheduled; its first token means A is running
        with gclient.stream("POST", CHAT, json=body, headers=AUTH) as b:
            assert b.status_code == 200
            wait_for(
                lambda: (
                    metric(gclient, "weightsmith_queue_depth", AUTH) == 1.0
                    and metric(gclient, "weightsmith_running_sequences", AUTH) == 1.0
                ),
                what="A running and B in the queue",
            )
            c = gclient.post(CHAT, json=chat(), headers=AUTH)
            assert c.status_code == 429, c.text
            assert error_of(c)["code"] == "queue_full"
            assert int(c.headers["retry-after"]) >= 1
    wait_for(
        lambda: (
            metric(gclient, "weightsmith_running_sequences", AUTH) == 0.0
            and metric(gclient, "weightsmith_queue_depth", AUTH) == 0.0
        ),
        what="an idle server after A and B went away",
    )
    monkeypatch.undo()
    r = gclient.post(CHAT, json=chat(), headers=AUTH)
    assert r.status_code == 200, r.text


# ---- 4. loading ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tiny_hf_dir: Path):
    import weightsmith

    return weightsmith.load(tiny_hf_dir, device="cpu")


def _health(c) -> tuple[int, dict]:
    r = c.get("/health")
    return r.status_code, r.json()


def test_while_loading_health_and_api_answer_503(tiny_llm):
    from starlette.testclient import TestClient

    from weightsmith.serve.app import Loaded, create_app

    release = threading.Event()

    def loader() -> Loaded:
        assert release.wait(30), "the test never released the loader"
        return Loaded(tiny_llm, [])

    app = create_app(ServeConfig(model="tiny"), loader)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as c:
            assert _health(c) == (503, {"status": "loading"})
            r = c.post(CHAT, json=chat())
            assert r.status_code == 503, r.text
            assert error_of(r)["code"] == "model_loading"
            assert int(r.headers["retry-after"]) >= 1
            assert c.get("/v1/models").status_code == 503
            release.set()
            wait_for(lambda: _health(c)[0] == 200, timeout=30, what="/health 200")
            assert _health(c) == (200, {"status": "ok"})
            assert c.post(CHAT, json=chat()).status_code == 200
    finally:
        release.set()


@pytest.mark.parametrize("origins", [[], ["https://ok.example"]], ids=["default-off", "configured"])
def test_cors_is_off_unless_origins_are_given(origins):
    from starlette.testclient import TestClient

    from weightsmith.serve.app import create_app

    never = threading.Event()
    app = create_app(ServeConfig(model="tiny", api_key="k", cors_origin=origins), lambda: never.wait())
    preflight = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.options(CHAT, headers=preflight)
        allowed = r.headers.get("access-control-allow-origin")
        health = c.get("/health", headers={"Origin": "https://ok.example"})
        evil = c.options(CHAT, headers=preflight | {"Origin": "https://evil.example"})
    if origins:
        assert r.status_code == 200 and allowed == "https://ok.example"
        assert health.headers.get("access-control-allow-origin") == "https://ok.example"
    else:
        assert allowed is None and "access-control-allow-origin" not in health.headers
    assert "access-control-allow-origin" not in evil.headers
    never.set()


def test_a_failed_load_shows_on_health(tiny_hf_dir):
    from starlette.testclient import TestClient

    from weightsmith.serve.app import create_app

    def loader():
        raise RuntimeError("the weights are gone")

    app = create_app(ServeConfig(model="tiny"), loader)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        wait_for(lambda: _health(c)[1]["status"] != "loading", what="the load to fail")
        status, body = _health(c)
        assert status == 503 and body["status"] == "error"
        assert "the weights are gone" in body["error"]
        r = c.post(CHAT, json=chat())
        assert r.status_code == 503
        assert error_of(r)["code"] == "model_failed"


# ---- 5. the command line -------------------------------------------------------------------


@pytest.fixture
def no_server(monkeypatch, tmp_path):
    """Fails the test if `weightsmith serve` gets as far as making a uvicorn server."""
    import weightsmith.commands.serve as serve_cmd

    made = []
    monkeypatch.setattr(serve_cmd, "uvicorn_server", lambda *a, **k: made.append(a))
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    yield
    assert not made, "a server was started"


def serve_error(capsys, argv: list[str]) -> str:
    from weightsmith.cli.main import main

    capsys.readouterr()
    rc = main(["serve", *argv])
    out, err = capsys.readouterr()
    assert rc != 0, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_adapter_path_that_does_not_exist(no_server, capsys, tiny_hf_dir, tmp_path):
    missing = tmp_path / "nonexistent"
    line = serve_error(capsys, [str(tiny_hf_dir), "--port", "0", "--adapter", str(missing)])
    assert str(missing) in line


def test_cli_adapter_dir_without_adapter_config(no_server, capsys, tiny_hf_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    line = serve_error(capsys, [str(tiny_hf_dir), "--port", "0", "--adapter", f"x={tmp_path / 'empty'}"])
    assert "adapter_config.json" in line


def test_cli_adapter_name_given_twice(no_server, capsys, tiny_hf_dir, adapter_dir):
    argv = [str(tiny_hf_dir), "--port", "0", "--adapter", f"a={adapter_dir}", "--adapter", f"a={adapter_dir}"]
    line = serve_error(capsys, argv)
    assert "'a'" in line


def test_cli_unknown_model(no_server, capsys):
    line = serve_error(capsys, ["no-such-model-xyz", "--port", "0"])
    assert "no-such-model-xyz" in line


def test_cli_busy_port(no_server, capsys, tiny_hf_dir):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = serve_error(capsys, [str(tiny_hf_dir), "--host", "127.0.0.1", "--port", str(port)])
    assert str(port) in line
