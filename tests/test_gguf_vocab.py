"""SentencePiece-style vocabularies (Llama 2, Mistral, Gemma, Phi-3: "▁" for spaces, byte
fallback) written to GGUF as llama.cpp's "llama" vocabulary, with scores from the merges
(checkpoint/gguf_vocab.py). A tokenizer of that kind is trained here; the file we write must
tokenize every sample as the source tokenizer does, in our reader, in transformers' GGUF reader
and in llama.cpp (where llama-cpp-python is installed), and read back from GGUF it must write the
same vocabulary again. Tokenizers llama.cpp cannot express are refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import tokenizers
import torch
from conftest import TINY_SHAPE
from test_gguf import SAMPLES, hf_gguf_tokenizer
from test_tokenizer import CORPUS, SP_CONFIG, build_sentencepiece_style, write_dir

from weightsmith.checkpoint.gguf_write import export_gguf
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.errors import CheckpointError

transformers = pytest.importorskip("transformers")

#: The training text (long merge chains), others, runs of spaces and characters it never had (bytes).
TEXTS = [*CORPUS[:-1], *SAMPLES, "tabs\tand  two\nnewlines ", "🤗 日本 ∮ 𝔘"]
#: Text that starts with a space: SentencePiece and llama.cpp put "▁" before it all the same,
#: transformers' Metaspace (prepend_scheme "first") does not. The file follows llama.cpp.
LEADING = "  two leading spaces"


def _source(path: Path, backend: tokenizers.Tokenizer) -> Path:
    write_dir(path, backend, SP_CONFIG)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_SHAPE, "vocab_size": backend.get_vocab_size() + 5})
    transformers.LlamaForCausalLM(config).save_pretrained(path)  # 5 rows past the tokenizer: padding
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spm")
    src = _source(root / "src", build_sentencepiece_style())
    export_gguf(src, root / "m.gguf", "f32")
    return src, root / "m.gguf"


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def test_the_file_holds_a_sentencepiece_vocabulary(exported) -> None:
    src, path = exported
    meta = _fields(path)
    backend = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    n = backend.get_vocab_size()
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.scores"]) == n + 5
    types = meta["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # <unk>, then <s> and </s> as control tokens
    assert types[3:259] == [6] * 256 and meta["tokenizer.ggml.tokens"][3] == "<0x00>"  # byte tokens
    assert types[n:] == [5] * 5  # the embedding's extra rows: unused placeholders
    assert meta["tokenizer.ggml.add_space_prefix"] is True  # Metaspace prepends "▁"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1
    # A merged token scores above every token no merge makes; earlier merges score higher.
    scores = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], strict=True))
    merges = json.loads(backend.to_str())["model"]["merges"]
    made = ["".join(m.split(" ") if isinstance(m, str) else m) for m in merges]
    assert scores[made[0]] > scores[made[len(made) // 2]] > scores["<0x41>"]


def test_every_reader_tokenizes_as_the_source(exported) -> None:
    src, path = exported
    source = load_checkpoint(src).tokenizer
    ours = load_checkpoint(path).tokenizer
    theirs = hf_gguf_tokenizer(path)
    for text in TEXTS:
        ids = source.encode(text)
        assert ours.encode(text) == ids, text
        assert theirs.encode(text) == ids, text
        assert ours.decode(ids) == source.decode(ids), text


def test_llama_cpp_tokenizes_as_the_source(exported) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    src, path = exported
    source, ours = load_checkpoint(src).tokenizer, load_checkpoint(path).tokenizer
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, vocab_only=True)
    try:
        for text in TEXTS:
            assert llama.tokenize(text.encode(), add_bos=True, special=True) == source.encode(text), text
        theirs = llama.tokenize(LEADING.encode(), add_bos=True, special=True)
    finally:
        llama.close()
    assert theirs == ours.encode(LEADING) != source.encode(LEADING)


def test_a_gguf_vocabulary_is_written_again_as_it_was(exported, tmp_path) -> None:
    """Exported from a GGUF file (whose tokenizer we rebuilt from its scores), the vocabulary is the
    same: tokens, types and the order its scores put the tokens in."""
    _, path = exported
    again = tmp_path / "again.gguf"
    export_gguf(path, again, "f32")
    first, second = _fields(path), _fields(again)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix"):
        assert second[key] == first[key], key

    def order(meta: dict) -> list[int]:
        scores = meta["tokenizer.ggml.scores"]
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))

    assert order(second) == order(first)
    ours = load_checkpoint(again).tokenizer
    source = load_checkpoint(path).tokenizer
    for text in TEXTS:
        assert ours.encode(text) == source.encode(text), text


def _with(backend: tokenizers.Tokenizer, **parts) -> tokenizers.Tokenizer:
    for name, value in parts.items():
        setattr(backend, name, value)
    return backend


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(pre_tokenizer=tokenizers.pre_tokenizers.Whitespace()),
            "Whitespace pre-tokenizer cannot be written to a GGUF SentencePiece vocabulary",
        ),
        (
            dict(normalizer=tokenizers.normalizers.Lowercase()),
            "Lowercase normalizer cannot be written to a GGUF SentencePiece vocabulary",
        ),
    ],
)
def test_what_llama_cpp_cannot_express_is_refused(change, message, tmp_path) -> None:
    src = _source(tmp_path / "src", _with(build_sentencepiece_style(), **change))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message):
        export_gguf(src, out / "m.gguf", "f32")
    assert not out.exists() or not any(out.iterdir())


def test_a_unigram_tokenizer_is_refused(tmp_path) -> None:
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), *((c, -1.0) for c in "abcdefghij ")]
    backend = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=0))
    src = _source(tmp_path / "src", backend)
    with pytest.raises(CheckpointError, match="only byte-level BPE and SentencePiece-style BPE"):
        export_gguf(src, tmp_path / "out" / "m.gguf", "f32")


def _written(cls: type, path: Path, arrays: dict) -> bytes:
    writer = cls(str(path), "llama")
    for key, (values, sub_type) in arrays.items():
        writer.add_key_value(key, values, gguf.GGUFValueType.ARRAY, sub_type=sub_type)
    writer.add_string("a.plain", "not an array")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()


def test_the_writer_packs_arrays_as_gguf_py_does(tmp_path) -> None:
    """Our writer's one-pass arrays are gguf-py's bytes, for every item type it packs itself;
    a mixed array still fails as gguf-py fails it."""
    from weightsmith.checkpoint.gguf_vocab import GGUFWriter

    VT = gguf.GGUFValueType
    arrays = {
        "a.strings": (["", "▁héllo", "<0x0A>", "x" * 300, "🤗"], None),
        "a.ints": ([0, -5, 2**31 - 1, 7], None),
        "a.floats": ([0.0, -1.5, 3.25e-8, -262143.0], None),
        "a.u32": ([0, 1, 2**32 - 1], VT.UINT32),
        "a.i64": ([-(2**40), 2**40], VT.INT64),
        "a.f64": ([0.1, -2.5], VT.FLOAT64),
        "a.u8": ([0, 255], VT.UINT8),
        "a.bools": ([True, False, True], None),  # gguf-py's own packing
    }
    ours = _written(GGUFWriter, tmp_path / "ours.gguf", arrays)
    assert ours == _written(gguf.GGUFWriter, tmp_path / "theirs.gguf", arrays)
    for cls in (GGUFWriter, gguf.GGUFWriter):
        with pytest.raises(ValueError, match="same type"):
            _written(cls, tmp_path / f"mixed-{cls.__module__}.gguf", {"a.mixed": ([1, 2.0], None)})
