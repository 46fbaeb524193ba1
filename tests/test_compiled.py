"""`--compile`: the static-shape decode step gives the eager step's logits and tokens, and a
compiler that cannot run falls back to eager decoding with one warning."""

from __future__ import annotations

import logging

import pytest
import torch

import weightsmith
from weightsmith import compiled
from weightsmith.compiled import CompiledDecode
from weightsmith.generate import TokenGenerator, decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_hf_dir):
    return weightsmith.load(tiny_hf_dir)


def test_static_step_equals_the_eager_step(llm):
    """Rows of different lengths in a cache larger than they need: attending over the whole
    cache with a position mask gives the eager step's logits (the step itself run eagerly
    here, so the check is about the static shapes, not the compiler)."""
    model = llm.model
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]

    def run(step):
        cache = KVCache.for_model(model.config, 3, 40, dtype=torch.float32, device="cpu")
        logits = prefill(model, cache, prompts, torch.device("cpu"))
        out = []
        tokens = logits.argmax(-1).tolist()
        for _ in range(6):
            logits = step(model, cache, tokens, torch.device("cpu"))
            out.append(logits)
            tokens = logits.argmax(-1).tolist()
        return torch.stack(out), cache.lengths

    static = CompiledDecode(decode_one_token)
    static._fn = lambda model, cache, ids, positions: compiled._static_step(model, cache, ids, positions)
    eager_logits, eager_lengths = run(decode_one_token)
    static_logits, static_lengths = run(static)
    assert static.failed is None and static_lengths == eager_lengths
    torch.testing.assert_close(static_logits, eager_logits, rtol=1e-5, atol=1e-5)


def test_a_failing_compiler_falls_back_to_eager(llm, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_DECODERS", {})
    params = [SamplingParams(temperature=0, max_tokens=6)]
    eos = llm.engine.eos_token_ids
    eager = [
        ev.token for evs in TokenGenerator(llm.model, [[5, 6, 7]], params, eos_token_ids=eos) for ev in evs
    ]
    with caplog.at_level(logging.WARNING, logger="weightsmith.compiled"):
        gen = TokenGenerator(llm.model, [[5, 6, 7]], params, eos_token_ids=eos, compile=True)
        tokens = [ev.token for evs in gen for ev in evs]
    assert tokens == eager
    assert gen.decode.failed == "RuntimeError: no C++ compiler found"
    assert sum("decoding eagerly" in r.getMessage() for r in caplog.records) == 1


def test_compiled_generation_matches_eager(llm):
    """The real compiler (inductor on CPU): the same greedy tokens as eager decoding."""
    prompts = ["Once upon a time", "The cat"]
    params = llm.sampling_params(temperature=0, max_tokens=8, repetition_penalty=1.0)
    eager = [c.token_ids for c in llm.engine.generate(prompts, params)]
    llm.engine.compile = True
    try:
        compiled_out = [c.token_ids for c in llm.engine.generate(prompts, params)]
    finally:
        llm.engine.compile = False
    decoder = compiled._DECODERS.get("cpu")
    if decoder is not None and decoder.failed:
        pytest.skip(f"torch.compile cannot run here: {decoder.failed}")
    assert compiled_out == eager


def test_generate_compile_flag(tiny_hf_dir, capsys):
    import json

    from weightsmith.cli.main import main

    texts = []
    for extra in ([], ["--compile"]):
        assert main(["generate", str(tiny_hf_dir), "-p", "Once upon", "--temperature", "0", "-n", "5", "--json",
                     *extra]) == 0  # fmt: skip
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1]
