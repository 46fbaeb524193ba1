"""The integer dot-product kernels (quant/cpu_qdot.c) on every instruction set this CPU runs,
each forced in turn: int4/int8 matmuls against a float64 product of the same int8-quantized
activations (quantized here by a torch mirror of the rule), the activations' rounding bound
against the unquantized product, odd shapes and tails, extreme codes, and the dispatch."""

from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import assert_matches, kernels_on, quantize_act

from weightsmith.errors import ConfigError
from weightsmith.quant import cpu_kernels
from weightsmith.quant import weight_only as wo


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2 + torch.linspace(-1, 1, k)


def _inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[0, : min(k, 32)] = 0  # an all-zero block: d = 0
    if rows > 1:
        x[1, k // 2] = 40.0  # an outlier that sets its block's scale
    return x


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    deq, d = quantize_act(x)
    ref = deq @ w.double().T + (0 if bias is None else bias.double())
    assert_matches(out, ref)
    # Against the unquantized input: each element is off by at most d / 2.
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = 0.5 * d @ w.double().abs().T
    assert ((out.double() - exact).abs() <= bound * (1 + 1e-3) + 1e-4 * exact.abs().max()).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 32])
@pytest.mark.parametrize(("group", "k"), [(32, 32), (32, 96), (32, 224), (64, 192), (64, 320), (128, 256)])
def test_int4_matmul_matches_float64(int_isa_lib, group, k, rows, bias):
    n = 37
    codes, scales, zeros = wo.quantize_int4(_weights(n, k, seed=group + rows), group)
    x = _inputs(rows, k, seed=rows)
    b = torch.randn(n) if bias else None
    out = cpu_kernels.int4_matmul(int_isa_lib, x, wo.pack_nibbles(codes), scales, zeros, group, b)
    _check(out, x, wo.dequantize_int4(codes, scales, zeros), b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 32])
@pytest.mark.parametrize("k", [8, 32, 40, 100, 200, 256])  # all-tail, one block, block + tail, blocks only
def test_int8_matmul_matches_float64(int_isa_lib, k, rows, bias):
    n = 37
    q, scales = wo.quantize_int8(_weights(n, k, seed=k + rows))
    x = _inputs(rows, k, seed=rows)
    b = torch.randn(n) if bias else None
    _check(cpu_kernels.int8_matmul(int_isa_lib, x, q, scales, b), x, wo.dequantize_int8(q, scales), b)


