"""Embeddings: `LLM.embed`, the pooling a checkpoint names, and `serve`'s /v1/embeddings.

The vectors are checked against transformers run on each text alone (its `last_hidden_state`
pooled by hand and scaled to unit length, as sentence-transformers pools and normalises) on a
tiny Qwen3 whose norm weights are perturbed, so a skipped final norm shows; texts of different
lengths share our batches. A GGUF file's `pooling_type` and a sentence-transformers folder's
Pooling module are read (and written again by `export`), and llama.cpp's own embedding of our
export is compared where llama-cpp-python is installed. The server is driven by the official
`openai` client (which asks for base64 by default) and by plain HTTP for the errors.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SHAPE, save_perturbed_hf

import weightsmith
from weightsmith.errors import CheckpointError, UsageError

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

TEXTS = ["Hello world", "A longer sentence about the quick brown fox and the lazy dog, twice over.", "x",
         "Grüße aus Köln"]  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    config = transformers.Qwen3Config(**{**TINY_SHAPE, "head_dim": 16, "tie_word_embeddings": False})
    return save_perturbed_hf(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", config)


def with_pooling(source: Path, folder: Path, **flags: bool) -> Path:
    """A copy of `source` laid out for sentence-transformers, its Pooling module's flags `flags`."""
    shutil.copytree(source, folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))
    return folder


def transformers_vectors(path: Path, ids: list[list[int]], pooling: str) -> torch.Tensor:
    """Each text run alone through transformers' base model, pooled by hand, unit length."""
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for x in ids:
            states = model(input_ids=torch.tensor([x])).last_hidden_state[0]  # (T, h), after the final norm
            out.append({"last": states[-1], "first": states[0], "mean": states.mean(0)}[pooling])
    return F.normalize(torch.stack(out), dim=-1)


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_vectors_equal_transformers_pooled_by_hand(qwen3_dir, pooling):
    llm = weightsmith.load(qwen3_dir)
    ids = [llm.tokenizer.encode(t) for t in TEXTS]
    assert len({len(x) for x in ids}) == len(ids)  # every text a different length: padded batches
    ours = torch.tensor(llm.embed(TEXTS, pooling=pooling))
    theirs = transformers_vectors(qwen3_dir, ids, pooling)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    torch.testing.assert_close(torch.tensor(llm.embed(ids, pooling=pooling)), ours)  # token ids alike
    short = torch.tensor(llm.embed(TEXTS, pooling=pooling, dimensions=8))  # OpenAI's shortening
    torch.testing.assert_close(short, F.normalize(theirs[:, :8], dim=-1), rtol=1e-5, atol=1e-5)
    from weightsmith.embeddings import embed_ids

    one_by_one = torch.cat([embed_ids(llm.model, [x], pooling) for x in ids])
    squeezed = embed_ids(llm.model, ids, pooling, budget=1)  # every text alone: the same numbers
    torch.testing.assert_close(squeezed, one_by_one, rtol=1e-6, atol=1e-6)


def test_the_checkpoint_names_its_pooling(qwen3_dir, tmp_path):
    plain = weightsmith.load(qwen3_dir)
    assert plain.checkpoint.pooling is None  # not an embedding model's layout: the last token
    torch.testing.assert_close(
        torch.tensor(plain.embed(TEXTS)), torch.tensor(plain.embed(TEXTS, pooling="last"))
    )
    mean = weightsmith.load(with_pooling(qwen3_dir, tmp_path / "st", pooling_mode_mean_tokens=True))
    assert mean.checkpoint.pooling == "mean"
    torch.testing.assert_close(
        torch.tensor(mean.embed(TEXTS)), torch.tensor(plain.embed(TEXTS, pooling="mean"))
    )
    maxed = weightsmith.load(with_pooling(qwen3_dir, tmp_path / "max", pooling_mode_max_tokens=True))
    with pytest.raises(
        UsageError, match=r"max.*'max' pooling is not supported; use one of last, mean, first"
    ):
        maxed.embed(TEXTS)
    assert len(maxed.embed(TEXTS, pooling="last")) == len(TEXTS)  # chosen by the caller instead


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true, '
                                                              '"pooling_mode_lasttoken": true}'),
         "several pooling_mode_.* flags are true .last, mean.; exactly one must be"),
        (lambda d: (d / "1_Pooling" / "config.json").write_text("{}"), "no pooling_mode_.* flags are true"),
        (lambda d: (d / "1_Pooling" / "config.json").write_text("{oops"), "not valid JSON"),
        (lambda d: (d / "modules.json").write_text(json.dumps(
            [{"path": "../elsewhere", "type": "sentence_transformers.models.Pooling"}])),
         "the Pooling module's path '../elsewhere' is not a folder inside the checkpoint"),
        (lambda d: (d / "modules.json").write_text("[" + " " * 70_000 + "]"), "too large"),
        (lambda d: ((d / "1_Pooling" / "config.json").unlink(), (d / "1_Pooling" / "config.json").symlink_to(
            d.parent / "outside.json"), (d.parent / "outside.json").write_text("{}")),
         "links outside the checkpoint's folder"),
    ],
)  # fmt: skip
def test_a_bad_sentence_transformers_layout_is_one_line_before_the_weights(
    qwen3_dir, tmp_path, change, message
):
    folder = with_pooling(qwen3_dir, tmp_path / "bad", pooling_mode_lasttoken=True)
    change(folder)
    (folder / "model.safetensors").write_bytes(b"not read")  # the error comes first
    with pytest.raises(CheckpointError, match=message) as err:
        weightsmith.load(folder)
    assert "\n" not in str(err.value)


