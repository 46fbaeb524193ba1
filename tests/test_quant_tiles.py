"""Int4Linear's decode layout (quant/tiles.py): 16-row tiles, exact both ways, the tiled
kernels on every instruction set against a float64 product, a tiled layer that saves, moves and
casts as the portable one, and the CPU decode plan tiling and untiling a model's layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_matches, quantize_act
from ggml_blocks import random_blocks, with_edge_scales
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from test_cpu_qdot import _inputs, _weights

from weightsmith.cpu_decode.layout import Swaps, tile_quantized
from weightsmith.quant import cpu_kernels, gguf_tiles
from weightsmith.quant import tiles as qtiles
from weightsmith.quant import weight_only as wo
from weightsmith.quant.ggml_linear import GGMLLinear


def _layer(n: int, k: int, group: int, seed: int = 0, bias: bool = False) -> wo.Int4Linear:
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_weights(n, k, seed))
        if bias:
            linear.bias.copy_(torch.linspace(-1, 1, n))
    return wo.Int4Linear.from_linear(linear, group)


@pytest.mark.parametrize(("n", "k", "group"), [(16, 32, 32), (48, 96, 32), (32, 192, 64), (16, 256, 128)])
def test_tiles_hold_the_same_bytes_and_untile_exactly(n, k, group):
    layer = _layer(n, k, group)
    packed = qtiles.tile_int4(layer.qweight, layer.scales, layer.zeros, group)
    assert packed.dtype == torch.uint8 and packed.numel() == qtiles.nbytes_int4(n, k, group)
    assert packed.numel() == layer.qweight.numel() + 2 * (layer.scales.numel() + layer.zeros.numel())
    back = qtiles.untile_int4(packed, n, k, group)
    for a, b in zip(back, (layer.qweight, layer.scales, layer.zeros), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # The documented order: tile 0, group 0, block 0, chunk 1, row 2 = row 2's bytes 4..7.
    assert torch.equal(packed[64 + 8 : 64 + 12], layer.qweight[2, 4:8])
    # After a group's blocks: its 16 scales, then its 16 zeros (fp16 bytes).
    end = group // 32 * 256
    assert torch.equal(packed[end : end + 32].view(torch.float16), layer.scales[:16, 0])
    assert torch.equal(packed[end + 32 : end + 64].view(torch.float16), layer.zeros[:16, 0])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 37])
@pytest.mark.parametrize(
    ("n", "group", "k"), [(16, 32, 32), (48, 32, 96), (32, 32, 224), (32, 64, 320), (16, 128, 256)]
)
def test_tiled_matmul_matches_float64(int_isa_lib, n, group, k, rows, bias):
    layer = _layer(n, k, group, seed=k + rows, bias=bias)
    packed = qtiles.tile_int4(layer.qweight, layer.scales, layer.zeros, group)
    x = _inputs(rows, k, seed=rows)
    b = layer.bias.detach() if bias else None
    out = cpu_kernels.tiled_matmul(int_isa_lib, x, packed, n, 4, group, b)
    ref = quantize_act(x)[0] @ layer.dequantize().double().T + (0 if b is None else b.double())
    assert_matches(out, ref)
    # The same sums as the portable layout's kernel, up to float summation order.
    rows_out = cpu_kernels.int4_matmul(int_isa_lib, x, layer.qweight, layer.scales, layer.zeros, group, b)
    torch.testing.assert_close(out, rows_out, rtol=1e-5, atol=1e-5 * rows_out.abs().max().item())


def test_tiled_matmul_with_the_widest_codes(int_isa_lib):
    """Code 15 and inputs at +-127 everywhere: the largest pair sums (AVX2's 16-bit ones) hold."""
    n, k = 32, 128
    codes = torch.full((n, k), 15, dtype=torch.uint8)
    scales, zeros = (
        torch.full((n, 4), 0.5, dtype=torch.float16),
        torch.full((n, 4), -2.0, dtype=torch.float16),
    )
    packed = qtiles.tile_int4(wo.pack_nibbles(codes), scales, zeros, 32)
    x = torch.ones(2, k) * torch.tensor([1.0, -1.0])[:, None]
    out = cpu_kernels.tiled_matmul(int_isa_lib, x, packed, n, 4, 32, None)
    assert torch.equal(out, torch.full((2, n), 5.5 * k) * torch.tensor([1.0, -1.0])[:, None])


@pytest.mark.parametrize(("group", "k"), [(32, 96), (64, 192), (128, 256)])
def test_tiled_dequantize_is_torchs(native_lib, group, k):
    layer = _layer(32, k, group, seed=5)
    packed = qtiles.tile_int4(layer.qweight, layer.scales, layer.zeros, group)
    out = cpu_kernels.int4_tiled_dequantize(native_lib, packed, 32, k, group)
    assert torch.equal(out, layer.dequantize())


def test_a_tiled_layer_keeps_its_state_dict_forward_and_moves(native_lib):
    layer = _layer(48, 96, 32, seed=3, bias=True)
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    x = torch.randn(2, 96)
    y_rows, y_long = layer(x), layer(torch.randn(20, 96))
    layer.tile_into(torch.empty(qtiles.nbytes_int4(48, 96, 32), dtype=torch.uint8))
    assert layer.tiles is not None and layer.qweight is None  # no second copy
    after = layer.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[n], before[n]) and after[n].dtype == before[n].dtype for n in before)
    torch.testing.assert_close(layer(x), y_rows, rtol=1e-5, atol=1e-5)  # the tiled kernel
    torch.manual_seed(0)
    assert torch.equal(layer.dequantize(), wo.dequantize_int4(wo.unpack_nibbles(before["qweight"]),
                                                              before["scales"], before["zeros"]))  # fmt: skip
    assert "tiled" in repr(layer)
    layer.float()  # a cast untiles and keeps the int4 values exactly (fp16 scales and zeros)
    assert layer.tiles is None and layer.scales.dtype == torch.float16
    assert all(torch.equal(layer.state_dict()[n], before[n]) for n in before)
    layer.tile_into(torch.empty(qtiles.nbytes_int4(48, 96, 32), dtype=torch.uint8))
    layer.load_state_dict(before)  # loading untiles first
    assert layer.tiles is None and torch.equal(layer.qweight, before["qweight"])
    assert y_long.shape == (20, 48)


