"""GGUF for Qwen3, Phi-3, Gemma 2 and Gemma 3: tiny models exported with `export_gguf`, read back
by our loader (exact at F32), by transformers' own GGUF loader and by llama.cpp (where
llama-cpp-python is installed); Gemma settings llama.cpp's graphs cannot express are refused in
one line with nothing written. The reader itself is checked
against transformers on the real Gemma 3 270M file in test_gemma3_270m.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_perturbed_hf
from test_model_parity import GPT_OSS, GPT_OSS_ROPE, PHI3_LONGROPE

from weightsmith.checkpoint.gguf import read_gguf
from weightsmith.checkpoint.gguf_quants import gguf_int4_layers
from weightsmith.checkpoint.gguf_write import export_gguf
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.errors import CheckpointError
from weightsmith.quant.weight_only import quantize_model

transformers = pytest.importorskip("transformers")

SHAPE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2
)
SHAPE.update(max_position_embeddings=128, num_hidden_layers=2, eos_token_id=2, bos_token_id=1, pad_token_id=0)
FAMILIES = {
    # head_dim 128 (not hidden / heads, written as key_length): every released Qwen3 has it, and
    # transformers' GGUF loader does not read key_length for qwen3 (it takes its default, 128).
    "qwen3": (transformers.Qwen3Config, dict(head_dim=128, tie_word_embeddings=False)),
    "phi3": (transformers.Phi3Config, dict(sliding_window=6)),
    # llama.cpp's gemma3: every 6th layer global, local RoPE base 10000, queries by head_dim ** -0.5.
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(head_dim=16, num_hidden_layers=6, sliding_window=5, query_pre_attn_scalar=16),
    ),
    # llama.cpp's gemma2: every 2nd layer global, queries by head_dim ** -0.5, both caps from the file.
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            num_hidden_layers=4,
            sliding_window=5,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=2.0,
        ),
    ),
    # llama.cpp's smollm3: Q/K permuted as llama's, every 4th layer without RoPE.
    "smollm3": (transformers.SmolLM3Config, dict(num_hidden_layers=4, rope_theta=10000.0)),
    # llama.cpp's olmo2: norms after attention and MLP, QK-norm over all heads; Q/K not permuted.
    "olmo2": (transformers.Olmo2Config, dict()),
    # llama.cpp's gpt-oss: sinks, biased attention, router and experts (stacked per kind), every
    # other layer sliding from the first, YaRN; the MLP's input norm is `post_attention_norm`.
    "gpt-oss": (
        transformers.GptOssConfig,
        dict(
            **GPT_OSS,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=dict(GPT_OSS_ROPE, original_max_position_embeddings=32),
        ),
    ),
}
IDS = torch.tensor([[5, 17, 40, 100, 250, 3, 77, 299, 12, 8, 64, 1, 9]])  # longer than the windows


def _source(root: Path, family: str, **extra) -> Path:
    cls, kw = FAMILIES[family]
    path = root / family
    also = ("bias", "sinks") if family == "gpt-oss" else ()
    return save_perturbed_hf(path, cls(**{**SHAPE, **kw, **extra}), also)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: _source(root, family) for family in FAMILIES}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_export_reads_back_exactly(family, sources, tmp_path):
    src = load_checkpoint(sources[family])
    out = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert out["architecture"] == family
    back = load_checkpoint(tmp_path / "m.gguf")
    assert back.config.layer_types == src.config.layer_types
    assert back.config.sliding_window == (src.config.sliding_window if family != "qwen3" else None)
    assert (_logits(back.model) - _logits(src.model)).abs().max().item() <= 1e-5
    info = read_gguf(tmp_path / "m.gguf")
    assert info.config["max_position_embeddings"] == 128  # the window is in the file, not a cap


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_q8_0_export_reads_back_close(family, sources, tmp_path):
    src = load_checkpoint(sources[family])
    out = export_gguf(src, tmp_path / "m.gguf", "q8_0")
    assert out["tensors"]["Q8_0"] > 0
    ref = _logits(src.model)
    got = _logits(load_checkpoint(tmp_path / "m.gguf").model)
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_int4_takes_a_q4_0_files_own_codes(family, sources, tmp_path):
    """`quantize --to int4 --group-size 32` of a Q4_0 file keeps its codes; Phi-3's fused attn_qkv
    and ffn_up are split into q/k/v and gate/up rows, so every projection takes them."""
    export_gguf(load_checkpoint(sources[family]), tmp_path / "m.gguf", "q4_0")
    codes = gguf_int4_layers(tmp_path / "m.gguf")
    model = load_checkpoint(tmp_path / "m.gguf", decode_layout=False).model
    ref = _logits(model)
    quantized = quantize_model(model, 4, 32, int4_codes=codes)
    assert {f"{n}.weight" for n in quantized} <= set(codes)  # every projection from the file's codes
    assert "model.layers.1.self_attn.k_proj.weight" in codes and "model.layers.0.mlp.up_proj.weight" in codes
    assert (_logits(model) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_transformers_reads_our_export(family, sources, tmp_path):
    """transformers' GGUF loader assumes Gemma 3's query scale is 256 (its config default) where
    llama.cpp uses head_dim, and reads no sliding window for phi3: so Gemma 3 is not compared with
    it, and Phi-3 without a window (ours with one reads back exactly above)."""
    path = sources[family] if family == "qwen3" else _source(tmp_path / "src", family, sliding_window=None)
    src = load_checkpoint(path)
    export_gguf(src, tmp_path / "m.gguf", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert (_logits(hf.eval()) - _logits(src.model)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "smollm3", "olmo2", "gpt-oss"])
def test_llama_cpp_computes_our_logits(family, sources, tmp_path):
    """llama.cpp runs our F32 export and its logits are ours. For Gemma 2 the queries are scaled up
    first so that the attention cap (0.5) bends the scores: without it the logits move ~0.03,
    100x the tolerance (llama.cpp keeps its cache in F16). Not Phi-3: llama.cpp's loader stops
    on the tiny byte-level vocabulary under the phi3 architecture (`unordered_map::at`)."""
    pytest.importorskip("llama_cpp")
    src = load_checkpoint(sources[family])
    if family == "gemma2":
        with torch.no_grad():
            for layer in src.model.model.layers:
                layer.self_attn.q_proj.weight.mul_(6)
    export_gguf(src, tmp_path / "m.gguf", "f32")
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", IDS[0].tolist(), 64)
    ours = _logits(src.model)[0]
    assert (theirs - ours).abs().max().item() <= 1e-3 * max(1.0, ours.abs().max().item())


@pytest.mark.parametrize(
    ("family", "extra", "message"),
    [
        (
            "gemma3",
            dict(layer_types=["full_attention"] * 6),
            r"layer_types .* llama.cpp's gemma3 graph assumes every 6th",
        ),
        ("gemma3", dict(query_pre_attn_scalar=20), "query_pre_attn_scalar 20 cannot be exported"),
        ("gemma3", dict(rope_local_base_freq=5000.0), "rope_local_base_freq 5000.0 cannot be exported"),
        ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping 50.0 cannot be exported"),
        (
            "gemma2",
            dict(layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"]),
            r"layer_types .* llama.cpp's gemma2 graph assumes every other layer",
        ),
        ("gemma2", dict(attn_logit_softcapping=None), r"attn_logit_softcapping None .* assumes a cap"),
        ("gemma2", dict(final_logit_softcapping=None), r"final_logit_softcapping None .* assumes a cap"),
        ("gemma2", dict(tie_word_embeddings=False), "tie_word_embeddings False cannot be exported"),
        ("gemma2", dict(query_pre_attn_scalar=256), "query_pre_attn_scalar 256 cannot be exported"),
        ("smollm3", dict(no_rope_layer_interval=2), r"no_rope_layers \[1, 0, 1, 0\] cannot be exported"),
    ],
)
def test_settings_llama_cpp_cannot_express_are_refused(family, extra, message, tmp_path):
    src = _source(tmp_path, family, **extra)
    with pytest.raises(CheckpointError, match=message):
        export_gguf(src, tmp_path / "out" / "m.gguf", "f16")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _phi3_spm(path: Path, **extra) -> Path:
    """A tiny Phi-3 with the SentencePiece vocabulary real Phi-3 models have (llama.cpp's phi3
    loader takes it, not the byte-level test vocabulary), queries scaled up so that where and how
    RoPE turns matters more."""
    from test_tokenizer import SP_CONFIG, build_sentencepiece_style, write_dir

    backend = build_sentencepiece_style()
    write_dir(path, backend, SP_CONFIG)
    torch.manual_seed(0)
    shape = {**SHAPE, "vocab_size": backend.get_vocab_size(), "head_dim": 16}
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**shape, **extra}))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[: 4 * 16].mul_(4)
    model.save_pretrained(path)
    return path


def _llama_cpp_logits(path: Path, ids: list[int], n_ctx: int) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, verbose=False, logits_all=True)
    try:
        llama.eval(ids)
        return torch.tensor(llama.scores[: len(ids)])
    finally:
        llama.close()


#: test_model_parity's LongRoPE factors, with an original context llama.cpp's can stay within.
LONGROPE = dict(
    max_position_embeddings=1024,
    original_max_position_embeddings=256,
    rope_scaling=PHI3_LONGROPE["rope_scaling"],
)


@pytest.mark.parametrize(
    ("case", "tokens", "n_ctx"),
    [("partial", 40, 256), ("longrope-short", 40, 256), ("longrope-long", 300, 512)],
)
def test_phi3_partial_rotary_and_longrope_in_llama_cpp(case, tokens, n_ctx, tmp_path):
    """Phi-4-mini's RoPE on half of each head (8 of 16 dimensions: the rope dimension count) and
    Phi-3.5's LongRoPE (factors as `rope_factors_long/short`, the original context and attention
    factor as keys) read back exactly, and llama.cpp computes our logits: with its context within
    the original 256 it takes the short factors, as we do for 40 tokens; past it the long ones, as
    we do for 300. (Turning whole heads, or taking the other factor set, moved the logits by
    0.026 and 0.01 when this was written: 10-26x the tolerance.)"""
    extra = dict(partial_rotary_factor=0.5, **(LONGROPE if case.startswith("longrope") else {}))
    src = load_checkpoint(_phi3_spm(tmp_path / "src", **extra))
    assert src.config.rotary_dim == 8
    export_gguf(src, tmp_path / "m.gguf", "f32")
    back = load_checkpoint(tmp_path / "m.gguf")
    assert back.config.partial_rotary_factor == 0.5
    assert back.config.rope_type == ("longrope" if case.startswith("longrope") else "default")
    ids = torch.randint(3, 600, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = src.model(ids)[0]
        assert (back.model(ids)[0] - ours).abs().max().item() <= 1e-5
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids[0].tolist(), n_ctx)
    assert (theirs - ours).abs().max().item() <= 1e-3 * max(1.0, ours.abs().max().item())


def test_gpt_oss_mxfp4_moe_export_is_what_gpt_oss_ships(sources, tmp_path):
    """`--quant mxfp4_moe` (llama.cpp's MXFP4_MOE): the stacked experts in MXFP4, every other
    matrix Q8_0; kept quantized, the experts run from the file's MXFP4 blocks; llama.cpp runs it
    (its activations rounded to 8 bits: close, not equal)."""
    from weightsmith.checkpoint.gguf_mix import QUANTS
    from weightsmith.quant.ggml_linear import GGMLLinear

    if "mxfp4_moe" not in QUANTS:
        pytest.skip("the installed gguf package predates MXFP4")
    src = load_checkpoint(sources["gpt-oss"])
    out = export_gguf(src, tmp_path / "m.gguf", "mxfp4_moe")
    assert out["tensors"]["MXFP4"] == 3 * 2 and out["tensors"]["Q8_0"] > 0  # gate, up, down x 2 layers
    assert read_gguf(tmp_path / "m.gguf").file_type == "MXFP4_MOE"
    kept = load_checkpoint(tmp_path / "m.gguf", keep_quantized=True)
    expert = kept.model.model.layers[1].mlp.experts[2].down_proj
    assert isinstance(expert, GGMLLinear) and expert.type_name == "MXFP4"
    ref = _logits(src.model)
    floats = _logits(load_checkpoint(tmp_path / "m.gguf").model)
    scale = ref.abs().max().item()
    assert (floats - ref).abs().max().item() < 0.05 * scale  # 4-bit experts
    assert (_logits(kept.model) - floats).abs().max().item() < 2e-3 * scale  # the kernels' input rounding
    pytest.importorskip("llama_cpp")
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", IDS[0].tolist(), 64)
    assert (theirs - floats[0]).abs().max().item() < 0.02 * scale
    assert (theirs.argmax(-1) == floats[0].argmax(-1)).float().mean() >= 0.9