def test_extreme_codes_do_not_saturate(int_isa_lib):
    """int8 -128 (a GGUF Q8_0 file may hold it) and 127 against inputs at +-127 steps, and
    int4 code 15 everywhere: the widest products the 16-bit pair sums (AVX2) must hold."""
    k = 64
    x = torch.tensor([[1.0, -1.0] * (k // 2), [-1.0] * k, [1.0] * k])
    q = torch.tensor([[-128] * k, [127] * k, [-128, 127] * (k // 2)], dtype=torch.int8)
    s = torch.tensor([0.5, 0.25, 1.0])
    _check(cpu_kernels.int8_matmul(int_isa_lib, x, q, s, None), x, wo.dequantize_int8(q, s), None)
    codes = torch.full((3, k), 15, dtype=torch.uint8)
    sc, z = torch.ones(3, 2), torch.full((3, 2), -7.5)
    out = cpu_kernels.int4_matmul(int_isa_lib, x, wo.pack_nibbles(codes), sc, z, 32, None)
    _check(out, x, wo.dequantize_int4(codes, sc, z), None)


def test_every_instruction_set_gives_the_same_sums(monkeypatch):
    """The paths differ only in float summation order: a larger product agrees across them."""
    kernels_on(monkeypatch, True)
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no working C compiler")
    codes, scales, zeros = wo.quantize_int4(_weights(64, 1536, seed=1), 32)
    packed, x = wo.pack_nibbles(codes), _inputs(5, 1536, seed=2)
    outs = {}
    try:
        for name in cpu_kernels.supported_isas(lib):
            cpu_kernels.select_isa(lib, name)
            outs[name] = cpu_kernels.int4_matmul(lib, x, packed, scales, zeros, 32, None)
    finally:
        cpu_kernels.select_isa(lib, None)
    for out in outs.values():
        torch.testing.assert_close(out, outs["scalar"], rtol=1e-5, atol=1e-4)


def test_dispatch_picks_the_best_and_refuses_what_the_cpu_lacks(monkeypatch):
    kernels_on(monkeypatch, True)
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no working C compiler")
    supported = cpu_kernels.supported_isas(lib)
    assert supported[0] == "scalar" and set(supported) <= set(cpu_kernels.ISAS)
    cpu_kernels.select_isa(lib, None)
    assert lib.ws_qdot_isa().decode() == supported[-1]
    with pytest.raises(ConfigError, match="WEIGHTSMITH_CPU_ISA='sse9'.*use one of"):
        cpu_kernels.select_isa(lib, "sse9")
    assert lib.ws_qdot_isa().decode() == supported[-1]  # unchanged
    missing = [name for name in cpu_kernels.ISAS if name not in supported]
    if missing:
        with pytest.raises(ConfigError):
            cpu_kernels.select_isa(lib, missing[0])


def test_the_environment_variable_forces_an_instruction_set(monkeypatch):
    kernels_on(monkeypatch, True)
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no working C compiler")
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "scalar")
    try:
        cpu_kernels._select_from_env(lib)
        assert lib.ws_qdot_isa().decode() == "scalar"
        monkeypatch.setenv(cpu_kernels.ISA_ENV, "nonsense")
        cpu_kernels._select_from_env(lib)  # a warning, and the previous choice stays
        assert lib.ws_qdot_isa().decode() == "scalar"
    finally:
        cpu_kernels.select_isa(lib, None)


@pytest.mark.parametrize(("group", "k"), [(32, 96), (128, 256)])
def test_int4_dequantize_is_torchs(monkeypatch, group, k):
    """The exact path's weight, made in C per call, is bit for bit the torch dequantization."""
    kernels_on(monkeypatch, True)
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no working C compiler")
    codes, scales, zeros = wo.quantize_int4(_weights(19, k, seed=3), group)
    out = cpu_kernels.int4_dequantize(lib, wo.pack_nibbles(codes), scales, zeros, group)
    assert torch.equal(out, wo.dequantize_int4(codes, scales, zeros))


class _QAct(ctypes.Structure):
    """cpu_kernels.h's ws_qact."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("m", "k", "kp", "nb", "layout")),
        ("src", ctypes.c_void_p),
        ("q", ctypes.POINTER(ctypes.c_int8)),
        ("d", ctypes.POINTER(ctypes.c_float)),
        ("xs", ctypes.POINTER(ctypes.c_float)),
        *((name, ctypes.c_int64) for name in ("cap_q", "cap_d", "cap_x")),
    ]


@pytest.mark.parametrize("layout", [0, 1])  # WS_QACT_INT8 (natural order), WS_QACT_INT4 (evens first)
def test_input_quantization_is_the_rule_bit_for_bit(int_isa_lib, layout):
    """ws_qact_quantize (vector code for whole blocks, C for a partial one) gives exactly the
    codes, scales and sums of the rule: d = max|x| / 127, q = round(x / d) ties to even."""
    m, k = 3, 100  # three whole blocks and a partial one
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=g) * 3
    x[0, :32] = 0  # d = 0
    x[1, 0], x[1, 1:32] = 63.5, torch.arange(-15, 16) * 0.5 + 0.25  # d = 0.5: x / d = n + 0.5, ties
    x[2, 40] = 1e6  # a big outlier
    a = _QAct()
    flat = x.contiguous()
    i64 = ctypes.c_int64
    assert (
        int_isa_lib.ws_qact_quantize(
            ctypes.byref(a), ctypes.c_void_p(flat.data_ptr()), i64(m), i64(k), i64(layout)
        )
        == 0
    )
    try:
        nb = a.nb
        q = torch.tensor(a.q[: m * nb * 32], dtype=torch.int8).view(m, nb, 32)
        d = torch.tensor(a.d[: m * nb], dtype=torch.float32).view(m, nb)
        xs = torch.tensor(a.xs[: m * nb], dtype=torch.float32).view(m, nb)
    finally:
        int_isa_lib.ws_qact_free(ctypes.byref(a))
    xb = torch.nn.functional.pad(x, (0, nb * 32 - k)).view(m, nb, 32)
    d_ref = xb.abs().amax(-1) / 127
    inv = torch.where(d_ref > 0, 1.0 / d_ref, torch.zeros_like(d_ref))
    q_ref = torch.round(xb * inv[..., None]).clamp(-127, 127).to(torch.int8)
    if layout == 1:
        q_ref = torch.cat([q_ref[..., 0::2], q_ref[..., 1::2]], dim=-1)
    assert torch.equal(d, d_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(xs, d_ref * q_ref.float().sum(-1))
