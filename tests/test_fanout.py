"""The endpoint pool (weightsmith.endpoints) against fake endpoints (httpx MockTransport) and a
closed port: answers in input order over several endpoints, the per-endpoint concurrency bound,
retries on 429 (Retry-After), 5xx and connection failures, no retry of a request's own error,
a failing endpoint left to the others, each request answered once, and the pre-run check of
what the endpoints serve."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter, defaultdict

import httpx
import pytest

from weightsmith.endpoints import (
    EndpointError,
    EndpointPool,
    RetryPolicy,
    endpoint_urls,
    retry_after,
    server_root,
)
from weightsmith.errors import UsageError

A, B = "http://a.test/v1", "http://b.test/v1"
FAST = RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.01)


def ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json={"echo": body["i"], "host": request.url.host})


def pool(handler, urls=(A, B), **kw) -> EndpointPool:
    kw.setdefault("retry", FAST)
    return EndpointPool(list(urls), transport=httpx.MockTransport(handler), **kw)


def post_each(p: EndpointPool, n: int) -> list[dict]:
    return p.map(lambda i: p.post("/completions", {"i": i}), range(n))


# ---- URLs ------------------------------------------------------------------------------------


def test_urls_from_commas_and_repeats_deduplicated() -> None:
    got = endpoint_urls(["http://a:8000/v1/, http://b:8000/v1", "http://a:8000/v1", "https://c/v1"])
    assert got == ["http://a:8000/v1", "http://b:8000/v1", "https://c/v1"]
    assert (
        server_root("http://a:8000/v1") == "http://a:8000" and server_root("http://a:1/x") == "http://a:1/x"
    )


@pytest.mark.parametrize("bad", ["a:8000/v1", "ftp://a/v1", "http://", "http://a/v1,localhost:8000", ","])
def test_bad_urls_are_one_line_naming_the_flag(bad) -> None:
    with pytest.raises(UsageError, match=r"^--endpoint: "):
        endpoint_urls(bad)


def test_retry_after_takes_seconds_or_a_date_and_is_capped() -> None:
    assert retry_after("2", 60) == 2.0 and retry_after("600", 60) == 60 and retry_after(None, 60) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after(date, 60) <= 31
    assert retry_after("soon", 60) is None


# ---- spreading, order, bounds --------------------------------------------------------------------


def test_answers_come_back_in_input_order_from_both_endpoints() -> None:
    rng = random.Random(0)

    def slow(request):
        time.sleep(rng.random() * 0.01)  # answers finish out of order
        return ok(request)

    p = pool(slow, concurrency=3)
    got = post_each(p, 60)
    assert [g["echo"] for g in got] == list(range(60))
    hosts = Counter(g["host"] for g in got)
    assert set(hosts) == {"a.test", "b.test"} and min(hosts.values()) >= 15
    stats = p.stats()
    assert sum(s["answered"] for s in stats.values()) == 60
    assert {u: s["answered"] for u, s in stats.items()} == {A: hosts["a.test"], B: hosts["b.test"]}


def test_concurrency_is_bounded_per_endpoint() -> None:
    lock = threading.Lock()
    now: Counter = Counter()
    most: Counter = Counter()

    def handler(request):
        host = request.url.host
        with lock:
            now[host] += 1
            most[host] = max(most[host], now[host])
        time.sleep(0.005)
        with lock:
            now[host] -= 1
        return ok(request)

    p = pool(handler, concurrency=2)
    assert [g["echo"] for g in post_each(p, 40)] == list(range(40))
    assert most["a.test"] == 2 and most["b.test"] == 2  # used fully, never exceeded


def test_progress_ticks_once_per_item() -> None:
    ticks = []
    p = pool(ok, concurrency=2)
    p.map(lambda i: p.post("/x", {"i": i}), range(7), progress=ticks.append)
    assert ticks == [1] * 7


# ---- retries -------------------------------------------------------------------------------------


def test_429_with_retry_after_is_waited_then_answered() -> None:
    seen: list[float] = []

    def handler(request):
        seen.append(time.monotonic())
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.2"}, json={"error": "busy"})
        return ok(request)

    p = pool(handler, urls=[A])
    assert p.post("/x", {"i": 7})["echo"] == 7
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.2  # the server's wait was honoured
    assert p.stats()[A] == {"answered": 1, "failed_tries": 1}


def test_500s_are_retried_and_the_request_counted_once() -> None:
    calls = Counter()

    def handler(request):
        calls["n"] += 1
        return httpx.Response(500, text="boom") if calls["n"] <= 2 else ok(request)

    p = pool(handler, urls=[A])
    assert p.post("/x", {"i": 1})["echo"] == 1
    assert calls["n"] == 3 and p.stats()[A] == {"answered": 1, "failed_tries": 2}


def test_connection_loss_moves_the_request_to_the_other_endpoint() -> None:
    def handler(request):
        if request.url.host == "a.test":
            raise httpx.ConnectError("refused", request=request)
        return ok(request)

    p = pool(handler, concurrency=4)
    got = post_each(p, 30)
    assert [g["echo"] for g in got] == list(range(30)) and {g["host"] for g in got} == {"b.test"}
    stats = p.stats()
    assert stats[B]["answered"] == 30 and stats[A]["answered"] == 0
    assert 1 <= stats[A]["failed_tries"] < 30  # backed off: not tried once per request


def test_an_endpoint_failing_every_time_is_left_to_the_others() -> None:
    def handler(request):
        return httpx.Response(503, text="down") if request.url.host == "a.test" else ok(request)

    p = pool(handler, concurrency=2, retry=RetryPolicy(attempts=4, backoff=0.05, max_backoff=5))
    got = post_each(p, 40)
    assert [g["echo"] for g in got] == list(range(40))
    assert p.stats()[A]["failed_tries"] <= 6  # its backoff grew; B took the rest


def test_a_real_closed_port_fails_after_the_tries_with_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = EndpointPool(f"http://127.0.0.1:{port}/v1", retry=FAST, timeout=5)
    with pytest.raises(
        EndpointError, match=rf"127.0.0.1:{port}/v1/x: request failed .*gave up after 4 tries"
    ):
        p.post("/x", {})
    assert p.stats()[f"http://127.0.0.1:{port}/v1"] == {"answered": 0, "failed_tries": 4}


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_a_requests_own_error_is_not_retried(status) -> None:
    calls = Counter()

    def handler(request):
        calls[request.url.host] += 1
        return httpx.Response(status, json={"error": {"message": "bad request"}})

    p = pool(handler)
    with pytest.raises(EndpointError, match=rf"answered HTTP {status}: .*bad request") as e:
        p.post("/x", {"i": 0})
    assert e.value.status == status and sum(calls.values()) == 1


def test_the_first_error_of_a_map_is_raised_and_the_rest_stopped() -> None:
    started = []

    def handler(request):
        i = json.loads(request.content)["i"]
        started.append(i)
        if i == 3:
            return httpx.Response(400, text="no")
        time.sleep(0.01)
        return ok(request)

    p = pool(handler, concurrency=1)
    with pytest.raises(EndpointError, match="HTTP 400"):
        post_each(p, 200)
    assert len(started) < 200


def test_a_malformed_answer_names_the_url() -> None:
    p = pool(lambda r: httpx.Response(200, text="<html>"), urls=[A])
    with pytest.raises(EndpointError, match=r"a.test/v1/x returned a malformed reply \(HTTP 200\)"):
        p.post("/x", {})


def test_root_paths_go_to_the_server_root() -> None:
    urls = []

    def handler(request):
        urls.append(str(request.url))
        return httpx.Response(200, json={})

    p = pool(handler, urls=[A])
    p.post("/tokenize", {}, root=True)
    p.post("/completions", {})
    assert urls == ["http://a.test/tokenize", "http://a.test/v1/completions"]


# ---- what is served --------------------------------------------------------------------------------


def models_handler(answers: dict[str, object]):
    def handler(request):
        answer = answers[request.url.host]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json={"object": "list", "data": answer})

    return handler


def test_served_model_is_the_weights_hash_not_the_urls() -> None:
    entry = [{"id": "m", "root": "m", "weights_sha256": "ab" * 32}]
    two = pool(models_handler({"a.test": entry, "b.test": entry})).served_model("m")
    one = pool(models_handler({"a.test": entry}), urls=[A]).served_model("m")
    assert one == two == {"model": "m", "weights_sha256": "ab" * 32}
    foreign = [{"id": "m", "root": "org/ckpt"}]  # vLLM reports no hash: the checkpoint it names
    assert pool(models_handler({"a.test": foreign}), urls=[A]).served_model("m") == {
        "model": "m",
        "root": ["org/ckpt"],
    }


def test_replicas_with_different_weights_or_without_the_model_are_refused() -> None:
    a = [{"id": "m", "weights_sha256": "aa" * 32}]
    b = [{"id": "m", "weights_sha256": "bb" * 32}]
    with pytest.raises(UsageError, match=r"serve different weights as 'm' .*a.test/v1: aaaaaaaaaaaa"):
        pool(models_handler({"a.test": a, "b.test": b})).served_model("m")
    with pytest.raises(UsageError, match=r"b.test/v1 does not serve a model named 'm'; it serves: other"):
        pool(models_handler({"a.test": a, "b.test": [{"id": "other"}]})).served_model("m")
    refused = httpx.Response(401, json={"error": "key"})
    with pytest.raises(EndpointError, match=r"HTTP 401.*check the API key"):
        pool(models_handler({"a.test": a, "b.test": refused})).served_model("m")


def test_an_unreachable_replica_at_the_start_is_skipped_for_now(caplog) -> None:
    entry = [{"id": "m", "weights_sha256": "aa" * 32}]
    down = httpx.ConnectError("refused")
    answers: dict = {"a.test": down, "b.test": entry}
    p = pool(models_handler(answers), retry=RetryPolicy(attempts=2, backoff=0.001, max_backoff=60))
    assert p.served_model("m")["weights_sha256"] == "aa" * 32
    assert "a.test/v1" in caplog.text and "unreachable" in caplog.text
    hosts = defaultdict(int)

    def count(request):
        hosts[request.url.host] += 1
        return ok(request)

    p.transport = httpx.MockTransport(count)
    p.close()  # new clients on the counting transport
    post_each(p, 10)
    assert hosts == {"b.test": 10}  # a is left alone for max_backoff
    with pytest.raises(EndpointError, match=r"no endpoint answered"):
        pool(models_handler({"a.test": down, "b.test": down})).served_model("m")


# ---- reading an echo answer (eval over endpoints) -----------------------------------------------


def echo_answer(tokens: list[str], logprobs: list, prefix: str = "", generated: int = 0) -> dict:
    """An echo-with-logprobs answer laid out as OpenAI's legacy completions (top-1 alternatives:
    the token itself when its log-probability is the highest, another token otherwise)."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    pairs = zip(tokens, logprobs, strict=True)
    tops = [None if v is None else {t if v > -2 else "other": max(v, -2.0)} for t, v in pairs]
    return {
        "choices": [{"text": "".join(tokens), "logprobs": {"tokens": tokens, "token_logprobs": logprobs,
                                                             "top_logprobs": tops, "text_offset": offsets}}],
        "usage": {"completion_tokens": generated},
    }  # fmt: skip


