"""GGUF reading: parity with transformers' own GGUF loader on the real default model, and round
trips through GGUF files written here with `gguf.GGUFWriter` from tiny random models.

The tiny files are written the way llama.cpp's converter writes them (HF -> GGUF names, Q/K rows
permuted for llama), using a name map and permutation written in this file, so the reader's
inverse map and `unpermute_qk` are checked against an independent forward implementation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from weightsmith.checkpoint.gguf import hf_tensor_name, open_gguf, read_gguf, unpermute_qk
from weightsmith.checkpoint.gguf_tensors import iter_gguf_tensors
from weightsmith.checkpoint.gguf_tokenizer import PRE_TOKENIZER_SPLITS, build_gguf_tokenizer
from weightsmith.errors import CheckpointError

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------------------------------------
# Writing GGUF files the way llama.cpp's converter does


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation (HF half-split rope -> ggml pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF module name (inside a layer) -> GGUF tensor name, as in gguf-py's tensor_mapping.py.
HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "block_sparse_moe.gate": "ffn_gate_inp",
}
HF_TO_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
EXPERT_TO_GGUF = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module in HF_TO_GGUF_GLOBAL:
        return f"{HF_TO_GGUF_GLOBAL[module]}.{suffix}"
    parts = module.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    if rest.startswith("block_sparse_moe.experts."):
        expert, w = parts[5], parts[6]
        return f"blk.{layer}.{EXPERT_TO_GGUF[w]}.{expert}.{suffix}"
    return f"blk.{layer}.{HF_TO_GGUF_LAYER[rest]}.{suffix}"


def to_gguf_tensors(state: dict[str, torch.Tensor], config: dict, permute: bool) -> dict[str, np.ndarray]:
    """HF state dict -> GGUF-named numpy arrays, Q/K permuted when the arch is llama."""
    out = {}
    for name, tensor in state.items():
        w = tensor.detach().float().numpy()
        if permute and ".q_proj." in name:
            w = llama_cpp_permute(w, config["num_attention_heads"])
        if permute and ".k_proj." in name:
            w = llama_cpp_permute(w, config["num_key_value_heads"])
        out[gguf_name(name)] = w
    return out


# config field -> the GGUFWriter method writing its llama.cpp key ({arch}.context_length, ...)
CONFIG_KEYS = {
    "max_position_embeddings": "add_context_length",
    "hidden_size": "add_embedding_length",
    "intermediate_size": "add_feed_forward_length",
    "num_hidden_layers": "add_block_count",
    "num_attention_heads": "add_head_count",
    "num_key_value_heads": "add_head_count_kv",
    "rms_norm_eps": "add_layer_norm_rms_eps",
    "rope_theta": "add_rope_freq_base",
    "vocab_size": "add_vocab_size",
    "num_local_experts": "add_expert_count",
    "num_experts_per_tok": "add_expert_used_count",
}


def write_gguf(
    path: Path,
    arch: str,
    config: dict,
    tensors: dict[str, np.ndarray],
    qtype: QT = QT.F32,
    tokenizer: dict | None = None,
    name: str = "tiny",
    file_type: int | str | None = None,
) -> Path:
    """A GGUF file with llama.cpp's metadata keys (those of `config` that are not None);
    float matrices stored as `qtype`, float vectors as F32, integer arrays as they are;
    `general.file_type` when given (a string to make a bad file)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    if isinstance(file_type, int):
        writer.add_file_type(file_type)
    elif file_type is not None:
        writer.add_string("general.file_type", file_type)
    for key, method in CONFIG_KEYS.items():
        if config.get(key) is not None:
            getattr(writer, method)(config[key])
    if tokenizer:
        add_tokenizer_metadata(writer, tokenizer)
    for tensor_name, w in tensors.items():
        if w.dtype.kind != "f":
            writer.add_tensor(tensor_name, w)
        elif w.ndim >= 2 and qtype != QT.F32:
            writer.add_tensor(tensor_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer_metadata(writer: gguf.GGUFWriter, tok: dict) -> None:
    writer.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if "scores" in tok:
        writer.add_token_scores(tok["scores"])
    if "merges" in tok:
        writer.add_token_merges(tok["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if f"{key}_id" in tok:
            getattr(writer, f"add_{key}_token_id")(tok[f"{key}_id"])
    if "add_bos" in tok:
        writer.add_add_bos_token(tok["add_bos"])


# ---------------------------------------------------------------------------------------------
# Tiny random models


TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,  # multiple of 32: Q8_0 blocks run along the input dimension
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def tiny_model(family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, HF state dict) of a tiny random transformers model."""
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))
    state = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    # Random init leaves norms at exactly 1.0: give them values a mix-up would show.
    for name, tensor in state.items():
        if tensor.ndim == 1:
            state[name] = torch.randn_like(tensor)
    return dict(TINY), state


def hf_rope_theta(config) -> float:
    """rope_theta from a transformers config (v5 moved it into `rope_parameters`)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta", getattr(config, "rope_theta", None))


def tiny_mixtral(n_experts: int = 4) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, HF on-disk state dict) of a tiny Mixtral, built directly under its HF names."""
    config = dict(TINY, num_local_experts=n_experts, num_experts_per_tok=2)
    h, f, n_kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]
    head_dim = h // config["num_attention_heads"]
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    state = {"model.embed_tokens.weight": rand(config["vocab_size"], h), "model.norm.weight": rand(h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        state.update(
            {
                f"{p}.input_layernorm.weight": rand(h),
                f"{p}.post_attention_layernorm.weight": rand(h),
                f"{p}.self_attn.q_proj.weight": rand(h, h),
                f"{p}.self_attn.k_proj.weight": rand(n_kv * head_dim, h),
                f"{p}.self_attn.v_proj.weight": rand(n_kv * head_dim, h),
                f"{p}.self_attn.o_proj.weight": rand(h, h),
                f"{p}.block_sparse_moe.gate.weight": rand(n_experts, h),
            }
        )
        for e in range(n_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            state.update(
                {f"{q}.w1.weight": rand(f, h), f"{q}.w3.weight": rand(f, h), f"{q}.w2.weight": rand(h, f)}
            )
    state["lm_head.weight"] = rand(config["vocab_size"], h)
    return config, state


def merge_experts(tensors: dict[str, np.ndarray], n_layers: int, n_experts: int) -> dict[str, np.ndarray]:
    """Per-expert GGUF tensors -> llama.cpp's newer merged `ffn_*_exps` (n_expert, out, in) form."""
    out = {k: v for k, v in tensors.items() if not any(f".{e}.weight" in k for e in range(n_experts))}
    for i in range(n_layers):
        for kind in EXPERT_TO_GGUF.values():
            experts = [tensors[f"blk.{i}.{kind}.{e}.weight"] for e in range(n_experts)]
            out[f"blk.{i}.{kind}_exps.weight"] = np.stack(experts)
    return out


# ---------------------------------------------------------------------------------------------
# Round trips through tiny files


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0], ids=["F32", "Q8_0"])
def test_tiny_round_trip(tmp_path: Path, family: str, qtype: QT) -> None:
    config, state = tiny_model(family)
    tensors = to_gguf_tensors(state, config, permute=family == "llama")
    path = write_gguf(tmp_path / "tiny.gguf", family, config, tensors, qtype)

    loaded = dict(iter_gguf_tensors(path))
    assert set(loaded) == set(state)
    for name, original in state.items():
        got = loaded[name]
        assert got.shape == original.shape, name
        if qtype == QT.F32 or original.ndim == 1:
            assert torch.equal(got, original), name
        else:
            # Q8_0: one fp16 scale per 32 values, codes in [-127, 127]; the error of each value is at
            # most half a step of its block's scale, bounded here by the tensor's largest value.
            step = original.abs().max() / 127
            assert (got - original).abs().max() <= step, name
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in loaded


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_config_matches_transformers_config(tmp_path: Path, family: str) -> None:
    config, state = tiny_model(family)
    path = write_gguf(tmp_path / "tiny.gguf", family, config, to_gguf_tensors(state, config, True))
    ck = read_gguf(path)
    hf = (transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config)(**TINY)
    assert ck.config["model_type"] == hf.model_type
    assert ck.config["architectures"] == [type(transformers.AutoModelForCausalLM.from_config(hf)).__name__]
    for key in TINY.keys() - {"rope_theta"}:
        assert ck.config[key] == pytest.approx(getattr(hf, key)), key
    assert ck.config["rope_theta"] == pytest.approx(hf_rope_theta(hf))
    assert ck.config["head_dim"] == hf.hidden_size // hf.num_attention_heads
    assert ck.config["attention_bias"] is (family == "qwen2")
    assert ck.file_type == "F32"
    assert sum(ck.tensor_types.values()) == len(state)


@pytest.mark.parametrize(
    ("declared", "shown"),
    [
        (gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q4_K_M"),  # the mix, which the tensors cannot tell
        (gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
        (gguf.LlamaFileType.ALL_F32, "F32"),
        (gguf.LlamaFileType.GUESSED, "Q4_0"),  # llama.cpp's "unknown": the matrices' type
        (999, "Q4_0"),  # a value no llama.cpp defines
        ("Q4_K_M", "Q4_0"),  # a string where a number belongs: a label, so not an error
        (None, "Q4_0"),
    ],
)
def test_file_type_is_the_declared_llama_cpp_type(tmp_path: Path, declared, shown: str) -> None:
    config, state = tiny_model("llama")
    tensors = to_gguf_tensors(state, config, True)
    value = int(declared) if isinstance(declared, gguf.LlamaFileType) else declared
    path = write_gguf(tmp_path / "tiny.gguf", "llama", config, tensors, QT.Q4_0, file_type=value)
    ck = read_gguf(path)
    assert ck.file_type == shown
    assert ck.tensor_types["Q4_0"] == sum(w.ndim >= 2 for w in tensors.values())


@pytest.mark.parametrize("merged", [True, False])
def test_tiny_mixtral_experts(tmp_path: Path, merged: bool) -> None:
    config, state = tiny_mixtral()
    tensors = to_gguf_tensors(state, config, permute=True)
    if merged:
        tensors = merge_experts(tensors, config["num_hidden_layers"], config["num_local_experts"])
    path = write_gguf(tmp_path / "moe.gguf", "llama", config, tensors, name="Mixtral tiny")

    ck = read_gguf(path)
    assert ck.config["model_type"] == "mixtral"
    assert ck.config["architectures"] == ["MixtralForCausalLM"]
    assert ck.config["num_local_experts"] == config["num_local_experts"]
    assert ck.config["num_experts_per_tok"] == config["num_experts_per_tok"]
    loaded = dict(iter_gguf_tensors(path))
    assert set(loaded) == set(state)
    for name, original in state.items():
        assert torch.equal(loaded[name], original), name


def test_dtype_argument(tmp_path: Path) -> None:
    config, state = tiny_model("llama")
    path = write_gguf(tmp_path / "tiny.gguf", "llama", config, to_gguf_tensors(state, config, True))
    for name, tensor in iter_gguf_tensors(path, dtype=torch.bfloat16):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name


def test_mistral_is_recognised_by_name(tmp_path: Path) -> None:
    # llama.cpp writes Mistral as "llama"; the model's name is what is left to tell them apart.
    config, state = tiny_model("llama")
    tensors = to_gguf_tensors(state, config, True)
    path = write_gguf(tmp_path / "m.gguf", "llama", config, tensors, name="Mistral 7B Instruct v0.3")
    assert read_gguf(path).config["architectures"] == ["MistralForCausalLM"]


@pytest.mark.parametrize("rows,n_head", [(64, 4), (32, 2), (12, 3)])
def test_unpermute_qk_inverts_llama_cpp_permutation(rows: int, n_head: int) -> None:
    w = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
    bias = w[:, 0].copy()
    assert np.array_equal(unpermute_qk(llama_cpp_permute(bias, n_head), n_head), bias)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)  # the permutation does something


# ---------------------------------------------------------------------------------------------
# Errors


def test_unsupported_architecture(tmp_path: Path) -> None:
    config, state = tiny_model("llama")
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", config, to_gguf_tensors(state, config, False))
    for call in (read_gguf, lambda p: next(iter_gguf_tensors(p))):
        with pytest.raises(CheckpointError) as info:
            call(path)
        message = str(info.value)
        assert str(path) in message and "'gpt2'" in message and "not supported" in message
        assert "\n" not in message


def test_truncated_and_foreign_files(tmp_path: Path, default_gguf: Path) -> None:
    config, state = tiny_model("llama")
    whole = write_gguf(tmp_path / "whole.gguf", "llama", config, to_gguf_tensors(state, config, True))
    data = whole.read_bytes()
    cuts = {
        "cut_in_tensors.gguf": data[: len(data) - 100],
        "cut_in_header.gguf": data[:200],
        "real_cut_in_vocab.gguf": default_gguf.open("rb").read(1 << 20),  # a partial download
        "empty.gguf": b"",
        "not_gguf.gguf": b"this is a text file, not a GGUF checkpoint\n" * 10,
    }
    for name, content in cuts.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            read_gguf(path)
        assert str(path) in str(info.value), name
        assert "GGUF file" in str(info.value), name
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


def test_missing_key_unknown_tensor_and_unsupported_type(tmp_path: Path) -> None:
    config, state = tiny_model("llama")
    tensors = to_gguf_tensors(state, config, True)

    no_eps = write_gguf(tmp_path / "no_eps.gguf", "llama", dict(config, rms_norm_eps=None), tensors)
    with pytest.raises(CheckpointError, match=r"'llama\.attention\.layer_norm_rms_epsilon' is missing"):
        read_gguf(no_eps)

    strange = dict(tensors, **{"blk.0.mystery.weight": np.ones(4, dtype=np.float32)})
    path = write_gguf(tmp_path / "strange.gguf", "llama", config, strange)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.mystery\.weight'"):
        next(iter_gguf_tensors(path))

    ints = dict(tensors, **{"blk.0.attn_norm.weight": np.arange(config["hidden_size"], dtype=np.int32)})
    path = write_gguf(tmp_path / "ints.gguf", "llama", config, ints)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_norm\.weight' is stored as I32"):
        next(iter_gguf_tensors(path))


# ---------------------------------------------------------------------------------------------
# Tokenizers written into tiny files, against transformers' GGUF tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog. Hello again, world.",
    "Café crème brûlée, naïve façade, jalapeño, Straße, señor. I'm sure they'll say it's fine.",
    "def add(a, b):\n    return a + b  # sum\n\nfor i in range(10):\n    print(i)",
    "Numbers 12345 and 67890, 3.14159, 2024-01-01.   multiple   spaces\t\ttabs\n\nnewlines   ",
]

