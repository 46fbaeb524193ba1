"""End-to-end checks on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF):
logits, greedy text and chat template against transformers' own GGUF loading, and
the GGUF -> HF directory round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_logits_match

import weightsmith as ws
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.save import save_hf_dir
from weightsmith.cpu_decode import prepare_cpu_decode

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Les modèles ouverts permettent 🙂",
]


@pytest.fixture(scope="module")
def ours(default_gguf):
    return ws.load(str(default_gguf))


@pytest.fixture(scope="module")
def reference(hf_default_model, hf_default_tokenizer):
    return hf_default_model, hf_default_tokenizer


def test_logits_match_transformers_gguf_load(ours, reference):
    model, tok = reference
    assert_logits_match(ours, model, tok, PROMPTS)


def test_greedy_generation_matches_transformers(ours, reference):
    model, tok = reference
    text = PROMPTS[0]
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    ref_text = tok.decode(ref, skip_special_tokens=True)
    assert ours.generate(text, max_tokens=24, temperature=0) == ref_text


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, with an emoji 🎨 and accents: é à ü"},
    ],
]


@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_equals_apply_chat_template(ours, reference, gen_prompt):
    _, tok = reference
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
        got = ours.tokenizer.apply_chat_template(conv, add_generation_prompt=gen_prompt)
        assert got == want
        want_ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen_prompt)
        if isinstance(want_ids, dict) or hasattr(want_ids, "input_ids"):
            want_ids = want_ids["input_ids"]
        assert (
            ours.tokenizer.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True)
            == want_ids
        )


def test_gguf_to_hf_dir_round_trip(default_gguf, ours, tmp_path):
    out = save_hf_dir(ours.model, ours.tokenizer, tmp_path / "smol-hf")
    again = load_checkpoint(out)
    prepare_cpu_decode(again.model)  # laid out as `ours` is by its engine, so both compute alike
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS[1])])
    with torch.no_grad():
        base = ours.model(ids)
        assert torch.equal(again.model(ids), base)
    assert again.tokenizer.encode(PROMPTS[2]) == ours.tokenizer.encode(PROMPTS[2])
    assert again.tokenizer.chat_template == ours.tokenizer.chat_template

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(PROMPTS[2]).input_ids == ours.tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        assert (hf(ids).logits - base).abs().max().item() <= 1e-4


def test_chat_stream_yields_text_and_batched_equals_single(ours):
    msgs = [{"role": "user", "content": "Say hello."}]
    streamed = "".join(ours.chat(msgs, stream=True, max_tokens=12, temperature=0))
    assert streamed and streamed == ours.chat(msgs, max_tokens=12, temperature=0)
    prompts = ["Paris is", "The largest planet in the solar system is called"]
    batch = ours.generate(prompts, max_tokens=10, temperature=0)
    assert batch == [ours.generate(p, max_tokens=10, temperature=0) for p in prompts]
