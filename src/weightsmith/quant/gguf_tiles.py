"""A GGUF file's quantized matrices as 16-row tiles (the tiled kernels' layout, see quant/tiles.py).

`--keep-quantized` keeps a GGUF file's blocks as they are (quant/ggml_linear.py). In the CPU
decode layout a matrix with a multiple of 16 rows is held instead as tiles of the same bytes,
reordered so that the tiled kernels (cpu_qdot.c, cpu_qtile_x86.h) read 16 rows' codes with one
vector load and multiply them in integer dot products: Q8_0 as the int8 tiles, each block's 16
fp16 scales after its chunks; Q4_0 as the int4 tiles of groups of 32 without zeros (Q4_0's is
-8 times the scale); Q5_0 / Q5_1 as those codes' low nibbles with each block's fifth bits and
scales after them; Q4_K as the int4 tiles' blocks with each super-block's 16 row headers after
them (Q5_K: each block's fifth bits after it); Q6_K as those blocks' low nibbles, each
sub-block's top bits after them. Each `tile_*` has an exact inverse `untile_*`, and a tiled
matrix takes exactly the file's bytes.
"""

from __future__ import annotations

import torch

from weightsmith.quant.kquants import pack_crumbs, unpack_crumbs
from weightsmith.quant.tiles import ROWS

#: Bytes of a GGUF Q8_0 block: an fp16 scale, then 32 int8 codes.
Q8_0_BLOCK_BYTES = 34