def test_tile_quantized_puts_a_models_layers_in_one_buffer_and_undo_restores_them():
    model = torch.nn.Sequential(
        _layer(32, 64, 32, seed=1), _layer(16, 64, 32, seed=2), _layer(8, 64, 32, seed=3)
    )
    before = {n: t.clone() for n, t in model.state_dict().items()}
    swaps = Swaps()
    tile_quantized(model, swaps)
    assert model[0].tiles is not None and model[1].tiles is not None
    assert model[2].tiles is None  # 8 rows: no whole tile, stays portable
    assert model[0].tiles.untyped_storage().data_ptr() == model[1].tiles.untyped_storage().data_ptr()
    assert model[0].tiles.data_ptr() % 64 == 0 and model[1].tiles.data_ptr() % 64 == 0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    tile_quantized(model, swaps)  # again: nothing left to tile
    assert len(swaps.tiled) == 2
    swaps.undo()
    assert all(m.tiles is None for m in model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def _int8_layer(n: int, k: int, seed: int = 0, bias: bool = False) -> wo.Int8Linear:
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_weights(n, k, seed))
        linear.weight[0, :3] = torch.tensor([-1e3, 1e3, 0.0])  # codes -127, 127 in row 0
        if bias:
            linear.bias.copy_(torch.linspace(-1, 1, n))
    return wo.Int8Linear.from_linear(linear)


@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (32, 576)])
def test_int8_tiles_untile_exactly(n, k):
    layer = _int8_layer(n, k)
    packed = qtiles.tile_int8(layer.qweight, layer.scales)
    assert packed.numel() == qtiles.nbytes_int8(n, k) == layer.qweight.numel() + 4 * layer.scales.numel()
    q, s = qtiles.untile_int8(packed, n, k)
    assert q.dtype == torch.int8 and torch.equal(q, layer.qweight) and torch.equal(s, layer.scales)
    # Block 0, chunk 2, row 3 = row 3's bytes 8..11, stored as w + 128.
    assert torch.equal(
        packed[128 + 12 : 128 + 16], (layer.qweight[3, 8:12].to(torch.int16) + 128).to(torch.uint8)
    )


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 37])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (32, 224)])
def test_int8_tiled_matmul_matches_float64(int_isa_lib, n, k, rows, bias):
    layer = _int8_layer(n, k, seed=k + rows, bias=bias)
    packed = qtiles.tile_int8(layer.qweight, layer.scales)
    x = _inputs(rows, k, seed=rows)
    x[0, 40 % k] = -60.0  # a block with its extreme input negative
    b = layer.bias.detach() if bias else None
    out = cpu_kernels.tiled_matmul(int_isa_lib, x, packed, n, 8, None, b)
    ref = quantize_act(x)[0] @ layer.dequantize().double().T + (0 if b is None else b.double())
    assert_matches(out, ref)


