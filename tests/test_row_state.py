"""One finish rule for every token loop: `finish_reason` on its own, and the generator and the
server's scheduler ending rows by it alike (stop tokens, stop strings, max tokens, a full cache)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_scheduler import GREEDY, make_scheduler, prompts, request, run_until_idle

import weightsmith
from weightsmith import row_state
from weightsmith.generate import TokenGenerator
from weightsmith.row_state import TextStream, finish_reason
from weightsmith.sampling import SamplingParams

EOS = frozenset({2})


def test_finish_reason():
    sp = SamplingParams(max_tokens=5, stop_token_ids=[9])
    assert finish_reason(7, 1, sp, EOS, room=10) is None
    assert finish_reason(2, 1, sp, EOS, room=10) == "stop"  # end of sequence
    assert finish_reason(2, 1, replace(sp, ignore_eos=True), EOS, room=10) is None
    assert finish_reason(9, 1, replace(sp, ignore_eos=True), EOS, room=10) == "stop"  # a stop token
    assert finish_reason(7, 5, sp, EOS, room=10) == "length"  # max_tokens
    assert finish_reason(7, 1, sp, EOS, room=1) == "length"  # the cache takes no token after this one
    assert finish_reason(2, 5, sp, EOS, room=1) == "stop"  # a stop outranks length


@pytest.fixture(scope="module")
def llm(tiny_hf_dir: Path):
    return weightsmith.load(tiny_hf_dir)


def _generator(llm, prompt, params, **kw) -> TokenGenerator:
    gen = TokenGenerator(
        llm.model, [prompt], [params], eos_token_ids=llm.engine.eos_token_ids,
        decode=llm.engine.decode_step(), texts=[TextStream(llm.tokenizer, params.stop)], **kw,
    )  # fmt: skip
    for _ in gen:
        pass
    return gen


def _scheduled(llm, prompt, params, **kw):
    s = make_scheduler(llm, **kw)
    r, got = request(prompt, params)
    s.submit(r)
    run_until_idle(s)
    return got


def test_both_loops_end_rows_by_the_one_rule(llm, monkeypatch):
    """Patch the rule: the generator and the scheduler both follow it."""
    monkeypatch.setattr(
        row_state, "finish_reason", lambda token, generated, *_: "custom" if generated == 3 else None
    )
    p = prompts(llm, 1)[0]
    gen = _generator(llm, p, GREEDY)
    got = _scheduled(llm, p, GREEDY)
    assert gen.finished == ["custom"] and len(gen.generated[0]) == 3
    assert got.finish == ["custom"] and got.tokens[0] == gen.generated[0]


def test_both_loops_end_a_row_the_same_way(llm):
    p = prompts(llm, 1)[0]
    full = _generator(llm, p, replace(GREEDY, max_tokens=12))
    tokens, text = full.generated[0], full.rows[0].text.text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    cases = {
        "stop token": (replace(GREEDY, stop_token_ids=[tokens[4]]), {}),
        "stop string": (replace(GREEDY, stop=[stop]), {}),
        "max tokens": (replace(GREEDY, max_tokens=5), {}),
        "cache full": (GREEDY, {"max_len": len(p) + 4}),
    }
    for name, (params, kw) in cases.items():
        gen = _generator(llm, p, params, **kw)
        got = _scheduled(llm, p, params, **kw)
        assert got.finish == gen.finished, name
        assert got.tokens[0] == gen.generated[0], name
        assert got.text[0] == gen.rows[0].text.text, name
    assert _generator(llm, p, cases["cache full"][0], max_len=len(p) + 4).finished == ["length"]
