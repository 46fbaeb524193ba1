"""Int4Linear's decode layout: 16-row tiles, read as one stream by the tiled C kernels.

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
tiled layer keeps no other copy (Int4Linear.tile_into). `tile` and `untile` convert between
the two, exactly. `hugepage_buffer` gives the memory a model's tiles share, on 2 MiB pages
where Linux offers them (fewer TLB misses: decoding reads every weight once a token).

Not here: the kernels (cpu_qdot.c, cpu_qtile_x86.h), when layers are tiled
(weightsmith.cpu_decode.layout).
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

ROWS = 16
BLOCK = 32
#: 2 MiB: the huge-page size (x86-64, and arm64 with 4 KiB base pages).
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

log = logging.getLogger(__name__)


def nbytes(n: int, k: int, group: int) -> int:
    """Bytes of an (n, k) int4 weight in either layout."""
    return n * k // 2 + n * (k // group) * 4


def can_tile(n: int, k: int, group: int) -> bool:
    return n % ROWS == 0 and k % group == 0 and group % BLOCK == 0


def tile(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The portable layout (qweight uint8 (N, K/2), scales and zeros fp16 (N, K/G)) as tiles
    (uint8, nbytes(N, K, G))."""
    n, half = qweight.shape
    groups, per = half * 2 // group, group // BLOCK
    t = n // ROWS
    # byte (tile, row, group, block, chunk, byte) -> (tile, group, [block, chunk, row, byte])
    codes = qweight.view(t, ROWS, groups, per, 4, 4).permute(0, 2, 3, 4, 1, 5).reshape(t, groups, per * 256)

    def per_group(v: torch.Tensor) -> torch.Tensor:  # (N, K/G) fp16 -> (tile, group, 32 bytes)
        v = v.to(torch.float16).view(t, ROWS, groups).transpose(1, 2).contiguous()
        return v.view(torch.uint8).view(t, groups, 2 * ROWS)

    return torch.cat([codes, per_group(scales), per_group(zeros)], dim=2).reshape(-1)


def untile(
    tiles: torch.Tensor, n: int, k: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tile`'s inverse: (qweight (N, K/2), scales (N, K/G), zeros (N, K/G)), new tensors."""
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
