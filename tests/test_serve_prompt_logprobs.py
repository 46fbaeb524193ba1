"""Prompt log-probabilities on /v1/completions (`echo` with `logprobs`, `max_tokens` 0 or more):
each prompt token's log-probability given its prefix against the local model's own forward pass
(first token null), OpenAI's legacy layout (tokens, token_logprobs, top_logprobs, text_offset),
generated tokens after the prompt's, streaming, n and prompt lists, adapters, prompts longer
than the context (lm-eval's truncation), and the weights hash in /v1/models."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

import weightsmith
from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict
from weightsmith.eval.cache import model_fingerprint

TEXT = "Once upon a time there was a small model. Grüße aus Köln 🙂"


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path, adapter_dir: Path):
    cfg = {"model": str(tiny_hf_dir), "served_name": "tiny", "port": 0, "adapter": [f"a={adapter_dir}"]}
    running = start_server(config_from_dict(ServeConfig, cfg))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url + "/v1", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path):
    return weightsmith.load(tiny_hf_dir)


def local_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """(T - 1, V): the log-softmax predicting tokens 1..T-1 from a plain forward pass."""
    with torch.no_grad():
        return torch.log_softmax(llm.model(torch.tensor([ids]))[0, :-1].float(), -1)


def score(http, prompt, **kw) -> dict:
    body = {"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0, **kw}
    r = http.post("/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_prompt_logprobs_are_the_models_own(http, llm) -> None:
    answer = score(http, TEXT)
    (choice,) = answer["choices"]
    ids = llm.tokenizer.encode(TEXT)
    lp = choice["logprobs"]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                               "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    assert lp["tokens"] == [llm.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = local_logprobs(llm, ids)
    got = torch.tensor(lp["token_logprobs"][1:])
    want = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for k, top in enumerate(lp["top_logprobs"][1:]):
        values, idx = expected[k].topk(2)
        assert top == pytest.approx(
            {llm.tokenizer.decode([t]): v for t, v in zip(idx.tolist(), values.tolist(), strict=True)},
            abs=1e-5,
        )
        assert max(top.values()) >= lp["token_logprobs"][k + 1]


def test_text_offsets_locate_each_token_in_the_echoed_text(http, llm) -> None:
    lp = score(http, TEXT)["choices"][0]["logprobs"]
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(TEXT)
    ids = llm.tokenizer.encode(TEXT)
    for k, start in enumerate(offsets):  # prefix decoding: a token starts where its text begins
        prefix = llm.tokenizer.decode(ids[:k])
        assert start == len(prefix.rstrip("\ufffd")) and TEXT.startswith(prefix.rstrip("\ufffd"))
    whole = [k for k, t in enumerate(lp["tokens"]) if "\ufffd" not in t]
    assert all(TEXT[offsets[k] :].startswith(lp["tokens"][k]) for k in whole)


def test_generated_tokens_follow_the_prompts_with_offsets_after_it(http) -> None:
    prompt_only = score(http, TEXT)["choices"][0]["logprobs"]
    answer = score(http, TEXT, max_tokens=3, temperature=0)
    (choice,) = answer["choices"]
    lp = choice["logprobs"]
    n = len(prompt_only["tokens"])
    assert {k: v[:n] for k, v in lp.items()} == prompt_only
    assert len(lp["tokens"]) == n + 3 == n + answer["usage"]["completion_tokens"]
    assert lp["text_offset"][n] == len(TEXT) and choice["text"].startswith(TEXT)
    plain = score(http, TEXT, max_tokens=3, temperature=0, echo=False)["choices"][0]
    assert choice["text"] == TEXT + plain["text"]
    assert lp["token_logprobs"][n:] == plain["logprobs"]["token_logprobs"]


def test_a_stream_carries_the_same_prompt_logprobs(http, server) -> None:
    whole = score(http, TEXT, max_tokens=2, temperature=0)["choices"][0]
    body = {"model": "tiny", "prompt": TEXT, "echo": True, "logprobs": 2, "max_tokens": 2, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events)
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in events:
        for key, values in (e["choices"][0]["logprobs"] or {}).items():
            merged[key] += values
    assert text == whole["text"] and merged == whole["logprobs"]
    body["max_tokens"] = 0
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert (
        lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    )


def test_n_and_prompt_lists_score_each_prompt(http) -> None:
    a, b = "Hola mundo, hola.", "The quick brown fox"
    answer = score(http, [a, b], n=2)
    choices = answer["choices"]
    assert [c["text"] for c in choices] == [a, a, b, b]
    assert choices[0]["logprobs"] == choices[1]["logprobs"] == score(http, a)["choices"][0]["logprobs"]
    assert choices[2]["logprobs"] == score(http, b)["choices"][0]["logprobs"]


def test_token_id_prompts_and_an_adapter(http, tiny_hf_dir, adapter_dir) -> None:
    forked = weightsmith.load(tiny_hf_dir, adapter=adapter_dir)
    ids = forked.tokenizer.encode(TEXT)
    base = score(http, ids)["choices"][0]["logprobs"]["token_logprobs"]
    got = score(http, ids, model="tiny:a")["choices"][0]["logprobs"]["token_logprobs"]
    want = local_logprobs(forked, ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(got[1:]), want, atol=1e-5, rtol=0)
    assert got[1:] != base[1:]


def test_a_prompt_longer_than_the_context_keeps_its_last_window(http, llm, server) -> None:
    n_ctx = server.state.scheduler.max_len
    ids = (llm.tokenizer.encode(TEXT + " ") * 30)[: n_ctx + 9]
    lp = score(http, ids, logprobs=0)["choices"][0]["logprobs"]["token_logprobs"]
    skip = len(ids) - (n_ctx + 1)  # lm-eval's (and the local scorer's) window: the last n_ctx + 1
    assert lp[: skip + 1] == [None] * (skip + 1)
    window = ids[skip:]
    want = local_logprobs(llm, window)[torch.arange(n_ctx), torch.tensor(window[1:])]
    torch.testing.assert_close(torch.tensor(lp[skip + 1 :]), want, atol=1e-5, rtol=0)
    r = http.post("/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_zero_needs_echo(http) -> None:
    r = http.post("/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                             "max_tokens": 0})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    echo = score(http, "Hi there", logprobs=None)["choices"][0]
    assert echo["text"] == "Hi there" and echo["logprobs"] is None


def test_models_report_the_weights_hash(http, server, monkeypatch) -> None:
    import threading

    import weightsmith.eval.cache

    threads = []

    def recording(model):
        threads.append(threading.current_thread().name)
        return model_fingerprint(model)

    monkeypatch.setattr(weightsmith.eval.cache, "model_fingerprint", recording)
    monkeypatch.setattr(server.state, "_weights_sha256", None)
    data = http.get("/models").json()["data"]
    digest = model_fingerprint(server.state.loaded.llm.model)
    assert [m["weights_sha256"] for m in data] == [digest, digest]
    # Hashed once, on the model's thread: parallel tensor work on any other thread gives OpenMP a
    # second thread team, after which every decode step's barriers sleep instead of spinning.
    assert http.get("/models").json()["data"][0]["weights_sha256"] == digest
    assert threads == ["weightsmith-scheduler"]


def test_a_guarded_server_refuses_prompt_scoring(tiny_hf_dir) -> None:
    cfg = {"model": str(tiny_hf_dir), "served_name": "tiny", "port": 0, "guard": "builtin:school"}
    running = start_server(config_from_dict(ServeConfig, cfg))
    try:
        body = {"model": "tiny", "prompt": "Hi", "echo": True, "logprobs": 1, "max_tokens": 0}
        r = httpx.post(running.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "guard" in r.json()["error"]["message"]
    finally:
        running.stop()