SAMPLES = [
    "Hello, world! How are you doing today?",
    "Ça va très bien, merci. Größe, naïve café, São Paulo, Ελληνικά, русский текст",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 🤗🚀 family 👩\u200d👩\u200d👧 flag 🇫🇷 thumbs 👍🏽",
    "def f(x):\n    return x ** 2  # square\n\tif x != 0: pass",
    "Numbers: 3.14159, 1,000,000 and 2024-01-01; 12345678901234567890",
    "Whitespace   runs\n\n\n  and\ttabs \t \n trailing   ",
    "I'm sure they'll say it's fine, won't they? DON'T SHOUT",
    "CamelCaseWords, HTTPServer's URLs: a/b\n/c/d and JSONData",
    "",
]
CHATML_SAMPLES = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "inline<|im_end|>special<|endoftext|>tokens <|im_start|> spaced",
]


def train_byte_level_vocab(pre: str) -> dict:
    """GGUF tokenizer metadata for a byte-level BPE trained here with the split `pre` names."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "types": [3 if t in special else 1 for t in tokens],
        "merges": [" ".join(m) if isinstance(m, list) else m for m in merges],
        "bos_id": vocab["<|im_start|>"],
        "eos_id": vocab["<|im_end|>"],
        "add_bos": False,
    }


def train_sentencepiece_vocab() -> dict:
    """GGUF tokenizer metadata laid out like a Llama 2 file: <unk>, <s>, </s>, 256 byte tokens,
    then pieces of a SentencePiece-style BPE trained here, scored by merge order."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    vocab = tokenizer.get_vocab()
    pieces = [t for t in sorted(vocab, key=vocab.get) if t != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    return {
        "model": "llama",
        "tokens": tokens,
        "types": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "add_bos": True,
    }


def hf_gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe", "smollm", "gpt-4o"])
def test_tiny_byte_level_tokenizer_matches_transformers(tmp_path: Path, pre: str) -> None:
    config, state = tiny_model("llama")
    tok = train_byte_level_vocab(pre)
    tok["add_bos"] = pre == "llama-bpe"  # Llama 3 files ask for BOS; the others do not
    config = dict(config, vocab_size=len(tok["tokens"]))
    path = write_gguf(tmp_path / "tok.gguf", "llama", config, {}, tokenizer=tok)
    ours, theirs = build_gguf_tokenizer(path), hf_gguf_tokenizer(path)
    for text in SAMPLES + CHATML_SAMPLES:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text), text
        plain = ours.encode(text, add_special_tokens=False).ids
        assert ids == [tok["bos_id"]] * tok["add_bos"] + plain, text
        assert ours.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace(
            "<|endoftext|>", ""
        )
        assert ours.decode(plain, skip_special_tokens=False) == text


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe", "smollm", "gpt-4o"])
def test_tiny_byte_level_tokenizer_matches_llama_cpp(tmp_path: Path, pre: str) -> None:
    """llama.cpp's own split for each `tokenizer.ggml.pre` name (transformers' GGUF loader knows
    fewer names: o200k's "gpt-4o" is checked here)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    config, _ = tiny_model("llama")
    tok = train_byte_level_vocab(pre)
    path = write_gguf(
        tmp_path / "tok.gguf", "llama", dict(config, vocab_size=len(tok["tokens"])), {}, tokenizer=tok
    )
    ours = build_gguf_tokenizer(path)
    llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in SAMPLES:
            theirs = llama.tokenize(text.encode(), add_bos=False, special=False)
            assert ours.encode(text, add_special_tokens=False).ids == theirs, text
    finally:
        llama.close()


def test_o200k_splits_words_at_case_changes_and_keeps_contractions() -> None:
    """gpt-oss's vocabulary ("gpt-4o"): an uppercase run starts a word, a contraction ends the word
    before it, digits go in threes, a punctuation run takes the newlines and slashes after it
    (worked out by hand from the published pattern; Llama 3's split would keep "CamelCase" whole
    and cut " it" from "'s")."""
    split = pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["gpt-4o"][0]), behavior="isolated")
    pieces = [p for p, _ in split.pre_tokenize_str("CamelCase it's 12345 HTTPServer.\n/x")]
    assert pieces == ["Camel", "Case", " it's", " ", "123", "45", " HTTPServer", ".\n/", "x"]


def test_llama3_looks_whole_words_up_before_merging(tmp_path: Path) -> None:
    """Llama 3 vocabularies (`ignore_merges` in their tokenizer.json, and in llama.cpp) use a
    pre-token found whole in the vocabulary even when no chain of merges builds it."""
    config, _ = tiny_model("llama")
    for pre, whole in [("llama-bpe", True), ("gpt-2", False)]:
        tok = train_byte_level_vocab(pre)
        tok["tokens"].append("Ġqxzj")  # " qxzj" in the byte alphabet; no merges lead to it
        tok["types"].append(1)
        path = write_gguf(
            tmp_path / f"{pre}.gguf", "llama", dict(config, vocab_size=len(tok["tokens"])), {}, tokenizer=tok
        )
        ids = build_gguf_tokenizer(path).encode("a qxzj", add_special_tokens=False).ids
        assert (len(tok["tokens"]) - 1 in ids) is whole, pre


def test_tiny_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    config, _ = tiny_model("llama")
    tok = train_sentencepiece_vocab()
    config = dict(config, vocab_size=len(tok["tokens"]))
    path = write_gguf(tmp_path / "spm.gguf", "llama", config, {}, tokenizer=tok)
    ours, theirs = build_gguf_tokenizer(path), hf_gguf_tokenizer(path)
    bos = tok["bos_id"]
    for text in SAMPLES:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text), text
        assert ids[0] == bos  # add_bos_token from the file
        assert ours.decode(ids) == text
    # Unknown characters fall back to bytes, never to <unk>.
    assert tok["unk_id"] not in ours.encode("🤗 日本").ids


def test_tiny_sentencepiece_tokenizer_follows_llama_cpp_on_spaces(tmp_path: Path) -> None:
    """Where transformers' (non-legacy) Llama tokenizer and llama.cpp disagree, we follow
    llama.cpp, which behaves like SentencePiece run on each stretch of text between special
    tokens: " " is always prepended, even to text that starts with spaces or follows a special
    token. transformers skips it in both cases."""
    config, _ = tiny_model("llama")
    tok = train_sentencepiece_vocab()
    path = write_gguf(
        tmp_path / "spm.gguf", "llama", dict(config, vocab_size=len(tok["tokens"])), {}, tokenizer=tok
    )
    ours = build_gguf_tokenizer(path)

    def pieces(text: str) -> str:
        return "".join(ours.encode(text, add_special_tokens=False).tokens)

    for text in ["  leading spaces", "Hello  world ", "a"]:
        assert pieces(text) == "▁" + text.replace(" ", "▁")
        assert ours.decode(ours.encode(text).ids) == text
    hello = ours.encode("Hello", add_special_tokens=False).ids
    assert ours.encode("</s>Hello", add_special_tokens=False).ids == [tok["eos_id"], *hello]
    assert ours.encode("Hello</s>", add_special_tokens=False).ids == [*hello, tok["eos_id"]]


# ---------------------------------------------------------------------------------------------
# The real default model against transformers' own GGUF loading


@pytest.fixture(scope="module")
def default_reader(default_gguf: Path):
    return open_gguf(default_gguf)


def test_default_model_weights_match_transformers(default_reader, hf_default_model) -> None:
    theirs = hf_default_model.state_dict()
    seen = set()
    for name, tensor in iter_gguf_tensors(default_reader):
        seen.add(name)
        assert tensor.shape == theirs[name].shape, name
        # max |difference| rather than torch.allclose: the same check, several times faster here.
        assert (tensor - theirs[name]).abs().max() <= 1e-6, name
    tied = {"lm_head.weight"} if hf_default_model.config.tie_word_embeddings else set()
    assert seen == set(theirs) - tied


def test_default_model_dequantization_matches_an_independent_implementation(default_reader) -> None:
    """transformers' loader dequantizes with gguf-py, as we do; transformers also ships its own
    torch implementation of the block formats, which checks the numbers themselves."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    # One tensor per quantized type, avoiding Q/K (their rows are permuted; see the test above).
    picks = {}
    for tensor in default_reader.tensors:
        unpermuted = ".attn_q." not in tensor.name and ".attn_k." not in tensor.name
        if tensor.tensor_type != QT.F32 and unpermuted:
            picks.setdefault(tensor.tensor_type.name, tensor)
    assert set(picks) == {"Q4_1", "Q8_0"}
    wanted = {hf_tensor_name(t.name): t for t in picks.values()}
    for name, ours in iter_gguf_tensors(default_reader):
        if name in wanted:
            tensor = wanted.pop(name)
            raw = torch.from_numpy(np.array(tensor.data)).reshape(-1)  # (n_bytes,) uint8
            reference = torch_dequantize(raw, int(tensor.tensor_type)).reshape(ours.shape)
            assert (ours - reference).abs().max() <= 1e-6, name
        if not wanted:
            break
    assert not wanted


