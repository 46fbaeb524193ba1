"""Our GGUF exports in llama.cpp itself (through llama-cpp-python, where it is installed).

llama-cpp-python compiles llama.cpp from source, which takes a quarter of an hour on two
cores, so it is not a test dependency: `pip install llama-cpp-python` to run these. What is
checked on the real default model exported as F16: llama.cpp loads the file, tokenizes text
(ASCII, accents, emoji, the chat template's special tokens) to the ids our tokenizer gives,
and its greedy continuation of a chat prompt is the same tokens as ours.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import weightsmith
from weightsmith.checkpoint.gguf_write import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = ["Hello world", "Grüße aus Köln, ça va?", "emoji 🙂 and 你好", "<|im_start|>user\nHi<|im_end|>\n"]


@pytest.fixture(scope="module")
def exported(default_gguf: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llamacpp") / "smol-f16.gguf"
    export_gguf(default_gguf, out, "f16")
    return out


@pytest.fixture(scope="module")
def llama(exported: Path):
    return llama_cpp.Llama(model_path=str(exported), n_ctx=512, n_threads=2, verbose=False, logits_all=False)


def test_llama_cpp_tokenizes_like_us(exported: Path, llama) -> None:
    ours = weightsmith.load(exported).tokenizer
    for text in TEXTS:
        theirs = llama.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == ours.encode(text, add_special_tokens=False), text


def test_llama_cpp_greedy_tokens_equal_ours_for_f16(exported: Path, llama) -> None:
    ws = weightsmith.load(exported)
    prompt = ws.engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    ours = ws.engine.generate([prompt], ws.sampling_params(temperature=0, max_tokens=16))[0].token_ids
    theirs = []
    for token in llama.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours
