"""GGUF export: tiny models written with `export_gguf` and read back with our GGUF loader give the
source's logits (exactly for F32, within rounding for F16, boundedly for Q8_0/Q4_0), tokens,
chat template and config; the real default model keeps its greedy output through an F16 export;
bad requests fail cleanly without leaving files.

The reader (gguf.py) was tested against transformers' GGUF loader and llama.cpp-written files in
test_gguf.py, so a round trip through it checks the writer against llama.cpp's conventions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SHAPE, build_tiny_hf_dir, build_tiny_tokenizer_dir
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from tokenizers import Regex, Tokenizer, pre_tokenizers

from weightsmith.checkpoint.gguf import hf_tensor_name, open_gguf, read_gguf, unpermute_qk
from weightsmith.checkpoint.gguf_tokenizer import PRE_TOKENIZER_SPLITS
from weightsmith.checkpoint.gguf_write import export_gguf, gguf_tensor_name, permute_qk
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cli.main import main
from weightsmith.errors import CheckpointError, UsageError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world, this is a test.",
    "café naïve Grüße aus Köln",
    "emoji 🙂🚀 and 你好",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
]
IDS = torch.tensor([[5, 17, 40, 100, 250, 3, 77, 299]])


def logits(ckpt) -> torch.Tensor:
    with torch.no_grad():
        out = ckpt.model(IDS)
    return (out.logits if hasattr(out, "logits") else out).float()


def load(path: Path):
    return load_checkpoint(path, decode_layout=False)


def build_tiny_qwen2_dir(path: Path) -> Path:
    """A tiny random Qwen2 (q/k/v biases) with Qwen2's own byte-level pre-tokenizer split."""
    build_tiny_tokenizer_dir(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["qwen2"][0]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.save(str(path / "tokenizer.json"))
    cfg = transformers.Qwen2Config(
        **TINY_SHAPE,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero, where a mix-up would not show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-src")
    return {
        "llama": build_tiny_hf_dir(root / "llama"),
        "qwen2": build_tiny_qwen2_dir(root / "qwen2"),
    }


# ---------------------------------------------------------------------------------------------
# Building blocks


@pytest.mark.parametrize(("rows", "n_head"), [(64, 4), (24, 3), (8, 1)])
def test_permute_qk_is_the_inverse_of_unpermute_qk(rows: int, n_head: int) -> None:
    w = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    b = w[:, 0].copy()
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, n_head), n_head), b)
    assert not np.array_equal(permute_qk(w, n_head), w) or rows // n_head == 2


def test_tensor_names_invert_the_reader_map() -> None:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.3.{m}.{s}"
        for m in (
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
        for s in ("weight", "bias")
    ]
    for name in names:
        assert hf_tensor_name(gguf_tensor_name(name)) == name
    assert gguf_tensor_name("model.layers.0.block_sparse_moe.experts.0.w1.weight") is None


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0])
def test_gguf_quantizers_round_trip_within_a_block_step(qtype: QT) -> None:
    # The installed gguf-py quantizes both types; the error is at most one quantization step.
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    err = np.abs(dequantize(quantize(w, qtype), qtype) - w).reshape(8, 2, 32)
    step = np.abs(w).reshape(8, 2, 32).max(-1, keepdims=True) / (127 if qtype == QT.Q8_0 else 8)
    assert (err <= step * 1.01 + 1e-6).all()


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f32_round_trip_is_exact(tmp_path: Path, sources: dict[str, Path], family: str) -> None:
    src = load(sources[family])
    summary = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert summary["architecture"] == family
    assert summary["tokenizer_pre"] == ("gpt-2" if family == "llama" else "qwen2")
    back = load(tmp_path / "m.gguf")
    torch.testing.assert_close(logits(back), logits(src), atol=1e-5, rtol=0)
    for field in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
    ):
        assert getattr(back.config, field) == getattr(src.config, field), field
    for text in TEXTS:
        assert back.tokenizer.encode(text) == src.tokenizer.encode(text), text
        ids = src.tokenizer.encode(text)
        assert back.tokenizer.decode(ids) == src.tokenizer.decode(ids)
    assert back.tokenizer.chat_template == src.tokenizer.chat_template
    assert back.tokenizer.eos_token_id == src.tokenizer.eos_token_id == 2
    assert back.tokenizer.bos_token_id == src.tokenizer.bos_token_id
    assert back.tokenizer.add_bos_token == src.tokenizer.add_bos_token


def test_f16_round_trip_is_within_half_precision(tmp_path: Path, sources: dict[str, Path]) -> None:
    src = load(sources["llama"])
    export_gguf(src, tmp_path / "m.gguf", "f16")
    info = read_gguf(tmp_path / "m.gguf")
    assert info.file_type == "F16"
    # fp16 keeps 11 significant bits (relative error <= 2^-11 per weight); through two small layers
    # that moves these O(0.1) logits by about 1e-4, so 1e-3 is loose yet catches any real mix-up.
    torch.testing.assert_close(logits(load(tmp_path / "m.gguf")), logits(src), atol=1e-3, rtol=1e-2)


def test_quantized_round_trips(tmp_path: Path, sources: dict[str, Path]) -> None:
    src = load(sources["llama"])
    ref = logits(src)
    errors = {}
    for quant, qtype in (("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        path = tmp_path / f"m-{quant}.gguf"
        summary = export_gguf(src, path, quant)
        reader = open_gguf(path)
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        # Matrices in the requested type (all rows here are multiples of 32), vectors in F32; the
        # LM head, as llama-quantize stores it, in Q8_0 (Q6_K needs rows of a multiple of 256).
        assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}
        assert types["output.weight"] == "Q8_0"
        assert {types[n] for n in types if not n.endswith("_norm.weight") and n != "output.weight"} == {qtype}
        counts = {"F32": 5, qtype: 15, "Q8_0": 1} if qtype == "Q4_0" else {"F32": 5, qtype: 16}
        assert summary["tensors"] == dict(sorted(counts.items()))
        assert read_gguf(path).file_type == qtype
        out = logits(load(path))
        assert torch.isfinite(out).all()
        errors[quant] = (out - ref).abs().mean().item()
    # Q8_0's step is 1/127 of a block's max, Q4_0's 1/8: its error must be the smaller, and both
    # small next to the logits themselves.
    assert errors["q8_0"] < errors["q4_0"] < 0.5 * ref.abs().mean().item()
    assert errors["q8_0"] < 0.05 * ref.abs().mean().item()


def test_rows_not_a_multiple_of_32_fall_back_to_f16(tmp_path: Path) -> None:
    src_dir = build_tiny_hf_dir(
        tmp_path / "odd", hidden_size=48, num_attention_heads=4, num_key_value_heads=2
    )
    src = load(src_dir)
    summary = export_gguf(src, tmp_path / "odd.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in open_gguf(tmp_path / "odd.gguf").tensors}
    # Rows of 48 (hidden) cannot be blocked; ffn_down's rows of 128 (intermediate) can.
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert "blk.0.attn_q.weight" in summary["f16_fallbacks"]
    assert torch.isfinite(logits(load(tmp_path / "odd.gguf"))).all()


def test_tied_embeddings_head_dim_and_linear_rope(tmp_path: Path) -> None:
    src_dir = build_tiny_hf_dir(
        tmp_path / "tied",
        tie_word_embeddings=True,
        head_dim=32,  # not hidden/heads (16): needs attention.key_length
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    src = load(src_dir)
    assert src.config.head_dim == 32 and src.config.rope_type == "linear"
    export_gguf(src, tmp_path / "tied.gguf", "f32")
    names = {t.name for t in open_gguf(tmp_path / "tied.gguf").tensors}
    assert "output.weight" not in names
    back = load(tmp_path / "tied.gguf")
    assert back.config.tie_word_embeddings and back.config.head_dim == 32
    assert back.config.rope_scaling["factor"] == 2.0 and back.config.rope_type == "linear"
    torch.testing.assert_close(logits(back), logits(src), atol=1e-5, rtol=0)


def test_export_from_a_path(tmp_path: Path, sources: dict[str, Path]) -> None:
    summary = export_gguf(sources["llama"], tmp_path / "m.gguf", "f32")
    assert Path(summary["path"]).is_file() and summary["bytes"] == (tmp_path / "m.gguf").stat().st_size
    torch.testing.assert_close(
        logits(load(tmp_path / "m.gguf")), logits(load(sources["llama"])), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# Modelfile


def test_modelfile_points_at_the_gguf_and_stops_at_eos(tmp_path: Path, sources: dict[str, Path]) -> None:
    src = load(sources["llama"])
    export_gguf(src, tmp_path / "a.gguf", "f16")
    text = (tmp_path / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./a.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert 'TEMPLATE """' in text and "{{ .Content }}<|im_end|>" in text
    # A second export in the same directory leaves the first one's Modelfile alone.
    summary = export_gguf(src, tmp_path / "b.gguf", "f16")
    assert summary["modelfile"] == str(tmp_path / "b.Modelfile")
    assert "FROM ./a.gguf" in (tmp_path / "Modelfile").read_text().splitlines()
    assert "FROM ./b.gguf" in (tmp_path / "b.Modelfile").read_text().splitlines()
    # Re-exporting a.gguf replaces its own Modelfile.
    summary = export_gguf(src, tmp_path / "a.gguf", "f32", overwrite=True)
    assert summary["modelfile"] == str(tmp_path / "Modelfile")


# ---------------------------------------------------------------------------------------------
# The real default model


def test_default_model_f16_export_keeps_greedy_output(tmp_path: Path, default_gguf: Path) -> None:
    import weightsmith

    src = load_checkpoint(default_gguf, decode_layout=False)
    summary = export_gguf(src, tmp_path / "smol-f16.gguf", "f16")
    assert summary["tokenizer_pre"] == "smollm" and summary["f16_fallbacks"] == []
    prompt = "The capital of France is"
    ref = weightsmith.load(str(default_gguf)).complete(prompt, max_tokens=12, temperature=0)
    out = weightsmith.load(summary["path"]).complete(prompt, max_tokens=12, temperature=0)
    assert len(ref.token_ids) == 12 and out.token_ids == ref.token_ids
    back = read_gguf(tmp_path / "smol-f16.gguf")
    src_info = read_gguf(default_gguf)
    assert back.tokenizer_config == src_info.tokenizer_config
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rope_theta", "vocab_size"):
        assert back.config[key] == src_info.config[key]
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile


# ---------------------------------------------------------------------------------------------
# Bad requests


def test_bad_quant_and_existing_file(tmp_path: Path, sources: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="q5_k"):
        export_gguf(sources["llama"], tmp_path / "m.gguf", "q5_k")
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        export_gguf(sources["llama"], existing, "f16")
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_unexportable_model_writes_nothing(tmp_path: Path) -> None:
    """Every family exports now; a Qwen3-MoE whose top-k weights are not renormalised would
    compute something else in llama.cpp's qwen3moe graph, so it is refused."""
    src_dir = tmp_path / "qwen3moe"
    build_tiny_tokenizer_dir(src_dir)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        norm_topk_prob=False,
        max_position_embeddings=128,
    )
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(src_dir)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="norm_topk_prob false cannot be exported"):
        export_gguf(src_dir, out / "m.gguf", "f16")
    assert not out.exists() or not any(out.iterdir())
    code = main(["export", str(src_dir), "--out", str(out / "m.gguf")])
    assert code == 1
    assert not out.exists() or not any(out.iterdir())


def test_cli(tmp_path: Path, sources: dict[str, Path], capsys) -> None:
    out = tmp_path / "m.gguf"
    assert main(["export", str(sources["llama"]), "--quant", "q8_0", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and result["tensors"]["Q8_0"] == 16
    assert read_gguf(out).file_type == "Q8_0"
    before = out.read_bytes()

    code = main(["export", str(sources["llama"]), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and out.read_bytes() == before
    assert captured.err.strip().count("\n") == 0 and "--overwrite" in captured.err

    code = main(["export", str(sources["llama"]), "--quant", "q5_k", "--out", str(tmp_path / "x.gguf")])
    captured = capsys.readouterr()
    assert code == 2 and not (tmp_path / "x.gguf").exists()
    assert "q5_k" in captured.err

    assert main(["export", str(sources["llama"]), "--out", str(out), "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_gguf(out).file_type == "F16"


def test_llama3_rope_scaling_round_trips(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    src = load(build_tiny_hf_dir(tmp_path / "l3", rope_scaling=scaling, max_position_embeddings=16384))
    export_gguf(src, tmp_path / "l3.gguf", "f32")
    assert "rope_freqs.weight" in {t.name for t in open_gguf(tmp_path / "l3.gguf").tensors}
    back = load(tmp_path / "l3.gguf")
    assert back.config.rope_type == "llama3" and back.config.rope_scaling["factor"] == 8.0
    torch.testing.assert_close(logits(back), logits(src), atol=1e-5, rtol=0)


def test_mistral_sliding_window_caps_the_context(tmp_path: Path, caplog) -> None:
    src_dir = tmp_path / "mistral"
    build_tiny_tokenizer_dir(src_dir)
    cfg = transformers.MistralConfig(
        **TINY_SHAPE,
        sliding_window=64,
    )
    torch.manual_seed(2)
    transformers.MistralForCausalLM(cfg).save_pretrained(src_dir)
    src = load(src_dir)
    summary = export_gguf(src, tmp_path / "mistral.gguf", "f32")
    assert summary["architecture"] == "llama" and "sliding window 64" in caplog.text
    back = load(tmp_path / "mistral.gguf")
    assert back.config.max_position_embeddings == 64
    torch.testing.assert_close(logits(back), logits(src), atol=1e-5, rtol=0)


def test_export_of_a_weightsmith_quantized_model_dequantizes_its_layers(
    tmp_path: Path, sources: dict[str, Path], monkeypatch
) -> None:
    """An int8 folder from `weightsmith quantize` exports every projection (they were dropped
    once, leaving a GGUF that would not load), with the dequantized weights: the same logits
    as the int8 layers on the exact float path (the C kernels also round activations)."""
    monkeypatch.setenv("WEIGHTSMITH_CPU_KERNELS", "0")
    q8 = tmp_path / "q8"
    assert main(["quantize", str(sources["llama"]), "--to", "int8", "--out", str(q8)]) == 0
    src = load(q8)
    export_gguf(src, tmp_path / "m.gguf", "f32")
    names = {t.name for t in open_gguf(tmp_path / "m.gguf").tensors}
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    torch.testing.assert_close(logits(load(tmp_path / "m.gguf")), logits(src), atol=1e-4, rtol=0)
