"""The C CPU kernels' int4/int8 matmuls as the layers call them (each instruction set against
float64: test_cpu_qdot.py): a 3-d input, the quantized layers with the kernels on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches, kernels_on, quantize_act

from weightsmith.quant import cpu_kernels
from weightsmith.quant import weight_only as wo

# -- the matmuls (each instruction set: test_cpu_qdot.py) ------------------------------------


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of different ranges and offsets, so scales and zeros differ between groups.
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2 + torch.linspace(-1, 1, k)


def test_matmuls_take_a_3d_input(native_lib):
    k, n = 64, 37
    w = _weights(n, k, seed=5)
    x = torch.randn(2, 3, k)
    xq, _ = quantize_act(x)  # the input as the kernels round it
    codes, scales, zeros = wo.quantize_int4(w, 32)
    ref4 = xq @ wo.dequantize_int4(codes, scales, zeros).double().T
    out4 = cpu_kernels.int4_matmul(native_lib, x, wo.pack_nibbles(codes), scales, zeros, 32, None)
    assert_matches(out4, ref4)
    q, s = wo.quantize_int8(w)
    ref8 = xq @ wo.dequantize_int8(q, s).double().T
    # A non-contiguous input (a transposed view) is read in its logical order.
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    assert_matches(cpu_kernels.int8_matmul(native_lib, xt, q, s, None), ref8)


# -- the layers: kernels on and off ---------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_layer_forward_with_kernels_on_and_off(native_lib, monkeypatch, kernel_calls, kind, bias):
    """On: the product of the int8-rounded input; off: the exact product."""
    torch.manual_seed(7)
    linear = torch.nn.Linear(96, 37, bias=bias)
    layer = wo.Int4Linear.from_linear(linear, 32) if kind == "int4" else wo.Int8Linear.from_linear(linear)
    inputs = [torch.randn(3, 96), torch.randn(2, 4, 96), torch.randn(1, 1, 96)]
    b = layer.bias.double() if bias else 0
    ref = [F.linear(x.double(), layer.dequantize().double()) + b for x in inputs]
    ref_q = [F.linear(quantize_act(x)[0], layer.dequantize().double()) + b for x in inputs]

    kernels_on(monkeypatch, True)
    on = [layer(x) for x in inputs]
    assert kernel_calls == [f"{kind}_matmul"] * len(inputs)
    kernels_on(monkeypatch, False)
    off = [layer(x) for x in inputs]
    assert len(kernel_calls) == len(inputs)  # the PyTorch path this time
    for a, o, r, rq in zip(on, off, ref, ref_q, strict=True):
        assert a.shape == o.shape == r.shape
        assert_matches(a, rq)
        assert_matches(o, r)
        torch.testing.assert_close(a, o, rtol=0.02, atol=0.02 * r.abs().max().item())  # the input's rounding


def test_layers_use_the_kernels_only_for_small_fp32_cpu_inputs(native_lib, monkeypatch, kernel_calls):
    kernels_on(monkeypatch, True)
    torch.manual_seed(8)
    linear = torch.nn.Linear(64, 40)
    layer = wo.Int4Linear.from_linear(linear, 32)
    x = torch.randn(wo.KERNEL_MAX_ROWS + 1, 64)
    ref = x.double() @ layer.dequantize().double().T + layer.bias.double()
    assert_matches(layer(x), ref)  # one row too many: the exact path
    assert kernel_calls == []
    ref_q = quantize_act(x)[0] @ layer.dequantize().double().T + layer.bias.double()
    assert_matches(layer(x[: wo.KERNEL_MAX_ROWS]), ref_q[: wo.KERNEL_MAX_ROWS])
    assert kernel_calls == ["int4_matmul"]
    layer(x[:2].double())  # not fp32
    assert kernel_calls == ["int4_matmul"]
