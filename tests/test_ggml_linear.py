"""GGMLLinear and its kernels (quant/cpu_ggml.c): a GGUF file's quantized blocks used as they are.

Parity with gguf-py: `dequantize()` (in C, and with tensor ops where the kernels are off or the
layer is not on a CPU, ggml_decode.py) is bit for bit `gguf.quants.dequantize` for every type
the kernels run, on blocks made by gguf-py's quantizers or random valid bytes (ggml_blocks.py),
with zero, subnormal and negative scales. The tensor ops run on any device (checked on meta:
nothing goes through the host; on CUDA where there is one).
The matmul, on every instruction set this CPU runs (each forced in turn), against a float64
product of gguf-py's dequantized weight and the kernels' int8-rounded input, and within the
rounding bound of the unrounded product; odd row counts, rows past a multiple of 4, several
blocks, extreme codes; the layer's decode and prefill paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches, kernels_on, quantize_act
from ggml_blocks import TYPES, random_blocks, with_edge_scales
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from weightsmith.quant import cpu_kernels, ggml_decode
from weightsmith.quant.ggml_linear import GGMLLinear, row_bytes

N = 37  # odd: no row count the kernels might assume


def _k(qtype: QT, blocks: int = 3) -> int:
    return GGML_QUANT_SIZES[qtype][0] * blocks


def _layer(qtype: QT, k: int, seed: int, bias: bool = False) -> tuple[GGMLLinear, np.ndarray]:
    blocks = with_edge_scales(random_blocks(qtype, N, k, seed), qtype)
    b = torch.randn(N, generator=torch.Generator().manual_seed(seed)) if bias else None
    return GGMLLinear(torch.from_numpy(blocks), int(qtype), k, b), dequantize(blocks, qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kernels", [True, False], ids=["c", "tensor-ops"])
def test_dequantize_is_ggufs_bit_for_bit(qtype, kernels, monkeypatch):
    kernels_on(monkeypatch, kernels)
    layer, ref = _layer(qtype, _k(qtype), seed=int(qtype))
    if kernels and cpu_kernels.library() is None:
        pytest.skip("no working C compiler: the kernels cannot be built here")
    ours = layer.dequantize().numpy()
    assert ours.shape == ref.shape == (N, _k(qtype))
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))  # signs of zero included
    assert (ref < 0).any() and np.abs(ref).max() > 0.01
    if qtype not in (QT.Q4_1, QT.Q5_1, QT.Q2_K, QT.Q4_K, QT.Q5_K, QT.MXFP4):  # scale 0: w = 0 * code
        assert (ref == 0).any()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_tensor_ops_decode_in_row_chunks_and_on_any_device(qtype, monkeypatch):
    """Rows decoded a few at a time (a chunk size that does not divide N) give the same weight;
    on the meta device the layer's forward runs end to end, so no step copies to the host."""
    layer, ref = _layer(qtype, _k(qtype), seed=5)
    monkeypatch.setattr(ggml_decode, "_WEIGHTS_AT_ONCE", 4 * _k(qtype))
    ours = ggml_decode.dequantize_blocks(layer.qweight, int(qtype), layer.in_features).numpy()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    meta = GGMLLinear(layer.qweight.to("meta"), int(qtype), layer.in_features, torch.zeros(N, device="meta"))
    assert meta(torch.empty(2, 3, layer.in_features, device="meta", dtype=torch.bfloat16)).shape == (2, 3, N)
    with pytest.raises(ValueError, match="not one this module dequantizes"):
        ggml_decode.dequantize_blocks(layer.qweight, int(QT.BF16), layer.in_features)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_layer_on_cuda_dequantizes_on_the_device(qtype):
    layer, ref = _layer(qtype, _k(qtype, 2), seed=9, bias=True)
    cuda = layer.to("cuda")
    assert cuda.qweight.is_cuda
    assert np.array_equal(cuda.dequantize().cpu().numpy().view(np.uint32), ref.view(np.uint32))
    x = torch.randn(4, layer.in_features, device="cuda")
    want = F.linear(x.double(), torch.from_numpy(ref).cuda().double(), cuda.bias.double())
    torch.testing.assert_close(cuda(x).double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _check(out: torch.Tensor, x: torch.Tensor, w: np.ndarray, bias: torch.Tensor | None) -> None:
    w64 = torch.from_numpy(w).double()
    b64 = 0 if bias is None else bias.double()
    deq, d = quantize_act(x)
    assert_matches(out, deq @ w64.T + b64)
    exact = x.double() @ w64.T + b64  # each input element is off by at most d / 2
    bound = 0.5 * d @ w64.abs().T
    assert ((out.double() - exact).abs() <= bound * (1 + 1e-3) + 1e-4 * exact.abs().max()).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 5, 9])