def test_export_keeps_the_pooling_and_llama_cpp_embeds_alike(qwen3_dir, tmp_path):
    from weightsmith.checkpoint.gguf import meta, open_gguf
    from weightsmith.checkpoint.gguf_write import export_gguf

    folder = with_pooling(qwen3_dir, tmp_path / "st", pooling_mode_lasttoken=True)
    out = tmp_path / "emb.gguf"
    export_gguf(folder, out, "f32")
    assert meta(open_gguf(out), "qwen3.pooling_type") == 3  # llama.cpp's LLAMA_POOLING_TYPE_LAST
    from weightsmith.checkpoint.describe import inspect_checkpoint

    assert inspect_checkpoint(out)["pooling"] == inspect_checkpoint(folder)["pooling"] == "last"  # `info`
    assert inspect_checkpoint(qwen3_dir)["pooling"] is None
    gguf_llm = weightsmith.load(out)
    assert gguf_llm.checkpoint.pooling == "last"
    ours = torch.tensor(gguf_llm.embed(TEXTS))
    torch.testing.assert_close(
        ours, torch.tensor(weightsmith.load(folder).embed(TEXTS)), rtol=1e-5, atol=1e-5
    )
    llama_cpp = pytest.importorskip("llama_cpp")
    llama = llama_cpp.Llama(model_path=str(out), embedding=True, n_ctx=256, n_threads=2, verbose=False)
    theirs = torch.tensor([llama.embed(t, normalize=True) for t in TEXTS])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ---- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(qwen3_dir, tmp_path_factory):
    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict

    cfg = config_from_dict(ServeConfig, {"model": str(qwen3_dir), "served_name": "tiny", "port": 0,
                                         "max_model_len": 64, "prefill_chunk": 16, "pooling": "mean"})  # fmt: skip
    running = start_server(cfg)
    yield running
    running.stop()


