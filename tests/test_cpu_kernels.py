"""The C CPU kernels (quant/cpu_kernels.c): the int4/int8 matmuls against a float64 torch
reference (for each instruction set this machine can build), the quantized layers with the
kernels on and off, the int4 chunk layout,"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches, kernels_on

from weightsmith.quant import cpu_kernels
from weightsmith.quant import weight_only as wo

# -- the matmuls against float64 ------------------------------------------------------------


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of different ranges and offsets, so scales and zeros differ between groups.
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2 + torch.linspace(-1, 1, k)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize(("group", "k"), [(32, 96), (64, 192), (128, 256)])
def test_int4_matmul_matches_dequantized_float64_product(isa_lib, group, k, rows, bias):
    n = 37
    codes, scales, zeros = wo.quantize_int4(_weights(n, k, seed=group + rows), group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    b = torch.randn(n) if bias else None
    ref = x.double() @ wo.dequantize_int4(codes, scales, zeros).double().T
    if bias:
        ref += b.double()
    out = cpu_kernels.int4_matmul(isa_lib, x, cpu_kernels.chunk_layout(codes), scales, zeros, group, b)
    assert_matches(out, ref)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("k", [8, 40, 256])  # all-tail, a vector block + a scalar tail, blocks only
def test_int8_matmul_matches_dequantized_float64_product(isa_lib, k, rows, bias):
    n = 37
    q, scales = wo.quantize_int8(_weights(n, k, seed=k + rows))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    b = torch.randn(n) if bias else None
    ref = x.double() @ wo.dequantize_int8(q, scales).double().T
    if bias:
        ref += b.double()
    assert_matches(cpu_kernels.int8_matmul(isa_lib, x, q, scales, b), ref)


def test_matmuls_take_a_3d_input(native_lib):
    k, n = 64, 37
    w = _weights(n, k, seed=5)
    x = torch.randn(2, 3, k)
    codes, scales, zeros = wo.quantize_int4(w, 32)
    ref4 = x.double() @ wo.dequantize_int4(codes, scales, zeros).double().T
    out4 = cpu_kernels.int4_matmul(native_lib, x, cpu_kernels.chunk_layout(codes), scales, zeros, 32, None)
    assert_matches(out4, ref4)
    q, s = wo.quantize_int8(w)
    ref8 = x.double() @ wo.dequantize_int8(q, s).double().T
    # A non-contiguous input (a transposed view) is read in its logical order.
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    assert_matches(cpu_kernels.int8_matmul(native_lib, xt, q, s, None), ref8)


def test_chunk_layout_pairs_code_j_with_code_j_plus_16():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (1, 32), generator=g, dtype=torch.uint8)
    want = [int(codes[0, j]) | int(codes[0, j + 16]) << 4 for j in range(16)]
    out = cpu_kernels.chunk_layout(codes)
    assert out.dtype == torch.uint8 and out.shape == (1, 16)
    assert out[0].tolist() == want
    # Two rows of two chunks: each 32-code chunk is paired within itself.
    codes = torch.randint(0, 16, (2, 64), generator=g, dtype=torch.uint8)
    want = [
        [int(row[32 * c + j]) | int(row[32 * c + j + 16]) << 4 for c in range(2) for j in range(16)]
        for row in codes
    ]
    assert cpu_kernels.chunk_layout(codes).tolist() == want


# -- the layers: kernels on and off ---------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_layer_forward_is_the_same_with_kernels_on_and_off(native_lib, monkeypatch, kernel_calls, kind, bias):
    torch.manual_seed(7)
    linear = torch.nn.Linear(96, 37, bias=bias)
    layer = wo.Int4Linear.from_linear(linear, 32) if kind == "int4" else wo.Int8Linear.from_linear(linear)
    inputs = [torch.randn(3, 96), torch.randn(2, 4, 96), torch.randn(1, 1, 96)]
    ref = [F.linear(x.double(), layer.dequantize().double()) for x in inputs]
    if bias:
        ref = [r + layer.bias.double() for r in ref]

    kernels_on(monkeypatch, True)
    on = [layer(x) for x in inputs]
    assert kernel_calls == [f"{kind}_matmul"] * len(inputs)
    kernels_on(monkeypatch, False)
    off = [layer(x) for x in inputs]
    assert len(kernel_calls) == len(inputs)  # the PyTorch path this time
    for a, b, r in zip(on, off, ref, strict=True):
        assert a.shape == b.shape == r.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert_matches(a, r)


def test_layers_use_the_kernels_only_for_small_fp32_cpu_inputs(native_lib, monkeypatch, kernel_calls):
    kernels_on(monkeypatch, True)
    torch.manual_seed(8)
    linear = torch.nn.Linear(64, 40)
    layer = wo.Int4Linear.from_linear(linear, 32)
    x = torch.randn(wo.KERNEL_MAX_ROWS + 1, 64)
    ref = x.double() @ layer.dequantize().double().T + layer.bias.double()
    assert_matches(layer(x), ref)  # one row too many: the exact path
    assert kernel_calls == []
    assert_matches(layer(x[: wo.KERNEL_MAX_ROWS]), ref[: wo.KERNEL_MAX_ROWS])
    assert kernel_calls == ["int4_matmul"]
    layer(x[:2].double())  # not fp32
    assert kernel_calls == ["int4_matmul"]