def test_matmul_matches_float64(int_isa_lib, qtype, rows):
    layer, w = _layer(qtype, _k(qtype), seed=rows, bias=rows == 3)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0  # an all-zero input block: its int8 scale is 0
    out = cpu_kernels.ggml_matmul(int_isa_lib, x, int(qtype), layer.qweight, layer.bias)
    _check(out, x, w, layer.bias)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q6_K, QT.Q5_1, QT.IQ4_NL], ids=lambda t: t.name)
def test_extreme_codes_do_not_saturate(int_isa_lib, qtype):
    """The largest |code| x |input| products (Q8_0's -128, Q6_K's -32 times a -128 sub-scale,
    Q5_1's 31, IQ4's level -127) against inputs at +-127 after rounding: the int16 pair sums
    stay in range."""
    per, size = GGML_QUANT_SIZES[qtype]
    k = per * 2
    raw = np.zeros((4, k // per, size), np.uint8)
    half = np.array([0.01], np.float16).view(np.uint8)
    if qtype == QT.Q8_0:
        raw[..., 0:2], raw[..., 2:] = half, 0x80  # every code -128
    elif qtype == QT.Q6_K:
        raw[..., 192:208], raw[..., 208:210] = 0x80, half  # codes 0 - 32 = -32, sub-scales -128
    elif qtype == QT.IQ4_NL:
        raw[..., 0:2], raw[..., 2:] = half, 0  # every code 0: the level -127
    else:
        raw[..., 0:2], raw[..., 2:4], raw[..., 4:] = half, half, 0xFF  # every code 31
    blocks = raw.reshape(4, -1)
    x = torch.full((2, k), 3.0)
    x[1] = -3.0
    out = cpu_kernels.ggml_matmul(int_isa_lib, x, int(qtype), torch.from_numpy(blocks), None)
    _check(out, x, dequantize(blocks, qtype), None)


def test_every_instruction_set_gives_the_same_sums(monkeypatch):
    kernels_on(monkeypatch, True)
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no working C compiler: the kernels cannot be built here")
    layer, _ = _layer(QT.Q4_K, _k(QT.Q4_K, 4), seed=7)
    x = torch.randn(5, layer.in_features)
    outs = []
    try:
        for name in cpu_kernels.supported_isas(lib):
            cpu_kernels.select_isa(lib, name)
            outs.append(cpu_kernels.ggml_matmul(lib, x, int(QT.Q4_K), layer.qweight, None))
    finally:
        cpu_kernels.select_isa(lib, None)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5 * outs[0].abs().max().item())


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no-kernels"])
def test_layer_decode_and_prefill(qtype, kernels, monkeypatch):
    """Decode-sized inputs go through the kernels (the input's rounding only); longer ones, and
    every input without the kernels, through the dequantized weight (summation order only)."""
    kernels_on(monkeypatch, kernels)
    layer, w = _layer(qtype, _k(qtype, 2), seed=3, bias=True)
    for rows in (2, 20):
        x = torch.randn(1, rows, layer.in_features)
        out = layer(x)
        assert out.shape == (1, rows, N)
        if kernels and rows == 2 and cpu_kernels.library() is not None:
            _check(out[0], x[0], w, layer.bias)
        else:
            ref = F.linear(x.double(), torch.from_numpy(w).double(), layer.bias.double())
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_resident_bytes_are_the_files():
    for qtype in TYPES:
        k = _k(qtype, 2)
        blocks = random_blocks(qtype, N, k, seed=1)
        layer = GGMLLinear(torch.from_numpy(blocks), int(qtype), k)
        held = sum(t.nbytes for t in layer.buffers())
        assert held == blocks.nbytes == N * k // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1]


def test_rows_that_are_not_whole_blocks_are_refused():
    assert row_bytes(int(QT.Q4_K), 320) is None and row_bytes(int(QT.F16), 256) is None  # not run
    with pytest.raises(ValueError, match="not rows of 320 weights"):
        GGMLLinear(torch.zeros(4, 180, dtype=torch.uint8), int(QT.Q4_K), 320)
