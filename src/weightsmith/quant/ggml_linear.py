"""`GGMLLinear`: a projection whose weight stays in a GGUF file's quantized blocks.

A GGUF file stores each matrix as rows of ggml blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K that most published files use, and the non-linear IQ4_NL
and IQ4_XS). `GGMLLinear` keeps those bytes as
they are, one row per output feature (`qweight`, uint8 (N, row bytes)), so its resident
weight is exactly the file's, and nothing is dequantized and requantized: it computes the
matrix the file stores. Bit for bit that is `gguf.quants.dequantize` of the blocks (the
tests hold `dequantize()` to it).

Which matmul runs:
- fp32 inputs on the CPU with at most `kernel_rows()` rows (decoding): the C kernels
  (quant/cpu_ggml.c), which read the blocks in place and multiply them with the input
  quantized to int8 per block of 32 in the CPU's integer dot-product instructions; the
  fused decode step (weightsmith.cpu_decode) calls the same kernels. The result is the
  exact product up to the input's rounding (llama.cpp's decoding has the same). In the CPU
  decode layout a matrix of any of these types with rows in multiples of 16 is held as 16-row tiles
  instead (`tile_format`, the same bytes reordered), which the tiled int4 / int8 kernels read.
- anything else (prefill, bf16, CUDA, no C compiler): the weight dequantized per call (in C
  on the CPU, else with tensor ops on the layer's device, ggml_decode.py) and `F.linear`. No
  dequantized copy is kept.

Not here: reading the blocks out of a file (weightsmith.checkpoint.gguf_quants), the
int8/int4 layers of `weightsmith quantize` (weight_only.py), saving (a model holding these
layers is not saved as a quantized folder: export it to GGUF from its float load instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weightsmith.quant import cpu_kernels, gguf_tiles
from weightsmith.quant import tiles as qtiles
from weightsmith.quant.ggml_decode import GGML_TYPES, dequantize_blocks
from weightsmith.quant.weight_only import QuantizedLinear


def row_bytes(qtype: int, k: int) -> int | None:
    """Bytes of a row of k weights in ggml type `qtype`; None if GGMLLinear does not run the
    type or k is not a whole number of its blocks."""
    if qtype not in GGML_TYPES:
        return None
    _, per_block, size, _ = GGML_TYPES[qtype]
    return None if k % per_block else k // per_block * size


def dequantize_rows(blocks: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """float32 (N, k) on the blocks' device from rows of GGUF blocks (N, row bytes) of a type in
    GGML_TYPES, bit for bit as gguf-py's `dequantize`: by the C kernels on a CPU where they are
    built, else with tensor ops on the device (ggml_decode.py; a GPU never goes through the host)."""
    lib = cpu_kernels.library() if blocks.device.type == "cpu" else None
    if lib is not None:
        return cpu_kernels.ggml_dequantize(lib, qtype, blocks, k)
    return dequantize_blocks(blocks.detach(), qtype, k)


class GGMLLinear(QuantizedLinear):
    """y = x @ W.T + bias with W (N, K) held as N rows of GGUF blocks of ggml type `qtype`."""

    PORTABLE = ("qweight",)
    #: The types with a tiled layout (quant/gguf_tiles.py: 16-row tiles of the same bytes, for a
    #: matrix whose rows are a multiple of 16): (the tiled kernels' input: 4 in the int4 tiles'
    #: order, 8 as is; the layout; its inverse).
    Q4_0, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS = 2, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23  # fmt: skip
    TILED = {
        Q4_0: (4, gguf_tiles.tile_q4_0, gguf_tiles.untile_q4_0),
        Q5_0: (4, gguf_tiles.tile_q5_0, gguf_tiles.untile_q5_0),
        Q5_1: (4, gguf_tiles.tile_q5_1, gguf_tiles.untile_q5_1),
        Q4_K: (4, gguf_tiles.tile_q4_k, gguf_tiles.untile_q4_k),
        Q5_K: (4, gguf_tiles.tile_q5_k, gguf_tiles.untile_q5_k),
        Q6_K: (4, gguf_tiles.tile_q6_k, gguf_tiles.untile_q6_k),
        Q8_0: (8, gguf_tiles.tile_q8_0, gguf_tiles.untile_q8_0),
        Q2_K: (4, gguf_tiles.tile_q2_k, gguf_tiles.untile_q2_k),
        Q3_K: (4, gguf_tiles.tile_q3_k, gguf_tiles.untile_q3_k),
        IQ4_NL: (4, gguf_tiles.tile_iq4_nl, gguf_tiles.untile_iq4_nl),
        IQ4_XS: (4, gguf_tiles.tile_iq4_xs, gguf_tiles.untile_iq4_xs),
    }

    def __init__(
        self, qweight: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None = None
    ) -> None:
        size = row_bytes(qtype, in_features)
        if size is None or qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != size:
            raise ValueError(
                f"GGUF blocks of shape {tuple(qweight.shape)} ({qweight.dtype}) are not rows of "
                f"{in_features} weights in ggml type {qtype}"
            )
        super().__init__(in_features, qweight.shape[0], bias)
        self.qtype = qtype
        self.bits = GGML_TYPES[qtype][3]
        self.register_buffer("qweight", qweight)  # uint8 (N, row bytes), the file's blocks

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.qtype][0]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (N, K), materialised on each access: for inspection only."""
        return self.dequantize().to(self.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (N, K) the blocks stand for, as gguf-py's dequantize computes it."""
        (blocks,) = self.rows()
        return dequantize_rows(blocks, self.qtype, self.in_features).to(device=blocks.device, dtype=dtype)

    def tile_format(self) -> qtiles.TileFormat | None:
        n, row = self.out_features, row_bytes(self.qtype, self.in_features)
        if self.qtype not in self.TILED or row is None or n % qtiles.ROWS:  # rows: whole blocks
            return None
        _, tile, untile = self.TILED[self.qtype]
        return qtiles.TileFormat(n * row, tile, lambda t: untile(t, n, row))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = self._kernels(x)
        if lib is not None:
            bias = None if self.bias is None else self.bias.float()
            if self.tiles is not None:
                bits = self.TILED[self.qtype][0]
                group = 32 if bits == 4 else None
                return cpu_kernels.tiled_matmul(
                    lib, x, self.tiles, self.out_features, bits, group, bias, ggml=self.qtype
                )
            return cpu_kernels.ggml_matmul(lib, x, self.qtype, self.qweight, bias)
        w = self.dequantize(x.dtype)  # (N, K), made per call
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
