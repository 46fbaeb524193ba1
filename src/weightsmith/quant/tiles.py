"""The int4 and int8 layers' decode layout: 16-row tiles, read as one stream by the tiled C kernels.

Decoding multiplies one or a few input rows by every weight. The portable layout (each row's
codes, then separate scale and zero arrays) makes a kernel sum each row's products across
the vector lanes and read three streams. In a tile, the same bytes are ordered so that one
integer dot-product instruction multiplies 4 codes of 16 rows at once by the same 4 input
bytes, and each group's 16 scales and 16 zeros follow its codes:

    for each tile of 16 rows, for each group of G inputs:
        for each block of 32 inputs in the group, for chunk c in 0..3, for row r in 0..15:
            the row's portable bytes 4c..4c+3 of the block   (4 bytes)
        the 16 rows' fp16 scales, then their 16 fp16 zeros   (32 + 32 bytes)

It holds exactly the portable layout's bytes (N * K/2 codes, 2 x N * K/G fp16), reordered: a
tiled layer keeps no other copy (QuantizedLinear.tile_into). int8 tiles are the same with 8
chunks a block of 32 (row r's bytes 4c..4c+3 of the block, stored as w + 128 so that the
unsigned operand of the dot product is the weight: the kernels subtract 128 * sum(x)), and the
tile's 16 fp32 row scales after all its blocks. A GGUF Q8_0 matrix (GGMLLinear) tiles the same
way, each block's 16 fp16 scales after its chunks (Q8_0 scales every 32 weights of a row), and
a GGUF Q4_0 matrix as int4 tiles of groups of 32 without zeros (Q4_0's is -8 times the scale),
Q5_0 / Q5_1 as those codes' low nibbles with each block's fifth bits and scales after them,
a GGUF Q4_K matrix as int4 tiles' blocks with each super-block's 16 headers after them, and a
GGUF Q6_K matrix as those blocks' low nibbles, each sub-block's top bits after them.
`tile_*` and `untile_*` convert between the layouts, exactly. `hugepage_buffer` gives the memory a model's tiles share, on 2 MiB pages
where Linux offers them (fewer TLB misses: decoding reads every weight once a token).

Not here: the kernels (cpu_qdot.c, cpu_qtile_x86.h), when layers are tiled
(weightsmith.cpu_decode.layout).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

ROWS = 16
BLOCK = 32
#: 2 MiB: the huge-page size (x86-64, and arm64 with 4 KiB base pages).
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

log = logging.getLogger(__name__)


def nbytes_int4(n: int, k: int, group: int) -> int:
    """Bytes of an (n, k) int4 weight in either layout."""
    return n * k // 2 + n * (k // group) * 4


def can_tile_int4(n: int, k: int, group: int) -> bool:
    return n % ROWS == 0 and k % group == 0 and group % BLOCK == 0


def tile_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The portable layout (qweight uint8 (N, K/2), scales and zeros fp16 (N, K/G)) as tiles
    (uint8, nbytes_int4(N, K, G))."""
    n, half = qweight.shape
    groups, per = half * 2 // group, group // BLOCK
    t = n // ROWS
    # byte (tile, row, group, block, chunk, byte) -> (tile, group, [block, chunk, row, byte])
    codes = qweight.view(t, ROWS, groups, per, 4, 4).permute(0, 2, 3, 4, 1, 5).reshape(t, groups, per * 256)

    def per_group(v: torch.Tensor) -> torch.Tensor:  # (N, K/G) fp16 -> (tile, group, 32 bytes)
        v = v.to(torch.float16).view(t, ROWS, groups).transpose(1, 2).contiguous()
        return v.view(torch.uint8).view(t, groups, 2 * ROWS)

    return torch.cat([codes, per_group(scales), per_group(zeros)], dim=2).reshape(-1)