def tile_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q8_0 matrix (uint8 (N, K/32 * 34): rows of blocks, each an fp16 scale and 32 int8
    codes) as Q8_0 tiles (uint8, the same number of bytes): for each tile of 16 rows and each
    block of 32 inputs, the int8 tile's 8 chunks (row r's codes 4c..4c+3 at bytes 4r..4r+3, as
    w + 128), then the 16 rows' fp16 scales of the block (544 bytes a block)."""
    n, row = blocks.shape
    t, nb = n // ROWS, row // Q8_0_BLOCK_BYTES
    b = blocks.view(t, ROWS, nb, Q8_0_BLOCK_BYTES)
    # (tile, row, block, chunk, byte) -> (tile, block, [chunk, row, byte])
    codes = (b[..., 2:] ^ 0x80).reshape(t, ROWS, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(t, nb, 32 * ROWS)
    scales = b[..., :2].permute(0, 2, 1, 3).reshape(t, nb, 2 * ROWS)  # (tile, block, [row, fp16 byte])
    return torch.cat([codes, scales], dim=2).reshape(-1)


def untile_q8_0(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_q8_0`'s inverse: (the GGUF rows of blocks, uint8 (N, row_bytes)), a new tensor."""
    t, nb = n // ROWS, row_bytes // Q8_0_BLOCK_BYTES
    g = tiles.view(t, nb, 34 * ROWS)
    codes = (g[..., : 32 * ROWS].reshape(t, nb, 8, ROWS, 4).permute(0, 3, 1, 2, 4) ^ 0x80).reshape(
        t, ROWS, nb, 32
    )
    scales = g[..., 32 * ROWS :].reshape(t, nb, ROWS, 2).permute(0, 2, 1, 3)
    return (torch.cat([scales, codes], dim=3).reshape(n, row_bytes).contiguous(),)


#: Bytes of a GGUF Q4_0 block: an fp16 scale d, then 16 bytes whose low nibbles are codes 0..15
#: and high nibbles codes 16..31 (the weight is d * (q - 8)).
Q4_0_BLOCK_BYTES = 18


def tile_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q4_0 matrix (uint8 (N, K/32 * 18)) as Q4_0 tiles (uint8, the same number of
    bytes): the int4 tiles of groups of 32 with no zeros (the kernels take -8 d), i.e. for each
    tile of 16 rows and each block, the 4 chunks of the block's codes in the portable nibble
    order (byte j: codes 2j and 2j + 1), then the 16 rows' fp16 scales d (288 bytes a block)."""
    n, row = blocks.shape
    t, nb = n // ROWS, row // Q4_0_BLOCK_BYTES
    b = blocks.view(t, ROWS, nb, Q4_0_BLOCK_BYTES)
    scales = b[..., :2].permute(0, 2, 1, 3).reshape(t, nb, 2 * ROWS)  # (tile, block, [row, fp16 byte])
    return torch.cat([_chunks(b[..., 2:]), scales], dim=2).reshape(-1)


def untile_q4_0(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_q4_0`'s inverse: (the GGUF rows of blocks, uint8 (N, row_bytes)), a new tensor."""
    t, nb = n // ROWS, row_bytes // Q4_0_BLOCK_BYTES
    g = tiles.view(t, nb, Q4_0_BLOCK_BYTES * ROWS)
    scales = g[..., 16 * ROWS :].reshape(t, nb, ROWS, 2).permute(0, 2, 1, 3)
    return (torch.cat([scales, _unchunks(g[..., : 16 * ROWS])], dim=3).reshape(n, row_bytes).contiguous(),)


def _chunks(qs: torch.Tensor) -> torch.Tensor:
    """(tile, row, block, 16) GGUF code bytes of blocks of 32 (byte l: code l in the low nibble,
    code l + 16 in the high one) -> (tile, block, 16 * ROWS): each block as the int4 tiles' 4
    chunks (row r's portable bytes 4c..4c+3 at 4r..4r+3, byte j holding codes 2j and 2j + 1)."""
    t, _, nb, _ = qs.shape
    codes = torch.cat([qs & 15, qs >> 4], dim=3)  # (tile, row, block, 32) in order
    portable = codes[..., 0::2] | (codes[..., 1::2] << 4)
    # (tile, row, block, chunk, byte) -> (tile, block, [chunk, row, byte])
    return portable.reshape(t, ROWS, nb, 4, 4).permute(0, 2, 3, 1, 4).reshape(t, nb, 16 * ROWS)


def _unchunks(chunks: torch.Tensor) -> torch.Tensor:
    """`_chunks`' inverse: (tile, block, 16 * ROWS) -> (tile, row, block, 16)."""
    t, nb = chunks.shape[:2]
    portable = chunks.reshape(t, nb, 4, ROWS, 4).permute(0, 3, 1, 2, 4).reshape(t, ROWS, nb, 16)
    codes = torch.stack([portable & 15, portable >> 4], dim=4).reshape(t, ROWS, nb, 32)
    return codes[..., :16] | (codes[..., 16:] << 4)


def tile_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF IQ4_NL matrix: its blocks are laid out as Q4_0's (fp16 d, then 16 bytes of 4-bit
    codes), so its tiles are Q4_0's; only what a code weighs differs (a level, not q - 8)."""
    return tile_q4_0(blocks)


def untile_iq4_nl(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    return untile_q4_0(tiles, n, row_bytes)


#: Bytes of a GGUF Q3_K super-block of 256 weights: 32 bytes of the codes' third bits (bit k of
#: byte l: code 32k + l's), 64 bytes of their low 2 bits (byte 32h + l: codes 128h + 32j + l at
#: bits 2j), 12 bytes of packed 6-bit scales (one per 16 weights), then fp16 d.
Q3_K_BLOCK_BYTES = 110
#: The element (0..31, in order) of a block of 32 that the tiled kernels' operand k holds in its
#: byte b: the input is taken evens then odds (WS_QACT_INT4), its dword k < 4 holding elements
#: 2(4k + b), dword 4 + k elements 2(4k + b) + 1.
_OPERAND = torch.tensor([[2 * (4 * (k % 4) + b) + k // 4 for b in range(4)] for k in range(8)])
_ELEMENT = torch.argsort(_OPERAND.flatten())  # operand-major position of each element


def _crumb_planes(codes: torch.Tensor) -> torch.Tensor:
    """(..., 32) 2-bit codes in order -> (..., 2, 4) bytes: plane v's byte b holds operands 4v + p
    (p = 0..3) at bits 2p."""
    ops = codes[..., _OPERAND].unflatten(-2, (2, 4))  # (..., v, p, b)
    return ops[..., 0, :] | (ops[..., 1, :] << 2) | (ops[..., 2, :] << 4) | (ops[..., 3, :] << 6)


def _uncrumb_planes(planes: torch.Tensor) -> torch.Tensor:
    """`_crumb_planes`' inverse: (..., 2, 4) -> (..., 32)."""
    ops = torch.stack([(planes >> (2 * p)) & 3 for p in range(4)], dim=-2)  # (..., v, p, b)
    return ops.flatten(-3)[..., _ELEMENT]


def _bit_plane(bits: torch.Tensor) -> torch.Tensor:
    """(..., 32) bits in order -> (..., 4) bytes: byte b holds operand k's at bit k."""
    ops = bits[..., _OPERAND]  # (..., k, b)
    return sum(ops[..., k, :] << k for k in range(8))


def _unbit_plane(plane: torch.Tensor) -> torch.Tensor:
    """`_bit_plane`'s inverse: (..., 4) -> (..., 32)."""
    return torch.stack([(plane >> k) & 1 for k in range(8)], dim=-2).flatten(-2)[..., _ELEMENT]


def tile_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q3_K matrix (uint8 (N, K/256 * 110)) as Q3_K tiles (uint8, the same number of
    bytes): for each tile of 16 rows and each super-block, each sub-block of 32 as three 64-byte
    vectors whose byte 4r + b holds row r's codes for the input dwords (`_OPERAND`): the low 2 bits
    of operands 0-3, of operands 4-7 (`_crumb_planes`), then their third bits (`_bit_plane`); then
    the 16 rows' fp16 d and their 12 scale bytes, byte i of row r at 32 + 16 i + r (1760 bytes a
    super-block)."""
    n, row = blocks.shape
    t, nsb = n // ROWS, row // Q3_K_BLOCK_BYTES
    b = blocks.view(t, ROWS, nsb, Q3_K_BLOCK_BYTES)
    third = torch.stack([(b[..., :32] >> k) & 1 for k in range(8)], dim=-2)  # sub-block k, element l
    low = unpack_crumbs(b[..., 32:96]).unflatten(-1, (8, 32))  # sub-block j, element l
    sub = torch.cat([_crumb_planes(low), _bit_plane(third).unsqueeze(-2)], dim=-2)
    sub = sub.permute(0, 2, 3, 4, 1, 5).reshape(t, nsb, 8 * 3 * 4 * ROWS)
    d = b[..., 108:110].permute(0, 2, 1, 3).reshape(t, nsb, 2 * ROWS)
    scales = b[..., 96:108].permute(0, 2, 3, 1).reshape(t, nsb, 12 * ROWS)  # (tile, sb, [byte, row])
    return torch.cat([sub, d, scales], dim=2).reshape(-1)


def untile_q3_k(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_q3_k`'s inverse: (the GGUF rows of super-blocks, uint8 (N, row_bytes)), a new tensor."""
    t, nsb = n // ROWS, row_bytes // Q3_K_BLOCK_BYTES
    g = tiles.view(t, nsb, Q3_K_BLOCK_BYTES * ROWS)
    sub = (
        g[..., : 96 * ROWS].reshape(t, nsb, 8, 3, ROWS, 4).permute(0, 4, 1, 2, 3, 5)
    )  # (tile, row, sb, j, 3, 4)
    third = _unbit_plane(sub[..., 2, :])  # (tile, row, sb, k, l)
    hmask = sum(third[..., k, :] << k for k in range(8))
    qs = pack_crumbs(_uncrumb_planes(sub[..., :2, :]).flatten(-2))
    d = g[..., 96 * ROWS : 98 * ROWS].reshape(t, nsb, ROWS, 2).permute(0, 2, 1, 3)
    scales = g[..., 98 * ROWS :].reshape(t, nsb, 12, ROWS).permute(0, 3, 1, 2)
    return (torch.cat([hmask, qs, scales, d], dim=3).reshape(n, row_bytes).contiguous(),)


#: Bytes of a GGUF Q2_K super-block of 256 weights: 16 bytes of 4-bit scales and minima (sc | m
#: << 4, one per 16 weights), Q3_K's 64 bytes of 2-bit codes, then fp16 d and dmin.
Q2_K_BLOCK_BYTES = 84


def tile_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q2_K matrix (uint8 (N, K/256 * 84)) as Q2_K tiles (uint8, the same number of
    bytes): for each tile of 16 rows and each super-block, each sub-block of 32 as Q3_K tiles'
    two 64-byte planes of 2-bit codes, then the 16 rows' fp16 d, their fp16 dmin, and their 16
    scale bytes, byte i of row r at 64 + 16 i + r (1344 bytes a super-block)."""
    n, row = blocks.shape
    t, nsb = n // ROWS, row // Q2_K_BLOCK_BYTES
    b = blocks.view(t, ROWS, nsb, Q2_K_BLOCK_BYTES)
    planes = _crumb_planes(unpack_crumbs(b[..., 16:80]).unflatten(-1, (8, 32)))  # (tile, row, sb, j, 2, 4)
    planes = planes.permute(0, 2, 3, 4, 1, 5).reshape(t, nsb, 8 * 2 * 4 * ROWS)
    halves = b[..., 80:84].reshape(t, ROWS, nsb, 2, 2).permute(0, 2, 3, 1, 4).reshape(t, nsb, 4 * ROWS)
    scales = b[..., :16].permute(0, 2, 3, 1).reshape(t, nsb, 16 * ROWS)  # (tile, sb, [byte, row])
    return torch.cat([planes, halves, scales], dim=2).reshape(-1)


def untile_q2_k(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_q2_k`'s inverse: (the GGUF rows of super-blocks, uint8 (N, row_bytes)), a new tensor."""
    t, nsb = n // ROWS, row_bytes // Q2_K_BLOCK_BYTES
    g = tiles.view(t, nsb, Q2_K_BLOCK_BYTES * ROWS)
    planes = g[..., : 64 * ROWS].reshape(t, nsb, 8, 2, ROWS, 4).permute(0, 4, 1, 2, 3, 5)
    qs = pack_crumbs(_uncrumb_planes(planes).flatten(-2))
    halves = (
        g[..., 64 * ROWS : 68 * ROWS]
        .reshape(t, nsb, 2, ROWS, 2)
        .permute(0, 3, 1, 2, 4)
        .reshape(t, ROWS, nsb, 4)
    )
    scales = g[..., 68 * ROWS :].reshape(t, nsb, 16, ROWS).permute(0, 3, 1, 2)
    return (torch.cat([scales, qs, halves], dim=3).reshape(n, row_bytes).contiguous(),)


#: Bytes of a GGUF IQ4_XS super-block of 256 weights: fp16 d, 16 bits of the high 2 bits of its
#: 8 sub-block scales, 4 bytes of their low 4 bits, then each sub-block's 16 code bytes.
IQ4_XS_BLOCK_BYTES = 136


def tile_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF IQ4_XS matrix (uint8 (N, K/256 * 136)) as IQ4_XS tiles (uint8, the same number of
    bytes): for each tile of 16 rows and each super-block, its 8 sub-blocks' codes as the int4
    tiles' blocks (256 bytes each), then the 16 rows' headers: their fp16 d, their 16 high-bit
    bits, and the 4 low-bit bytes with byte i of row r at 64 + 16 i + r (2176 bytes a super-block)."""
    n, row = blocks.shape
    t, nsb = n // ROWS, row // IQ4_XS_BLOCK_BYTES
    b = blocks.view(t, ROWS, nsb, IQ4_XS_BLOCK_BYTES)
    chunks = _chunks(b[..., 8:].reshape(t, ROWS, nsb * 8, 16)).reshape(t, nsb, 8 * 16 * ROWS)
    halves = b[..., :4].reshape(t, ROWS, nsb, 2, 2).permute(0, 2, 3, 1, 4).reshape(t, nsb, 4 * ROWS)
    low = b[..., 4:8].permute(0, 2, 3, 1).reshape(t, nsb, 4 * ROWS)  # (tile, sb, [byte, row])
    return torch.cat([chunks, halves, low], dim=2).reshape(-1)


def untile_iq4_xs(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_iq4_xs`'s inverse: (the GGUF rows of super-blocks, uint8 (N, row_bytes)), a new tensor."""
    t, nsb = n // ROWS, row_bytes // IQ4_XS_BLOCK_BYTES
    g = tiles.view(t, nsb, IQ4_XS_BLOCK_BYTES * ROWS)
    qs = _unchunks(g[..., : 128 * ROWS].reshape(t, nsb * 8, 16 * ROWS)).reshape(t, ROWS, nsb, 128)
    header = g[..., 128 * ROWS :]
    halves = (
        header[..., : 4 * ROWS].reshape(t, nsb, 2, ROWS, 2).permute(0, 3, 1, 2, 4).reshape(t, ROWS, nsb, 4)
    )
    low = header[..., 4 * ROWS :].reshape(t, nsb, 4, ROWS).permute(0, 3, 1, 2)
    return (torch.cat([halves, low, qs], dim=3).reshape(n, row_bytes).contiguous(),)


#: Bytes of a GGUF Q4_K super-block of 256 weights: fp16 d, fp16 dmin, 12 bytes of packed 6-bit
#: scales and minima of its 8 sub-blocks of 32, then 128 bytes of codes (byte l of pair p: code l
#: of sub-block 2p in the low nibble, of sub-block 2p + 1 in the high one).
Q4_K_BLOCK_BYTES = 144


def _fifth_bits(fifth: torch.Tensor) -> torch.Tensor:
    """(..., 32) fifth bits of a row's block of 32 codes, in order -> (..., 4) bytes: byte b holds
    those of codes 2t (at bit c) and 2t + 1 (at bit 4 + c), t = 4c + b (chunk c's byte b)."""
    even, odd = (fifth[..., i::2].unflatten(-1, (4, 4)) for i in (0, 1))  # (..., chunk c, byte b)
    return sum((even[..., c, :] << c) | (odd[..., c, :] << (4 + c)) for c in range(4))


def _unfifth_bits(bits: torch.Tensor) -> torch.Tensor:
    """`_fifth_bits`' inverse: (..., 4) -> (..., 32)."""
    even = torch.stack([(bits >> c) & 1 for c in range(4)], dim=-2).flatten(-2)  # (..., 16) in t order
    odd = torch.stack([(bits >> (4 + c)) & 1 for c in range(4)], dim=-2).flatten(-2)
    return torch.stack([even, odd], dim=-1).flatten(-2)


def _tile_qk(blocks: torch.Tensor, five: bool) -> torch.Tensor:
    """Q4_K (Q5_K with `five`) rows of super-blocks as tiles (see tile_q4_k / tile_q5_k)."""
    size, at = (Q5_K_BLOCK_BYTES, 48) if five else (Q4_K_BLOCK_BYTES, 16)
    n, row = blocks.shape
    t, nsb = n // ROWS, row // size
    b = blocks.view(t, ROWS, nsb, size)
    qs = b[..., at:].view(t, ROWS, nsb, 4, 1, 32)
    codes = torch.cat([qs & 15, qs >> 4], dim=4).reshape(t, ROWS, nsb, 8, 32)  # sub-block j, in order
    portable = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (tile, row, super-block, j, 16)
    # (tile, row, super-block, j, chunk, byte) -> (tile, super-block, j, [chunk, row, byte])
    sub = portable.reshape(t, ROWS, nsb, 8, 4, 4).permute(0, 2, 3, 4, 1, 5).reshape(t, nsb, 8, 16 * ROWS)
    if five:  # code l of sub-block j: bit j of qh[l]
        qh = b[..., 16:48]
        fifth = torch.stack([(qh >> j) & 1 for j in range(8)], dim=3)  # (tile, row, sb, j, 32)
        bits = _fifth_bits(fifth).permute(0, 2, 3, 1, 4).reshape(t, nsb, 8, 4 * ROWS)
        sub = torch.cat([sub, bits], dim=3)
    halves = b[..., :4].reshape(t, ROWS, nsb, 2, 2).permute(0, 2, 3, 1, 4).reshape(t, nsb, 4 * ROWS)
    scales = b[..., 4:16].permute(0, 2, 3, 1).reshape(t, nsb, 12 * ROWS)  # (tile, sb, [byte, row])
    return torch.cat([sub.reshape(t, nsb, -1), halves, scales], dim=2).reshape(-1)


def _untile_qk(tiles: torch.Tensor, n: int, row_bytes: int, five: bool) -> tuple[torch.Tensor]:
    size, per = (Q5_K_BLOCK_BYTES, 20 * ROWS) if five else (Q4_K_BLOCK_BYTES, 16 * ROWS)
    t, nsb = n // ROWS, row_bytes // size
    g = tiles.view(t, nsb, size * ROWS)
    sub = g[..., : 8 * per].reshape(t, nsb, 8, per)
    portable = sub[..., : 16 * ROWS].reshape(t, nsb, 8, 4, ROWS, 4).permute(0, 4, 1, 2, 3, 5)
    codes = torch.stack([portable & 15, portable >> 4], dim=-1).reshape(t, ROWS, nsb, 4, 2, 32)
    qs = (codes[..., 0, :] | (codes[..., 1, :] << 4)).reshape(t, ROWS, nsb, 128)
    header = g[..., 8 * per :]
    halves = (
        header[..., : 4 * ROWS].reshape(t, nsb, 2, ROWS, 2).permute(0, 3, 1, 2, 4).reshape(t, ROWS, nsb, 4)
    )
    scales = header[..., 4 * ROWS :].reshape(t, nsb, 12, ROWS).permute(0, 3, 1, 2)
    parts = [halves, scales]
    if five:
        bits = (
            sub[..., 16 * ROWS :].reshape(t, nsb, 8, ROWS, 4).permute(0, 3, 1, 2, 4)
        )  # (tile, row, sb, j, 4)
        fifth = _unfifth_bits(bits)  # (tile, row, sb, j, 32)
        parts.append(sum(fifth[..., j, :] << j for j in range(8)))
    return (torch.cat([*parts, qs], dim=3).reshape(n, row_bytes).contiguous(),)


def tile_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q4_K matrix (uint8 (N, K/256 * 144)) as Q4_K tiles (uint8, the same number of
    bytes): for each tile of 16 rows and each super-block, its 8 sub-blocks' codes as the int4
    tiles' blocks (4 chunks: row r's portable bytes 4c..4c+3 at 4r..4r+3, byte j holding codes
    2j and 2j + 1), then the 16 rows' headers: their fp16 d, their fp16 dmin, and the 12 scale
    bytes with byte i of row r at 64 + 16 i + r (2304 bytes a super-block)."""
    return _tile_qk(blocks, five=False)


def untile_q4_k(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_q4_k`'s inverse: (the GGUF rows of super-blocks, uint8 (N, row_bytes)), a new tensor."""
    return _untile_qk(tiles, n, row_bytes, five=False)


#: Bytes of a GGUF Q5_K super-block: Q4_K's header (d, dmin, 12 scale bytes), 32 bytes of fifth
#: bits (bit j of byte l: code l of sub-block j), then Q4_K's 128 bytes of low nibbles.
Q5_K_BLOCK_BYTES = 176


def tile_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q5_K matrix (uint8 (N, K/256 * 176)) as Q5_K tiles: Q4_K's, with each sub-block's
    256 bytes of low nibbles followed by 64 bytes of its codes' fifth bits (byte 4r + b: codes
    2t at bit c and 2t + 1 at bit 4 + c, t = 4c + b), 2816 bytes a super-block."""
    return _tile_qk(blocks, five=True)


def untile_q5_k(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    return _untile_qk(tiles, n, row_bytes, five=True)


#: Bytes of a GGUF Q6_K super-block of 256 weights: 128 bytes of the codes' low nibbles, 64 of
#: their top 2 bits, 16 int8 scales (one per 16 weights), then fp16 d; code q weighs d sc (q - 32).
Q6_K_BLOCK_BYTES = 210


def _q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    """(..., 210) Q6_K super-blocks -> (..., 8, 32) their codes 0..63 by sub-block of 32: code l
    of sub-block 4h + k is bits 4(k // 2).. of ql[64h + 32(k % 2) + l] and bits 2k.. of qh[32h + l]."""
    ql = b[..., :128].unflatten(-1, (2, 2, 32))  # (h, k % 2, l)
    low = torch.stack([ql & 15, ql >> 4], dim=-3)  # (h, k // 2, k % 2, l)
    qh = b[..., 128:192].unflatten(-1, (2, 1, 32))  # (h, 1, l)
    top = torch.cat([(qh >> (2 * k)) & 3 for k in range(4)], dim=-2)  # (h, k, l)
    return (low.reshape(*b.shape[:-1], 2, 4, 32) | (top << 4)).reshape(*b.shape[:-1], 8, 32)


def tile_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q6_K matrix (uint8 (N, K/256 * 210)) as Q6_K tiles (uint8, the same number of
    bytes): for each tile of 16 rows and each super-block, each sub-block of 32 as its codes' low
    nibbles in the int4 tiles' chunks (256 bytes) and their top 2 bits in two 64-byte vectors
    (128 bytes: cpu_qdot.c's q6kt_matmul_scalar gives the bit order), then the 16 rows' fp16 d
    and their 16 scales, scale i of row r at 32 + 16 i + r (3360 bytes a super-block)."""
    n, row = blocks.shape
    t, nsb = n // ROWS, row // Q6_K_BLOCK_BYTES
    b = blocks.view(t, ROWS, nsb, Q6_K_BLOCK_BYTES)
    codes = _q6_k_codes(b)
    low, top = codes & 15, codes >> 4
    portable = low[..., 0::2] | (low[..., 1::2] << 4)  # (tile, row, sb, j, 16)
    chunks = portable.reshape(t, ROWS, nsb, 8, 4, 4).permute(0, 2, 3, 4, 1, 5).reshape(t, nsb, 8, 256)
    # top bits of codes 2t (even) and 2t + 1 (odd), t = 4c + b: (tile, row, sb, j, k, c % 2, b)
    even, odd = (top[..., i::2].reshape(t, ROWS, nsb, 8, 2, 2, 4) for i in (0, 1))
    packed = even[..., 0, :] | (even[..., 1, :] << 2) | (odd[..., 0, :] << 4) | (odd[..., 1, :] << 6)
    tops = packed.permute(0, 2, 3, 4, 1, 5).reshape(t, nsb, 8, 128)  # (tile, sb, j, [k, row, b])
    d = b[..., 208:210].permute(0, 2, 1, 3).reshape(t, nsb, 2 * ROWS)
    scales = b[..., 192:208].permute(0, 2, 3, 1).reshape(t, nsb, 16 * ROWS)
    return torch.cat([torch.cat([chunks, tops], dim=3).reshape(t, nsb, 3072), d, scales], dim=2).reshape(-1)


def untile_q6_k(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_q6_k`'s inverse: (the GGUF rows of super-blocks, uint8 (N, row_bytes)), a new tensor."""
    t, nsb = n // ROWS, row_bytes // Q6_K_BLOCK_BYTES
    g = tiles.view(t, nsb, Q6_K_BLOCK_BYTES * ROWS)
    sub = g[..., :3072].reshape(t, nsb, 8, 384)
    portable = (
        sub[..., :256].reshape(t, nsb, 8, 4, ROWS, 4).permute(0, 4, 1, 2, 3, 5).reshape(t, ROWS, nsb, 8, 16)
    )
    low = torch.stack([portable & 15, portable >> 4], dim=-1).reshape(t, ROWS, nsb, 8, 32)
    packed = (
        sub[..., 256:].reshape(t, nsb, 8, 2, ROWS, 4).permute(0, 4, 1, 2, 3, 5)
    )  # (tile, row, sb, j, k, b)
    even = torch.stack([packed & 3, (packed >> 2) & 3], dim=-2).reshape(t, ROWS, nsb, 8, 16)
    odd = torch.stack([(packed >> 4) & 3, packed >> 6], dim=-2).reshape(t, ROWS, nsb, 8, 16)
    top = torch.stack([even, odd], dim=-1).reshape(t, ROWS, nsb, 8, 32)
    codes = (low | (top << 4)).reshape(t, ROWS, nsb, 2, 4, 32)  # (h, k, l)
    ql = (codes[..., 0:2, :] & 15) | ((codes[..., 2:4, :] & 15) << 4)  # (h, k % 2, l)
    qh = sum(((codes[..., k, :] >> 4) << (2 * k)) for k in range(4))  # (h, l)
    d = g[..., 3072:3104].reshape(t, nsb, ROWS, 2).permute(0, 2, 1, 3)
    scales = g[..., 3104:].reshape(t, nsb, 16, ROWS).permute(0, 3, 1, 2)
    out = torch.cat([ql.reshape(t, ROWS, nsb, 128), qh.reshape(t, ROWS, nsb, 64), scales, d], dim=3)
    return (out.reshape(n, row_bytes).contiguous(),)


#: Bytes of a GGUF Q5_0 / Q5_1 block of 32: fp16 d (Q5_1: then fp16 m), 4 bytes of the codes'
#: fifth bits (bit l of the little-endian word: code l), 16 bytes of low nibbles as Q4_0's.
Q5_0_BLOCK_BYTES, Q5_1_BLOCK_BYTES = 22, 24


def _tile_q5(blocks: torch.Tensor, head: int) -> torch.Tensor:
    """Q5_0 (head 2: d) or Q5_1 (head 4: d, m) rows of blocks as tiles: for each block, its
    codes' low nibbles as the int4 tiles' chunks (256 bytes), then 64 bytes whose byte 4r + b
    holds the fifth bits of row r's codes 2t (at bit c) and 2t + 1 (at bit 4 + c), t = 4c + b,
    then the 16 rows' fp16 d (and m): 22 (24) bytes a row and block, as in the file."""
    n, row = blocks.shape
    size = head + 20
    t, nb = n // ROWS, row // size
    b = blocks.view(t, ROWS, nb, size)
    qh, qs = b[..., head : head + 4], b[..., head + 4 :]
    fifth = ((qh[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(t, ROWS, nb, 32)
    low = torch.cat([qs & 15, qs >> 4], dim=3)  # (tile, row, block, 32): the codes' low nibbles in order
    portable = low[..., 0::2] | (low[..., 1::2] << 4)
    chunks = portable.reshape(t, ROWS, nb, 4, 4).permute(0, 2, 3, 1, 4).reshape(t, nb, 16 * ROWS)
    bits = _fifth_bits(fifth).permute(0, 2, 1, 3).reshape(t, nb, 4 * ROWS)
    halves = [b[..., at : at + 2].permute(0, 2, 1, 3).reshape(t, nb, 2 * ROWS) for at in range(0, head, 2)]
    return torch.cat([chunks, bits, *halves], dim=2).reshape(-1)


def _untile_q5(tiles: torch.Tensor, n: int, row_bytes: int, head: int) -> tuple[torch.Tensor]:
    size = head + 20
    t, nb = n // ROWS, row_bytes // size
    g = tiles.view(t, nb, size * ROWS)
    portable = g[..., : 16 * ROWS].reshape(t, nb, 4, ROWS, 4).permute(0, 3, 1, 2, 4).reshape(t, ROWS, nb, 16)
    low = torch.stack([portable & 15, portable >> 4], dim=4).reshape(t, ROWS, nb, 32)
    bits = g[..., 16 * ROWS : 20 * ROWS].reshape(t, nb, ROWS, 4).permute(0, 2, 1, 3)  # (tile, row, block, b)
    fifth = _unfifth_bits(bits).reshape(t, ROWS, nb, 4, 8)  # (..., byte of qh, bit)
    qh = sum(fifth[..., i] << i for i in range(8))
    qs = low[..., :16] | (low[..., 16:] << 4)
    halves = (
        g[..., 20 * ROWS :]
        .reshape(t, nb, head // 2, ROWS, 2)
        .permute(0, 3, 1, 2, 4)
        .reshape(t, ROWS, nb, head)
    )
    return (torch.cat([halves, qh, qs], dim=3).reshape(n, row_bytes).contiguous(),)


def tile_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q5_0 matrix (uint8 (N, K/32 * 22)) as Q5_0 tiles (`_tile_q5`), the same bytes."""
    return _tile_q5(blocks, 2)


def untile_q5_0(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    return _untile_q5(tiles, n, row_bytes, 2)


def tile_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q5_1 matrix (uint8 (N, K/32 * 24)) as Q5_1 tiles (`_tile_q5`), the same bytes."""
    return _tile_q5(blocks, 4)


def untile_q5_1(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    return _untile_q5(tiles, n, row_bytes, 4)
