"""IQ4_NL / IQ4_XS export (`export --quant iq4_nl | iq4_xs`, quant/iq4.py, quant/cpu_kquant.c):
the blocks against ggml's quantizer, the C and tensor paths against each other, importance
weighting, edge blocks, and which tensors get which type.

gguf-py's dequantizers (ggml's layouts in numpy, not ours) decode every block we write. Where
llama-cpp-python is installed, the error is also compared with ggml's own quantizer live; the
type of every tensor against `llama_model_quantize` and llama.cpp running the files are in
tests/test_gguf_kquants.py with the k-quants.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from test_gguf_kquants import edge_rows, ggml_quantizer, rmse, seeded

from weightsmith.checkpoint.gguf_mix import Mix
from weightsmith.quant import cpu_kernels, iq4
from weightsmith.quant.kquants import quantize_blocks

IQ4 = (QT.IQ4_NL, QT.IQ4_XS)
#: RMSE of ggml's quantizer (ggml 0.25.3 from llama-cpp-python 0.3.36, `ggml_quantize_chunk`
#: without an importance matrix) on `seeded()`'s weights, as dequantized by gguf-py.
GGML_RMSE = {
    ("normal", QT.IQ4_NL): 1.51573e-03,
    ("student-t", QT.IQ4_NL): 2.64204e-03,
    ("uniform", QT.IQ4_NL): 1.85316e-03,
    ("normal", QT.IQ4_XS): 1.52831e-03,
    ("student-t", QT.IQ4_XS): 2.66928e-03,
    ("uniform", QT.IQ4_XS): 1.86949e-03,
}


def _kernels(kernels: bool) -> None:
    if kernels and cpu_kernels.library() is None:
        pytest.skip("the C kernels cannot be built here")


@pytest.mark.parametrize("kernels", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("qtype", IQ4, ids=lambda q: q.name)
def test_blocks_have_less_error_than_ggmls(qtype: QT, kernels: bool) -> None:
    """At least 2% less RMS error than ggml's quantizer on every distribution (its recorded
    error, and its live error where llama-cpp-python is installed)."""
    _kernels(kernels)
    theirs = ggml_quantizer()
    per, size = GGML_QUANT_SIZES[qtype]
    for name, w in seeded().items():
        blocks = quantize_blocks(w, qtype, kernels=kernels)
        assert blocks.shape == (64, 1024 // per * size) and blocks.dtype == np.uint8
        ours = rmse(blocks, qtype, w)
        assert ours <= 0.98 * GGML_RMSE[name, qtype], (name, ours)
        if theirs is not None:
            assert ours <= 0.98 * rmse(theirs(w, qtype), qtype, w), name


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", IQ4, ids=lambda q: q.name)
def test_the_c_kernels_take_the_steps_of_the_tensor_passes(qtype: QT, weighted: bool) -> None:
    _kernels(True)
    w = seeded()["student-t"]
    imp = np.random.default_rng(2).lognormal(0, 1, w.shape[1]).astype(np.float32) if weighted else None
    c = quantize_blocks(w, qtype, importance=imp)
    py = quantize_blocks(w, qtype, kernels=False, importance=imp)
    size = GGML_QUANT_SIZES[qtype][1]
    assert (c.reshape(-1, size) == py.reshape(-1, size)).all(1).mean() > 0.9
    assert abs(rmse(c, qtype, w) / rmse(py, qtype, w) - 1) < 1e-3


@pytest.mark.parametrize("kernels", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("qtype", IQ4, ids=lambda q: q.name)
def test_an_importance_matrix_lowers_the_error_it_weighs(qtype: QT, kernels: bool) -> None:
    _kernels(kernels)
    w = seeded()["student-t"]
    imp = np.random.default_rng(5).lognormal(0, 1.5, w.shape[1]).astype(np.float32)

    def weighted(blocks: np.ndarray) -> float:
        return float((imp * (dequantize(blocks, qtype) - w) ** 2).sum())

    plain = weighted(quantize_blocks(w, qtype, kernels=kernels))
    assert weighted(quantize_blocks(w, qtype, kernels=kernels, importance=imp)) < 0.9 * plain


def test_levels_and_layout() -> None:
    """A block whose weights are d times the levels comes back exactly (IQ4_NL), and IQ4_XS puts
    a sub-block of half the size on half the sub-scale of the grid."""
    levels = np.array(iq4.LEVELS, np.float32)
    d = np.float32(0.0078125)  # a power of two: every product exact
    w = (d * np.concatenate([levels, levels[::-1]]))[None, :]
    for kernels in (True, False):
        if kernels and cpu_kernels.library() is None:
            continue
        blocks = quantize_blocks(w, QT.IQ4_NL, kernels=kernels)
        assert np.array_equal(dequantize(blocks, QT.IQ4_NL), w)
        xs = np.concatenate([w] * 7 + [w / 2], 1)
        back = dequantize(quantize_blocks(xs, QT.IQ4_XS, kernels=kernels), QT.IQ4_XS)
        assert np.abs(back - xs).max() < 1e-3 * np.abs(xs).max()


@pytest.mark.parametrize("kernels", [True, False], ids=["C", "torch"])
@pytest.mark.parametrize("qtype", IQ4, ids=lambda q: q.name)
def test_edge_blocks(qtype: QT, kernels: bool) -> None:
    """Zeros stay zero; constant, one-signed, tiny, huge and outlier blocks decode finitely near
    their weights; 3-D (stacked experts) keeps its shape."""
    _kernels(kernels)
    rows = edge_rows()
    w = np.stack(list(rows.values())).astype(np.float32)
    back = dequantize(quantize_blocks(w, qtype, kernels=kernels), qtype)
    assert np.isfinite(back).all()
    err = dict(zip(rows, np.abs(back - w), strict=True))
    assert (err["zeros"] == 0).all() and (err["zero sub-blocks"][:128] == 0).all()
    for name in ("constant", "negative constant"):  # a level times the scale: fp16's precision
        assert (err[name] <= 2e-3 * abs(rows[name][0])).all(), name
    for name in ("positive", "negative", "huge"):  # well within the widest gap between levels (24 of 240)
        x = rows[name]
        assert np.sqrt((err[name] ** 2).mean()) < 0.05 * np.abs(x).max(), name
    assert err["tiny"].max() < 1e-8
    assert err["outlier"][0] < 1.0
    stacked = np.stack([w[:4], w[4:8]])
    per, size = GGML_QUANT_SIZES[qtype]
    assert quantize_blocks(stacked, qtype, kernels=kernels).shape == (2, 4, 256 // per * size)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_blocks(np.zeros((2, 320), np.float32), QT.IQ4_XS)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_blocks(np.zeros((2, 48), np.float32), QT.IQ4_NL)
    with pytest.raises(ValueError, match="NaN"):
        quantize_blocks(np.full((1, 32), np.inf, np.float32), QT.IQ4_NL)


def test_mix_rules() -> None:
    """As llama.cpp's llama_tensor_get_type rules them (ggml 0.25.3; the types of whole models
    are compared with llama_model_quantize in tests/test_gguf_kquants.py)."""
    wide, narrow = (1024, 2048), (1024, 576)
    for quant, base in (("iq4_xs", QT.IQ4_XS), ("iq4_nl", QT.IQ4_NL)):
        mix = Mix(quant, layers=17)
        assert mix.tensor_type("output.weight", wide) == QT.Q6_K
        assert mix.tensor_type("token_embd.weight", wide) == base
        assert mix.tensor_type("blk.5.attn_v.weight", wide) == base
        assert Mix(quant, layers=17, gqa=4).tensor_type("blk.5.attn_v.weight", wide) == QT.Q5_K
        # ffn_down: Q5_K in the first eighth (17 // 8 = 2 layers), unless an importance matrix
        assert [mix.tensor_type(f"blk.{i}.ffn_down.weight", wide).name for i in (0, 1, 2)] == [
            "Q5_K", "Q5_K", base.name
        ]  # fmt: skip
        weighted = Mix(quant, layers=17, imatrix=object())
        assert weighted.tensor_type("blk.0.ffn_down.weight", wide) == base
        moe = Mix(quant, layers=4, experts=8)
        assert moe.tensor_type("blk.1.attn_output.weight", wide) == QT.Q5_K
        assert moe.tensor_type("blk.1.attn_v.weight", wide) == QT.Q8_0
        # rows of 576: IQ4_XS falls back to IQ4_NL (32-weight blocks), Q5_K to Q5_1
        assert mix.tensor_type("blk.5.attn_q.weight", narrow) == QT.IQ4_NL
        assert mix.tensor_type("blk.0.ffn_down.weight", narrow) == QT.Q5_1
    assert Mix("iq4_xs", layers=17).fallbacks == {}
    narrow_mix = Mix("iq4_xs", layers=17)
    narrow_mix.tensor_type("blk.5.attn_q.weight", narrow)
    assert narrow_mix.fallbacks == {"blk.5.attn_q.weight": "IQ4_XS -> IQ4_NL"}
