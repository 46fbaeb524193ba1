"""The second catalog model, Gemma 3 270M (Q4_K_M GGUF with Q4_K, Q6_K, Q5_0 and Q8_0 tensors),
against transformers' own GGUF load: the same tokens, logits within 1e-3 (also past the
512-token sliding window) and the same greedy text, through `ws.load` as a user runs it.

Skips when the model is not in the user's store: tests never download it, and it is pulled
only with `weightsmith pull gemma3-270m --accept-license` (Gemma Terms of Use). Slow: transformers
dequantizes the whole file in Python (about a minute on two shared cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_logits_match, user_store_model

import weightsmith as ws
from weightsmith.errors import WeightsmithError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Les modèles ouverts permettent 🙂"]


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    try:
        return user_store_model("gemma3-270m", auto_pull=False)
    except WeightsmithError:
        pytest.skip("gemma3-270m is not pulled (weightsmith pull gemma3-270m --accept-license)")


@pytest.fixture(scope="module")
def ours(gemma_gguf):
    return ws.load(str(gemma_gguf))


@pytest.fixture(scope="module")
def reference(gemma_gguf):
    kw = dict(gguf_file=gemma_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent), dtype=torch.float32, **kw
    )
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(gemma_gguf.parent), **kw)


def test_logits_match_transformers_gguf_load(ours, reference):
    model, tok = reference
    assert ours.model.config.model_type == "gemma3_text"
    assert_logits_match(ours, model, tok, PROMPTS)


def test_logits_match_past_the_sliding_window(ours, reference):
    model, tok = reference
    ids = tok(" ".join(["Open weights let people run, study and adapt models on their own machines."] * 48),
              return_tensors="pt").input_ids[:, :600]  # fmt: skip
    assert ids.shape[1] == 600 > ours.model.config.sliding_window
    last = torch.arange(590, 600)
    with torch.no_grad():
        ref = model(ids, logits_to_keep=10).logits[0]  # (10, V)
        got = ours.model.logits(ours.model.hidden_states(ids)[0, last])
    assert (got - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("text", PROMPTS[:2])
def test_greedy_generation_matches_transformers(ours, reference, text):
    model, tok = reference
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    ref_text = tok.decode(ref, skip_special_tokens=True)
    assert ours.generate(text, max_tokens=24, temperature=0) == ref_text


def test_f16_export_runs_in_llama_cpp_with_our_tokens(gemma_gguf, tmp_path):
    """The file we write (a SentencePiece vocabulary scored from the merges, gguf_vocab.py) in
    llama.cpp: its tokens for each prompt and a chat turn, and its greedy continuation, are ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from weightsmith.checkpoint.gguf_write import export_gguf

    out = tmp_path / "gemma-f16.gguf"
    export_gguf(gemma_gguf, out, "f16")
    exported = ws.load(str(out))
    llama = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    try:
        for text in [*PROMPTS, "<start_of_turn>user\nHi<end_of_turn>\n"]:
            assert llama.tokenize(text.encode(), add_bos=True, special=True) == exported.tokenizer.encode(
                text
            )
        want = exported.engine.generate([PROMPTS[0]], exported.sampling_params(temperature=0, max_tokens=16))
        got = []
        for token in llama.generate(
            llama.tokenize(PROMPTS[0].encode(), add_bos=True), temp=0.0, top_k=1, repeat_penalty=1.0
        ):
            got.append(token)
            if len(got) == 16:
                break
    finally:
        llama.close()
    assert got == want[0].token_ids