def test_the_continuation_is_the_tokens_after_the_context() -> None:
    from weightsmith.eval.endpoint import continuation_score

    answer = echo_answer(["Q", ":", " 4", "2"], [None, -1.0, -0.5, -3.0])
    assert continuation_score(answer, "Q: 42", len("Q:")) == (-3.5, False)  # "2" is not the top token
    assert continuation_score(answer, "Q: 42", len("Q: 4")) == (-3.0, False)
    bos = echo_answer(["<s>", "Q", ":", " 4"], [None, -1.0, -0.25, -0.5])  # a BOS text before the prompt
    assert continuation_score(bos, "Q: 4", len("Q:")) == (-0.5, True)
    extra = echo_answer(["Q", ":", " 4", "!"], [None, -1.0, -0.5, -0.1], generated=1)  # max_tokens 1
    assert continuation_score(extra, "Q: 4", len("Q:"), generated=1) == (-0.5, True)


@pytest.mark.parametrize(
    "answer, prompt, context, message",
    [
        (echo_answer(["Q:", " 4"], [None, -1.0]), "Q: 5", 2, "does not end with the prompt"),
        (echo_answer(["Q: 4"], [None]), "Q: 4", 2, "first token already reaches into the continuation"),
        ({"choices": [{"text": "Q: 4"}]}, "Q: 4", 2, "does the server support echo with logprobs"),
    ],
)
def test_an_echo_answer_that_cannot_be_read_says_why(answer, prompt, context, message) -> None:
    from weightsmith.eval.endpoint import continuation_score

    with pytest.raises(EndpointError, match=message):
        continuation_score(answer, prompt, context)


def test_a_server_refusing_max_tokens_zero_gets_one_and_its_token_is_dropped() -> None:
    from weightsmith.eval.endpoint import EndpointScorer

    bodies = []

    def vllm_like(request):
        body = json.loads(request.content)
        bodies.append(body)
        if body["max_tokens"] == 0:
            return httpx.Response(400, json={"error": {"message": "max_tokens must be at least 1, got 0."}})
        assert body["echo"] is True and body["logprobs"] == 1 and body["prompt"] == "Q: 4"
        return httpx.Response(
            200, json=echo_answer(["Q", ":", " 4", "!"], [None, -1.0, -0.5, -9.0], generated=1)
        )

    scorer = EndpointScorer(pool(vllm_like, urls=[A], concurrency=2), "m")
    assert scorer.loglikelihood([("Q:", " 4"), ("Q: ", "4")]) == [(-0.5, True), (-0.5, True)]
    assert [b["max_tokens"] for b in bodies] == [0, 1, 1]  # asked once, then 1 for every request
    with pytest.raises(UsageError, match="empty context"):
        scorer.loglikelihood([("", "x")])