def ids_of(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(text)


def embedded(server) -> float:
    found = re.search(
        r"^weightsmith_embedding_tokens_total ([0-9.e+]+)$", httpx.get(server.url + "/metrics").text, re.M
    )
    return float(found.group(1)) if found else 0.0


def test_the_openai_client_gets_the_vectors(server, qwen3_dir):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    llm = weightsmith.load(qwen3_dir)
    before = embedded(server)
    expected = torch.tensor(llm.embed(TEXTS, pooling="mean"))
    got = client.embeddings.create(model="tiny", input=TEXTS)  # base64, decoded by the client
    assert [d.index for d in got.data] == [0, 1, 2, 3] and got.model == "tiny"
    torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), expected, rtol=1e-5, atol=1e-6)
    tokens = sum(len(llm.tokenizer.encode(t)) for t in TEXTS)
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    floats = client.embeddings.create(model="tiny", input=TEXTS[1], encoding_format="float", dimensions=16)
    torch.testing.assert_close(
        torch.tensor(floats.data[0].embedding), F.normalize(expected[1, :16], dim=0), rtol=1e-5, atol=1e-6
    )
    ids = client.embeddings.create(model="tiny", input=[llm.tokenizer.encode(t) for t in TEXTS[:2]])
    torch.testing.assert_close(
        torch.tensor([d.embedding for d in ids.data]), expected[:2], rtol=1e-5, atol=1e-6
    )
    raw = httpx.post(
        server.url + "/v1/embeddings", json={"model": "tiny", "input": "x", "encoding_format": "base64"}
    )
    vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(vector.copy()), expected[2], rtol=1e-5, atol=1e-6)
    sent = (
        tokens
        + len(ids_of(llm, TEXTS[1]))
        + sum(len(ids_of(llm, t)) for t in TEXTS[:2])
        + len(ids_of(llm, "x"))
    )
    assert embedded(server) - before == sent  # /metrics counts every embedded token


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"model": "tiny", "input": ""}, "input", "input is empty"),
        ({"model": "tiny", "input": ["a", ""]}, "input[1]", r"input\[1\] is empty"),
        ({"model": "tiny", "input": []}, "input", "input must not be empty"),
        ({"model": "tiny", "input": [[1, 2], [5, 99999]]}, "input[1]", "token id 99999 is outside the vocabulary"),
        ({"model": "tiny", "input": "word " * 80}, "input", "tokens, over this server's context of 64"),
        ({"model": "tiny", "input": ["a"] * 2049}, "input", "2049 inputs, over the limit of 2048"),
        ({"model": "tiny", "input": "a", "dimensions": 65}, "dimensions", "dimensions 65 is over the model's 64"),
        ({"model": "tiny", "input": "a", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
        ({"model": "tiny", "input": "a", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"model": "tiny", "input": {"text": "a"}}, "input", "expected a string, a list of strings"),
        ({"model": "other", "input": "a"}, "model", "the model 'other' does not exist"),
        ({"input": "a"}, "model", "missing required parameter 'model'"),
    ],
)  # fmt: skip
def test_bad_requests_are_4xx_naming_the_field(server, body, param, message):
    r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == (404 if body.get("model") == "other" else 400), r.text
    error = r.json()["error"]
    assert error["param"] == param and re.search(message, error["message"]), error
    assert "\n" not in error["message"]


def test_embeddings_interleave_with_a_running_stream(server):
    """Long embedding work runs in --prefill-chunk calls between decode steps: a stream started
    before it keeps its tokens coming, and both finish."""
    import threading

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    done: list[str] = []

    def chat() -> None:
        stream = client.completions.create(
            model="tiny", prompt="Once", max_tokens=40, temperature=0, stream=True
        )
        done.append("".join(c.choices[0].text for c in stream))

    talker = threading.Thread(target=chat)
    talker.start()
    got = client.embeddings.create(model="tiny", input=["word " * 12] * 40)
    talker.join(60)
    assert len(got.data) == 40 and done and len(done[0]) > 0
    vectors = torch.tensor([d.embedding for d in got.data])
    torch.testing.assert_close(vectors, vectors[:1].expand_as(vectors))  # the same text, the same vector


def test_an_adapter_embeds_as_its_merged_model(qwen3_dir, tmp_path):
    """`adapter=` runs one loaded LoRA adapter alone (what `model: BASE:NAME` asks the server
    for); without it the base model embeds, whatever adapter is active."""
    from weightsmith.lora import LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter, set_adapter

    llm = weightsmith.load(qwen3_dir)
    base = torch.tensor(llm.embed(TEXTS))
    cfg = LoraConfig(r=4, alpha=8)
    apply_lora(llm.model, cfg, "a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            layer.lora_B["a"].weight.copy_(torch.randn(layer.lora_B["a"].weight.shape, generator=g) * 0.3)
    saved = save_adapter(llm.model, tmp_path / "a", cfg, name="a")
    served = weightsmith.load(qwen3_dir)
    load_adapter(served.model, saved, name="a")
    set_adapter(served.model, "a")  # active, as a request for it would leave it
    merged = weightsmith.load(qwen3_dir, adapter=str(saved))
    adapted = torch.tensor(served.embed(TEXTS, adapter="a"))
    torch.testing.assert_close(adapted, torch.tensor(merged.embed(TEXTS)), rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor(served.embed(TEXTS)), base, rtol=1e-5, atol=1e-6)


def test_serve_refuses_a_pooling_it_does_not_compute(capsys):
    from weightsmith.cli.main import main

    code = main(["serve", "no-such-model", "--pooling", "max"])  # checked before any model is looked for
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err == [
        "weightsmith serve: error: --pooling: expected one of last, mean, first, got 'max'"
    ]
