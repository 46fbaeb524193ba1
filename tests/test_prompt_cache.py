"""The prompt cache: a conversation's next turn copies its history from the finished row's kept
keys and values instead of prefilling it, and gets the tokens it gets alone.

Driven through the scheduler step by step (tests/test_scheduler.py's helpers) on a tiny random
Llama, and through the server with the official client (usage's cached_tokens, /metrics).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_scheduler import GREEDY, SAMPLED, alone, make_scheduler, request, run_until_idle

import weightsmith
from weightsmith.kv_cache import KVCache
from weightsmith.prompt_cache import PromptCache
from weightsmith.serve import prefix, scheduler
from weightsmith.serve.prefix import Held, longest

SYSTEM = "You are a careful assistant who answers in short plain sentences about birds and rivers. "


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path):
    return weightsmith.load(tiny_hf_dir)


def spy_prefill(monkeypatch, module) -> list[int]:
    """The number of prompt tokens each call of `module.prefill` runs, from now on."""
    ran: list[int] = []
    real = module.prefill

    def spy(model, cache, prompts, device, **kw):
        ran.extend(len(p) for p in prompts)
        return real(model, cache, prompts, device, **kw)

    monkeypatch.setattr(module, "prefill", spy)
    return ran


@pytest.fixture
def prefilled(monkeypatch) -> list[int]:
    return spy_prefill(monkeypatch, scheduler)


def turn(s, prompt: list[int], params=GREEDY):
    req, got = request(prompt, params)
    s.submit(req)
    run_until_idle(s)
    assert got.finish[0] in ("length", "stop")
    return req, got.tokens[0]


@pytest.mark.parametrize("chunk", [512, 16], ids=["whole", "chunked"])
def test_the_next_turn_copies_the_last_ones_tokens_and_answers_as_alone(llm, prefilled, chunk):
    """Turn 2's prompt is turn 1's prompt, answer and a new message: everything the finished row
    held is copied (prompt and answer but the last sampled token, which no step wrote), only the
    rest is prefilled, and the answer is the one turn 2 gets alone; also for a prompt prefilled
    in chunks (its first chunk starts after the copy)."""
    s = make_scheduler(llm, max_batch=2, prefill_chunk=chunk, prompt_cache=PromptCache(64 * 2**20))
    p1 = llm.tokenizer.encode(SYSTEM + "Where do owls sleep?")
    first, g1 = turn(s, p1, replace(SAMPLED, max_tokens=9))
    assert first.cached_tokens == 0
    p2 = p1 + g1 + llm.tokenizer.encode(" And herons? Say more.")
    before = sum(prefilled)
    second, g2 = turn(s, p2)
    held = len(p1) + len(g1) - 1
    assert second.cached_tokens == held
    assert sum(prefilled) - before == len(p2) - held
    assert g2 == alone(llm, p2, GREEDY)


def test_without_a_cache_every_turn_is_prefilled_whole(llm, prefilled):
    s = make_scheduler(llm, max_batch=2)
    p1 = llm.tokenizer.encode(SYSTEM + "Where do owls sleep?")
    _, g1 = turn(s, p1)
    p2 = p1 + g1 + llm.tokenizer.encode(" And herons?")
    second, _ = turn(s, p2)
    assert second.cached_tokens == 0 and prefilled[-1] == len(p2)


def test_a_cancelled_row_is_not_kept_and_the_cache_keeps_to_its_budget(llm):
    per_token = 2 * llm.model.config.num_hidden_layers * llm.model.config.num_key_value_heads
    per_token *= llm.model.config.head_dim * 4  # fp32 keys and values of one token
    asks = [llm.tokenizer.encode(f"Question {i}: " + SYSTEM[:60]) for i in range(3)]
    assert len({len(p) for p in asks}) == 1
    held = len(asks[0]) + 3  # each finished row: its prompt and 3 of its 4 tokens
    cache = PromptCache(budget=per_token * (2 * held + held // 2))  # room for two rows
    s = make_scheduler(llm, max_batch=2, prompt_cache=cache)
    for p in asks:
        turn(s, p, replace(GREEDY, max_tokens=4))
    assert sum(e.nbytes for e in cache.entries) <= cache.budget
    # the oldest went first
    assert [e.tokens[: len(asks[0])] for e in cache.entries] == [tuple(asks[1]), tuple(asks[2])]
    cancelled, _ = request(llm.tokenizer.encode(SYSTEM + "Cancel me."), GREEDY)
    s.submit(cancelled)
    s.step()
    cancelled.cancel()
    run_until_idle(s)
    assert all(e.tokens[:20] != tuple(cancelled.prompts[0][:20]) for e in cache.entries)


def test_the_engine_keeps_a_conversation_for_its_next_turn(llm, monkeypatch):
    """`chat`'s engine: turn 2 copies turn 1's prompt and answer from the kept entry and
    prefills only the new message; the answer equals the engine's without a cache."""
    from weightsmith import generate

    ran = spy_prefill(monkeypatch, generate)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where do owls sleep?"}]
    params = llm.sampling_params(max_tokens=10, temperature=0, ignore_eos=True)
    try:
        llm.engine.prompt_cache = PromptCache(64 * 2**20)
        first = llm.engine.generate([llm.engine.chat_prompt(chat)], params)[0]
        chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And herons?"}]
        ids = llm.engine.chat_prompt(chat)
        ran.clear()
        second = llm.engine.generate([ids], params)[0]
        held = first.prompt_tokens + len(first.token_ids) - 1
        shared = len(os.path.commonprefix([llm.engine.chat_prompt(chat[:2]) + first.token_ids, ids]))
        assert shared >= prefix.MIN_SHARED and ran == [len(ids) - min(shared, held)]
    finally:
        llm.engine.prompt_cache = None
    ran.clear()
    assert second.token_ids == llm.engine.generate([ids], params)[0].token_ids
    assert ran == [len(ids)]  # without a cache: the whole conversation again