#: The GGUF types with tiles, by name.
GGML_TILED = {"q4_0": QT.Q4_0, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1, "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K,
              "q8_0": QT.Q8_0, "iq4_nl": QT.IQ4_NL, "iq4_xs": QT.IQ4_XS, "q3_k": QT.Q3_K,
              "q2_k": QT.Q2_K}  # fmt: skip


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bits", [4, 8, *GGML_TILED])
def test_projections_in_one_call_are_each_calls_bits(int_isa_lib, bits, rows):
    """q/k/v-like weights of one input in one parallel loop (the fused step's q/k/v and gate/up):
    each output the bits of its own call, whatever tiles the threads split it into, with or
    without a bias."""
    k, shapes = (
        (256 if bits in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs") else 96),
        [(48, True), (16, False), (32, True)],
    )
    weights = []
    for i, (n, bias) in enumerate(shapes):
        if bits == 4:
            layer = _layer(n, k, 32, seed=10 + i, bias=bias)
            packed = qtiles.tile_int4(layer.qweight, layer.scales, layer.zeros, 32)
        elif bits == 8:
            layer = _int8_layer(n, k, seed=10 + i, bias=bias)
            packed = qtiles.tile_int8(layer.qweight, layer.scales)
        else:
            layer = _ggml_layer(GGML_TILED[bits], n, k, seed=10 + i, bias=bias)
            packed = layer.tile_format().tile(layer.qweight)
        weights.append((packed, n, layer.bias.detach() if bias else None))
    x = _inputs(rows, k, seed=3)
    ggml, bits = GGML_TILED.get(bits), 8 if bits in (8, "q8_0") else 4
    group = 32 if bits == 4 else None
    together = cpu_kernels.tiled_matmuls(int_isa_lib, x, weights, bits, group, ggml)
    for got, (packed, n, b) in zip(together, weights, strict=True):
        assert got.shape == (rows, n)
        assert torch.equal(got, cpu_kernels.tiled_matmul(int_isa_lib, x, packed, n, bits, group, b, ggml))
    with pytest.raises(ValueError, match="1 to 3 weights"):
        cpu_kernels.tiled_matmuls(int_isa_lib, x, weights * 2, bits, group, ggml)


def _ggml_layer(qtype: QT, n: int, k: int, seed: int = 0, bias: bool = False) -> GGMLLinear:
    """A GGUF matrix of a tiled type: a zero, a subnormal and a negative block scale, and in row
    1's first block the extreme codes (Q8_0: -128, 127, -127; 4 bits: 0 and 15; Q5_*: 0 and 31;
    Q4_K: and all-ones 6-bit scales and minima, and a negative dmin; Q2_K: codes 3 and 0 with
    scale and minimum 15; Q6_K: 0, 63 and scales
    -128, 127; IQ4: the levels -127 and 113, IQ4_XS with sub-scales 31 and -32; Q3_K: codes
    -4 and 3, scales 31 and -32)."""
    raw = with_edge_scales(random_blocks(qtype, n, k, seed), qtype)
    blocks = raw.reshape(n, -1, GGML_QUANT_SIZES[qtype][1])
    if qtype in (QT.Q4_K, QT.Q5_K):
        at = 16 if qtype == QT.Q4_K else 48
        blocks[1, 0, at : at + 3] = [0xF0, 0x0F, 0xFF]
        blocks[1, 0, 4:16] = 0xFF
        if qtype == QT.Q5_K:  # codes 31 and 0 too
            blocks[1, 0, 16:19] = [0xFF, 0x00, 0xFF]
        blocks[2, 0, 2:4] = np.array([-0.004], np.float16).view(np.uint8)
    elif qtype in (QT.Q5_0, QT.Q5_1):  # codes 0 and 31 (low nibbles and fifth bits)
        head = 2 if qtype == QT.Q5_0 else 4
        blocks[1, 0, head : head + 4] = [0xF0, 0x0F, 0xFF, 0x00]
        blocks[1, 0, head + 4 : head + 7] = [0xF0, 0x0F, 0xFF]
    elif qtype == QT.Q2_K:  # element 0 of sub-blocks 0-3: 3, element 1: 0; scales and minima 15
        blocks[1, 0, 16:18], blocks[1, 0, 0:16] = [0xFF, 0x00], 0xFF
    elif qtype == QT.Q3_K:  # element 0 of sub-blocks 0-3: 3 (all bits set), element 1: -4
        blocks[1, 0, 0:2], blocks[1, 0, 32:34] = [0xFF, 0x00], [0xFF, 0x00]
        blocks[1, 0, 96:102], blocks[1, 0, 102:108] = 0xFF, 0x00
    elif qtype == QT.IQ4_XS:  # codes 0 and 15; sub-scale 31 (ls 63) in sub-block 0, -32 in 1
        blocks[1, 0, 8:11] = [0xF0, 0x0F, 0xFF]
        blocks[1, 0, 2:4], blocks[1, 0, 4] = [0x03, 0x00], 0x0F
    elif qtype == QT.Q6_K:  # codes 0 and 63 (low and top bits), scales -128 and 127
        blocks[1, 0, 0:2], blocks[1, 0, 128:130] = [0x00, 0xFF], [0x00, 0xFF]
        blocks[1, 0, 192:194] = [0x80, 0x7F]
    else:
        blocks[1, 0, 2:5] = [0x80, 0x7F, 0x81] if qtype == QT.Q8_0 else [0xF0, 0x0F, 0xFF]
    return GGMLLinear(torch.from_numpy(raw), qtype, k, torch.linspace(-1, 1, n) if bias else None)


def _tile_fns(name: str):
    return getattr(gguf_tiles, f"tile_{name}"), getattr(gguf_tiles, f"untile_{name}")


@pytest.mark.parametrize("name", list(GGML_TILED))
@pytest.mark.parametrize(("n", "k"), [(16, 256), (48, 512), (32, 768)])
def test_ggml_tiles_hold_the_files_bytes_and_untile_exactly(name, n, k):
    blocks = _ggml_layer(GGML_TILED[name], n, k, seed=n + k).qweight
    tile, untile = _tile_fns(name)
    packed = tile(blocks)
    assert packed.dtype == torch.uint8 and packed.numel() == blocks.numel()
    (back,) = untile(packed, n, blocks.shape[1])
    assert torch.equal(back, blocks)

    def halves(at: int) -> torch.Tensor:  # the 16 rows' fp16 at bytes at, at + 1 of their first block
        return blocks[:16, at : at + 2].contiguous().view(torch.int16).view(-1)

    if name == "q8_0":
        # Block 0, chunk 1, row 2 = row 2's codes 4..7 (after its 2-byte scale), as w + 128 ...
        assert torch.equal(packed[64 + 8 : 64 + 12], blocks[2, 2 + 4 : 2 + 8] ^ 0x80)
        # ... and after the block's 512 code bytes, the 16 rows' fp16 scales of the block.
        assert torch.equal(packed[512:544].view(torch.int16), halves(0))
    elif name == "q4_0":
        # Block 0, chunk 1, row 2 = row 2's codes 8..15 in pairs (2j low, 2j + 1 high); Q4_0's
        # byte i holds codes i (low) and i + 16 (high) ...
        codes = torch.cat([blocks[2, 2:18] & 15, blocks[2, 2:18] >> 4])
        assert torch.equal(packed[64 + 8 : 64 + 12], codes[8:16:2] | (codes[9:16:2] << 4))
        # ... and after the block's 256 code bytes, the 16 rows' fp16 scales d.
        assert torch.equal(packed[256:288].view(torch.int16), halves(0))
    elif name in ("q5_0", "q5_1"):
        # Block 0, chunk 1, row 2 = row 2's codes 8..15's low nibbles in pairs; byte 4 * 2 + 0 of
        # the fifth bits holds codes 8 (bit 1, chunk 1's first even code) and 9 (bit 5) ...
        head = 2 if name == "q5_0" else 4
        qs = blocks[2, head + 4 : head + 20]
        low = torch.cat([qs & 15, qs >> 4])
        assert torch.equal(packed[64 + 8 : 64 + 12], low[8:16:2] | (low[9:16:2] << 4))
        fifth = int.from_bytes(bytes(blocks[2, head : head + 4].tolist()), "little")
        assert (packed[256 + 8].item() >> 1 & 1, packed[256 + 8].item() >> 5 & 1) == (
            fifth >> 8 & 1,
            fifth >> 9 & 1,
        )
        # ... and after the block's 320 bytes, the 16 rows' d (then m).
        assert torch.equal(packed[320:352].view(torch.int16), halves(0))
        if name == "q5_1":
            assert torch.equal(packed[352:384].view(torch.int16), halves(2))
    elif name == "q6_k":
        # Sub-block 0, chunk 1, row 2 = row 2's codes 8..15's low nibbles in pairs; the top bits
        # of codes 0, 8 (bits 0-1, 2-3) and 1, 9 (4-5, 6-7) in byte 0 of row 2 after the chunks ...
        low, top = (
            blocks[2, 0:32] & 15,
            blocks[2, 128:160] & 3,
        )  # sub-block 0: ql's low nibbles, qh's bits 0-1
        assert torch.equal(packed[64 + 8 : 64 + 12], low[8:16:2] | (low[9:16:2] << 4))
        assert packed[256 + 8] == top[0] | top[8] << 2 | top[1] << 4 | top[9] << 6
        # ... and after the 8 sub-blocks' 3072 bytes, the rows' d, then scale i of row r at 32 + 16 i + r.
        assert torch.equal(packed[3072:3104].view(torch.int16), halves(208))
        assert packed[3072 + 32 + 16 * 5 + 3] == blocks[3, 192 + 5]
    elif name == "q3_k":
        # Sub-block 0, row 2: operand 0 (the even elements 0, 2, 4, 6) byte b holds element 2b's
        # low 2 bits (bits 0-1 of the file's code byte 2b) in the first plane and its third bit
        # (bit 0 of hmask byte 2b) in the third ...
        for b in range(4):
            assert packed[4 * 2 + b] & 3 == blocks[2, 32 + 2 * b] & 3
            assert packed[128 + 4 * 2 + b] & 1 == blocks[2, 2 * b] & 1
        # ... and after the 8 sub-blocks' 1536 bytes, the rows' d, then scale byte i of row r at
        # 32 + 16 i + r.
        assert torch.equal(packed[1536:1568].view(torch.int16), halves(108))
        assert packed[1536 + 32 + 16 * 5 + 3] == blocks[3, 96 + 5]
    elif name == "q2_k":
        # Q3_K's planes from the file's code bytes 16..79; then d, dmin and scale byte i of row r
        # at 64 + 16 i + r.
        for b in range(4):
            assert packed[4 * 2 + b] & 3 == blocks[2, 16 + 2 * b] & 3
        assert torch.equal(packed[1024:1056].view(torch.int16), halves(80))
        assert torch.equal(packed[1056:1088].view(torch.int16), halves(82))
        assert packed[1024 + 64 + 16 * 5 + 3] == blocks[3, 5]
    elif name == "iq4_nl":  # Q4_0's layout, byte for byte
        assert torch.equal(packed, gguf_tiles.tile_q4_0(blocks))
    elif name == "iq4_xs":
        # Sub-block 1 (the file's code bytes 24..39), chunk 1, row 2 = row 2's codes 8..15 of it
        # in pairs ...
        qs = blocks[2, 24:40]
        codes = torch.cat([qs & 15, qs >> 4])
        assert torch.equal(packed[256 + 64 + 8 : 256 + 64 + 12], codes[8:16:2] | (codes[9:16:2] << 4))
        # ... and after the 8 sub-blocks' 2048 bytes, the rows' d, their high bits, then low-bit
        # byte i of row r at 64 + 16 i + r.
        assert torch.equal(packed[2048:2080].view(torch.int16), halves(0))
        assert torch.equal(packed[2080:2112].view(torch.int16), halves(2))
        assert packed[2048 + 64 + 16 * 3 + 5] == blocks[5, 4 + 3]
    elif name == "q5_k":
        # Sub-block 1 (high nibbles of the file's first 32 code bytes; bit 1 of the fifth-bit
        # bytes) starts at 320: chunk 1, row 2 = row 2's codes 8..15 in pairs; then its fifth
        # bits, byte 4 * 2 + 0 holding codes 8 (bit 1) and 9 (bit 5) ...
        codes, fifth = blocks[2, 48:80] >> 4, (blocks[2, 16:48] >> 1) & 1
        assert torch.equal(packed[320 + 64 + 8 : 320 + 64 + 12], codes[8:16:2] | (codes[9:16:2] << 4))
        byte = packed[320 + 256 + 8].item()
        assert (byte >> 1 & 1, byte >> 5 & 1) == (fifth[8].item(), fifth[9].item())
        # ... and after the 8 sub-blocks' 2560 bytes, Q4_K's header.
        assert torch.equal(packed[2560:2592].view(torch.int16), halves(0))
        assert packed[2560 + 64 + 16 * 5 + 3] == blocks[3, 4 + 5]
    else:
        # Sub-block 1 (the high nibbles of the file's first 32 code bytes), chunk 1, row 2 = row
        # 2's codes 8..15 of it in pairs ...
        codes = blocks[2, 16:48] >> 4
        assert torch.equal(packed[256 + 64 + 8 : 256 + 64 + 12], codes[8:16:2] | (codes[9:16:2] << 4))
        # ... and after the 8 sub-blocks' 2048 bytes, the rows' d, their dmin, then scale byte i
        # of row r at 64 + 16 i + r.
        assert torch.equal(packed[2048:2080].view(torch.int16), halves(0))
        assert torch.equal(packed[2080:2112].view(torch.int16), halves(2))
        assert packed[2048 + 64 + 16 * 5 + 3] == blocks[3, 4 + 5]


@pytest.mark.parametrize("name", list(GGML_TILED))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 5, 37])
@pytest.mark.parametrize(("n", "k"), [(16, 256), (48, 512), (32, 768)])
def test_ggml_tiled_matmul_matches_float64(int_isa_lib, name, n, k, rows, bias):
    qtype = GGML_TILED[name]
    layer = _ggml_layer(qtype, n, k, seed=k + rows, bias=bias)
    x = _inputs(rows, k, seed=rows)
    b = layer.bias.detach() if bias else None
    bits, group = (8, None) if name == "q8_0" else (4, 32)
    packed = layer.tile_format().tile(layer.qweight)
    out = cpu_kernels.tiled_matmul(int_isa_lib, x, packed, n, bits, group, b, ggml=qtype)
    # The input as the int4 kernels quantize it (each block's evens then odds) is the same
    # values per element as the int8 order: only the storage order differs.
    ref = quantize_act(x)[0] @ layer.dequantize().double().T + (0 if b is None else b.double())
    assert_matches(out, ref)
    # The same sums as the GGUF rows' kernel, up to float summation order.
    rows_out = cpu_kernels.ggml_matmul(int_isa_lib, x, qtype, layer.qweight, b)
    torch.testing.assert_close(out, rows_out, rtol=1e-5, atol=1e-5 * rows_out.abs().max().item())