def untile_int4(
    tiles: torch.Tensor, n: int, k: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tile_int4`'s inverse: (qweight (N, K/2), scales (N, K/G), zeros (N, K/G)), new tensors."""
    groups, per = k // group, group // BLOCK
    t = n // ROWS
    g = tiles.view(t, groups, per * 256 + 4 * ROWS)
    codes = (
        g[..., : per * 256].reshape(t, groups, per, 4, ROWS, 4).permute(0, 4, 1, 2, 3, 5).reshape(n, k // 2)
    )

    def rows(at: int) -> torch.Tensor:
        v = g[..., at : at + 2 * ROWS].contiguous().view(torch.float16)  # (tile, group, row)
        return v.transpose(1, 2).reshape(n, groups)

    return codes.contiguous(), rows(per * 256), rows(per * 256 + 2 * ROWS)


def nbytes_int8(n: int, k: int) -> int:
    return n * k + n * 4


def can_tile_int8(n: int, k: int) -> bool:
    return n % ROWS == 0 and k % BLOCK == 0


def tile_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) and fp32 scales (N,) as int8 tiles (uint8, nbytes_int8(N, K))."""
    n, k = qweight.shape
    t, nb = n // ROWS, k // BLOCK
    # (tile, row, block, chunk, byte) -> (tile, [block, chunk, row, byte]), as unsigned w + 128
    codes = (qweight.view(torch.uint8) ^ 0x80).view(t, ROWS, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(t, -1)
    return torch.cat([codes, scales.float().contiguous().view(torch.uint8).view(t, 4 * ROWS)], dim=1).reshape(
        -1
    )


def untile_int8(tiles: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`tile_int8`'s inverse: (qweight int8 (N, K), scales fp32 (N,)), new tensors."""
    t, nb = n // ROWS, k // BLOCK
    g = tiles.view(t, k * ROWS + 4 * ROWS)
    codes = (g[:, : k * ROWS].reshape(t, nb, 8, ROWS, 4).permute(0, 3, 1, 2, 4) ^ 0x80).reshape(n, k)
    return codes.contiguous().view(torch.int8), g[:, k * ROWS :].contiguous().view(torch.float32).reshape(n)


#: Bytes of a GGUF Q8_0 block: an fp16 scale, then 32 int8 codes.
Q8_0_BLOCK_BYTES = 34


def can_tile_q8_0(n: int, row_bytes: int) -> bool:
    return n % ROWS == 0 and row_bytes % Q8_0_BLOCK_BYTES == 0


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


def can_tile_q4_0(n: int, row_bytes: int) -> bool:
    return n % ROWS == 0 and row_bytes % Q4_0_BLOCK_BYTES == 0


def tile_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """A GGUF Q4_0 matrix (uint8 (N, K/32 * 18)) as Q4_0 tiles (uint8, the same number of
    bytes): the int4 tiles of groups of 32 with no zeros (the kernels take -8 d), i.e. for each
    tile of 16 rows and each block, the 4 chunks of the block's codes in the portable nibble
    order (byte j: codes 2j and 2j + 1), then the 16 rows' fp16 scales d (288 bytes a block)."""
    n, row = blocks.shape
    t, nb = n // ROWS, row // Q4_0_BLOCK_BYTES
    b = blocks.view(t, ROWS, nb, Q4_0_BLOCK_BYTES)
    codes = torch.cat([b[..., 2:] & 15, b[..., 2:] >> 4], dim=3)  # (tile, row, block, 32) in order
    portable = codes[..., 0::2] | (codes[..., 1::2] << 4)
    # (tile, row, block, chunk, byte) -> (tile, block, [chunk, row, byte])
    chunks = portable.reshape(t, ROWS, nb, 4, 4).permute(0, 2, 3, 1, 4).reshape(t, nb, 16 * ROWS)
    scales = b[..., :2].permute(0, 2, 1, 3).reshape(t, nb, 2 * ROWS)  # (tile, block, [row, fp16 byte])
    return torch.cat([chunks, scales], dim=2).reshape(-1)


def untile_q4_0(tiles: torch.Tensor, n: int, row_bytes: int) -> tuple[torch.Tensor]:
    """`tile_q4_0`'s inverse: (the GGUF rows of blocks, uint8 (N, row_bytes)), a new tensor."""
    t, nb = n // ROWS, row_bytes // Q4_0_BLOCK_BYTES
    g = tiles.view(t, nb, Q4_0_BLOCK_BYTES * ROWS)
    portable = g[..., : 16 * ROWS].reshape(t, nb, 4, ROWS, 4).permute(0, 3, 1, 2, 4).reshape(t, ROWS, nb, 16)
    codes = torch.stack([portable & 15, portable >> 4], dim=4).reshape(t, ROWS, nb, 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    scales = g[..., 16 * ROWS :].reshape(t, nb, ROWS, 2).permute(0, 2, 1, 3)
    return (torch.cat([scales, qs], dim=3).reshape(n, row_bytes).contiguous(),)


#: Bytes of a GGUF Q4_K super-block of 256 weights: fp16 d, fp16 dmin, 12 bytes of packed 6-bit
#: scales and minima of its 8 sub-blocks of 32, then 128 bytes of codes (byte l of pair p: code l
#: of sub-block 2p in the low nibble, of sub-block 2p + 1 in the high one).
Q4_K_BLOCK_BYTES = 144


def can_tile_q4_k(n: int, row_bytes: int) -> bool:
    return n % ROWS == 0 and row_bytes % Q4_K_BLOCK_BYTES == 0


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


def can_tile_q5_k(n: int, row_bytes: int) -> bool:
    return n % ROWS == 0 and row_bytes % Q5_K_BLOCK_BYTES == 0


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


def can_tile_q6_k(n: int, row_bytes: int) -> bool:
    return n % ROWS == 0 and row_bytes % Q6_K_BLOCK_BYTES == 0


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


def can_tile_q5_0(n: int, row_bytes: int) -> bool:
    return n % ROWS == 0 and row_bytes % Q5_0_BLOCK_BYTES == 0


def can_tile_q5_1(n: int, row_bytes: int) -> bool:
    return n % ROWS == 0 and row_bytes % Q5_1_BLOCK_BYTES == 0


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


def hugepage_buffer(size: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of `size` bytes at a 2 MiB boundary, advised to Linux as
    transparent-huge-page memory (a no-op elsewhere, or where the kernel declines)."""
    raw = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    buf = raw[start : start + size]
    if sys.platform.startswith("linux") and size >= HUGE_PAGE:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            length = size - size % HUGE_PAGE
            if libc.madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(length), _MADV_HUGEPAGE) != 0:
                log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError):  # no libc symbol table: ordinary pages
            pass
    return buf


@dataclass(frozen=True)
class TileFormat:
    """One layer's tiles: their size, the portable buffers (in PORTABLE order) to tiles, and back."""

    nbytes: int
    tile: Callable[..., torch.Tensor]
    untile: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


class Tiled:
    """The tiled mode of a quantized layer (mixed into weight_only.QuantizedLinear, before
    nn.Module): `tile_into` swaps its PORTABLE buffers for `tiles`, `untile` swaps them back;
    `state_dict()` and loading see the portable tensors either way."""

    tiles: torch.Tensor | None
    _buffers: dict
    _runtime: dict

    #: The buffers a tiled layer holds as `tiles` instead.
    PORTABLE: tuple[str, ...] = ("qweight", "scales")

    def rows(self) -> tuple[torch.Tensor, ...]:
        """The PORTABLE buffers: themselves, or new tensors made from a tiled layer's tiles."""
        return tuple(self._buffers[n] for n in self.PORTABLE) if self.tiles is None else self._from_tiles()

    def can_tile(self) -> bool:
        return self.tiles is None and self.device.type == "cpu" and self.tile_format() is not None

    def tile_into(self, out: torch.Tensor) -> None:
        """Hold the weights as tiles in `out` (uint8, `tile_nbytes()`, e.g. a slice of a
        huge-page buffer) instead of the PORTABLE buffers, which are released: no second copy.
        `state_dict()` still gives the portable tensors; a move or cast untiles first."""
        out.copy_(self._make_tiles())
        self.tiles = out
        self._buffers.update(dict.fromkeys(self.PORTABLE))
        self._runtime = {}

    def untile(self) -> None:
        """Back to the portable buffers (same values)."""
        if self.tiles is not None:
            self._buffers.update(zip(self.PORTABLE, self.rows(), strict=True))
            self.tiles, self._runtime = None, {}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiles is not None:
            destination.update({prefix + n: t for n, t in zip(self.PORTABLE, self.rows(), strict=True)})

    def _load_from_state_dict(self, *args, **kwargs):
        self.untile()
        super()._load_from_state_dict(*args, **kwargs)

    def tile_format(self) -> TileFormat | None:
        """How this layer's PORTABLE buffers map to tiles; None where its kind or shape has none
        (each tileable layer kind defines it)."""
        return None

    def tile_nbytes(self) -> int:
        fmt = self.tile_format()
        return 0 if fmt is None else fmt.nbytes

    def _make_tiles(self) -> torch.Tensor:
        fmt = self.tile_format()
        assert fmt is not None, "tile_into on a layer that has no tiles (check can_tile)"
        return fmt.tile(*(self._buffers[n] for n in self.PORTABLE))

    def _from_tiles(self) -> tuple[torch.Tensor, ...]:
        fmt = self.tile_format()
        assert fmt is not None and self.tiles is not None
        return fmt.untile(self.tiles)