def test_default_model_config_matches_transformers(default_reader, hf_default_model) -> None:
    ck = read_gguf(default_reader)
    hf = hf_default_model.config
    assert ck.config["model_type"] == hf.model_type
    assert ck.config["architectures"] == [type(hf_default_model).__name__]
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_bias",
    ]:
        assert ck.config[key] == getattr(hf, key), key
    assert ck.config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert ck.config["rope_theta"] == pytest.approx(hf_rope_theta(hf))
    assert ck.path.resolve() == Path(default_reader.data.filename).resolve()
    assert ck.file_type == "Q4_1"
    assert sum(ck.tensor_types.values()) == len(default_reader.tensors)


@pytest.fixture(scope="module")
def default_tokenizers(default_reader, hf_default_tokenizer):
    return build_gguf_tokenizer(default_reader), hf_default_tokenizer


def test_default_tokenizer_matches_transformers(default_tokenizers) -> None:
    ours, theirs = default_tokenizers
    for text in SAMPLES + CHATML_SAMPLES:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert theirs.decode(ids) == text
    # A special token in the text stays one token.
    assert ours.encode("<|im_start|>").ids == [theirs.convert_tokens_to_ids("<|im_start|>")]


def test_default_tokenizer_config_matches_transformers(default_reader, default_tokenizers) -> None:
    _, theirs = default_tokenizers
    config = read_gguf(default_reader).tokenizer_config
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert config[key] == getattr(theirs, key), key
    assert config["chat_template"] == theirs.chat_template
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert theirs.encode("hi")[0] != theirs.bos_token_id  # transformers agrees: no BOS added


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs for Llama 3.1 (per its published
    recipe): 1 for short wavelengths, `factor` for long ones, a smooth blend between."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path, factor: float) -> None:
    config, state = tiny_model("llama")
    config = dict(config, rope_theta=500000.0)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    tensors = to_gguf_tensors(state, config, True)
    tensors["rope_freqs.weight"] = llama3_rope_factors(head_dim, config["rope_theta"], scaling)
    path = write_gguf(tmp_path / "llama31.gguf", "llama", config, tensors)
    assert read_gguf(path).config["rope_scaling"] == scaling
    names = {name for name, _ in iter_gguf_tensors(path)}
    assert not any("rope" in n for n in names)

    tensors["rope_freqs.weight"] = np.linspace(1, 3, head_dim // 2, dtype=np.float32)  # not llama3
    bad = write_gguf(tmp_path / "other.gguf", "llama", config, tensors)
    with pytest.raises(CheckpointError, match="rope_freqs.weight does not match llama3"):
        read_gguf(bad)
