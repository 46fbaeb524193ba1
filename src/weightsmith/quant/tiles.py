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
tile's 16 fp32 row scales after all its blocks. A GGUF file's quantized matrices tile the same
way (quant/gguf_tiles.py). `tile_*` and `untile_*` convert between the layouts, exactly. `hugepage_buffer` gives the memory a model's tiles share, on 2 MiB pages
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