def held_cache(tokens: list[int], fill: float) -> KVCache:
    c = KVCache(2, 1, len(tokens), 1, 4, dtype=torch.float32, device="cpu")
    c.k.fill_(fill)
    c.v.fill_(-fill)
    c.set_length(0, len(tokens))
    return c


def test_entries_subsume_their_prefixes_and_lookups_respect_the_adapter():
    cache = PromptCache(budget=10**9)
    short, long = list(range(20)), list(range(30))
    cache.keep(held_cache(short, 1.0), 0, short, "a", prefix.MIN_SHARED)
    cache.keep(held_cache(long, 2.0), 0, long, "a", prefix.MIN_SHARED)
    assert [e.tokens for e in cache.entries] == [tuple(long)]  # the longer one serves both
    cache.keep(held_cache(short, 3.0), 0, short, "a", prefix.MIN_SHARED)
    assert len(cache.entries) == 1  # already held
    cache.keep(held_cache(short, 4.0), 0, short, None, prefix.MIN_SHARED)
    cache.keep(held_cache(short[:10], 5.0), 0, short[:10], None, prefix.MIN_SHARED)  # too short to keep
    assert [e.adapter for e in cache.entries] == ["a", None]
    held = [Held(e.cache, 0, e.tokens, e.adapter) for e in cache.entries]
    best, n = longest(held, long + [99], None)
    assert n == 20 and best.cache.k[0, 0, 0, 0, 0].item() == 4.0
    best, n = longest(held, long + [99], "a")
    assert n == 30 and best.cache.k[0, 0, 0, 0, 0].item() == 2.0
    assert longest(held, long, "b") == (None, 0)


openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tiny_hf_dir: Path):
    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict

    running = [
        start_server(
            config_from_dict(
                ServeConfig,
                {"model": str(tiny_hf_dir), "served_name": "tiny", "port": 0, "prompt_cache_mib": mib},
            )
        )  # fmt: skip
        for mib in (64, 0)
    ]
    yield running
    for r in running:
        r.stop()


def test_a_served_conversation_reports_its_cached_tokens(served, llm):
    """Through the official client: turn 2 of a chat says in usage.prompt_tokens_details how many
    prompt tokens came from turn 1's kept row (the shared prefix of turn 1's prompt and answer
    with turn 2's prompt), /metrics counts them, and `--prompt-cache-mib 0` reports none."""
    import httpx

    for server, on in zip(served, (True, False), strict=True):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where do owls sleep?"}]
        first = client.chat.completions.create(model="tiny", messages=chat, max_tokens=8, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        answer = first.choices[0].message.content
        chat += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And herons?"}]
        second = client.chat.completions.create(model="tiny", messages=chat, max_tokens=4, temperature=0)
        ids1 = llm.engine.chat_prompt(chat[:2])
        held = (
            ids1 + llm.engine.generate([ids1], llm.sampling_params(max_tokens=8, temperature=0))[0].token_ids
        )
        ids2 = llm.engine.chat_prompt(chat)
        shared = len(os.path.commonprefix([held[:-1], ids2]))
        assert shared >= prefix.MIN_SHARED
        assert second.usage.prompt_tokens_details.cached_tokens == (shared if on else 0)
        metrics = httpx.get(server.url + "/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("weightsmith_prompt_cached_tokens_total"))
        assert float(line.split()[-1]) == (shared if on else 0)
        alone_text = llm.chat(chat, max_tokens=4, temperature=0)
        assert second.choices[0].message.content == alone_text