@pytest.mark.parametrize("name", list(GGML_TILED))
def test_a_tiled_ggml_layer_keeps_its_blocks_and_forward(native_lib, name):
    qtype = GGML_TILED[name]
    layer = _ggml_layer(qtype, 32, 256, seed=4, bias=True)
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    x = torch.randn(3, 256)
    long = torch.ones(wo.TILED_KERNEL_MAX_ROWS + 1, 256)
    want, want_long, want_w = layer(x), layer(long), layer.dequantize()
    layer.tile_into(torch.empty(layer.tile_nbytes(), dtype=torch.uint8))
    assert (
        layer.qweight is None and layer.tiles is not None and layer.kernel_rows() == wo.TILED_KERNEL_MAX_ROWS
    )
    assert layer.tile_nbytes() == before["qweight"].numel()  # resident: the file's bytes
    assert all(torch.equal(t, before[n]) for n, t in layer.state_dict().items())
    assert torch.equal(layer.dequantize(), want_w)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(layer(long), want_long)  # the exact path, from the tiles
    layer.untile()
    assert torch.equal(layer.qweight, before["qweight"])
    # Rows that do not fill 16 have no tiles; nor have the other types.
    assert _ggml_layer(qtype, 24, 256).tile_format() is None
    q4_1 = GGMLLinear(torch.from_numpy(random_blocks(QT.Q4_1, 32, 96, 1)), QT.Q4_1, 96)
    assert q4_1.tile_format() is None and not q4_1.can_tile()


def test_a_tiled_int8_layer_keeps_its_state_dict_and_forward(native_lib):
    layer = _int8_layer(32, 96, seed=4, bias=True)
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    x = torch.randn(3, 96)
    long = torch.ones(wo.TILED_KERNEL_MAX_ROWS + 1, 96)
    want, want_long = layer(x), layer(long)
    layer.tile_into(torch.empty(layer.tile_nbytes(), dtype=torch.uint8))
    assert layer.qweight is None and layer.scales is None
    assert all(torch.equal(t, before[n]) for n, t in layer.state_dict().items())
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(long), want_long)  # the exact path, from the tiles
    layer.untile()
    assert torch.equal(layer.qweight, before["qweight"]) and torch.equal(layer.scales, before["scales"])
