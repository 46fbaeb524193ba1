"""The lookup tables of ggml's grid-coded types, for the C kernels and the tensor-op decoders.

IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S store each group of 8 (IQ1, IQ2) or
4 (IQ3) weights as an index into a fixed grid of points, plus signs and scales. The grids are
part of the file format (llama.cpp's ggml-common.h); gguf-py, already a dependency, carries
them for its own dequantizer, so they are read from there rather than written out again:
`grid(qtype)` is the grid as int8 (points, 8 or 4), values as the format defines them
(IQ2: 8, 25, 43; IQ3_XXS: 4..62; IQ3_S: 1..15 odd; IQ1: -1, 0, 1).

The 7-bit sign indices of IQ2_XXS, IQ2_XS and IQ3_XXS expand to 8 sign bits whose eighth bit
makes the count of set bits even (`KSIGNS`, checked against gguf-py's table in the tests).

`install(lib)` hands the grids to the C kernels (quant/cpu_iquant.h) once, in `GRID_ORDER`.

Not here: decoding blocks (ggml_decode.py, cpu_iquant.h).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

#: ggml type id -> (name, gguf.quants class name): the grid-coded types.
GRID_TYPES = {
    16: "IQ2_XXS",
    17: "IQ2_XS",
    22: "IQ2_S",
    18: "IQ3_XXS",
    21: "IQ3_S",
    19: "IQ1_S",
    29: "IQ1_M",
}
#: The order the C kernels take their grids in (IQ1_M shares IQ1_S's).
GRID_ORDER = (16, 17, 22, 18, 21, 19)

#: Sign bits of IQ2_XXS / IQ2_XS / IQ3_XXS's 7-bit sign index i: i, plus bit 7 when i has an
#: odd number of set bits.
KSIGNS = np.array([i | (bin(i).count("1") & 1) << 7 for i in range(128)], dtype=np.uint8)


@functools.cache
def grid(qtype: int) -> np.ndarray:
    """int8 (points, width) grid of a grid-coded type, read-only."""
    from gguf import quants

    cls = getattr(quants, GRID_TYPES[qtype])
    cls.init_grid()
    points = np.ascontiguousarray(np.asarray(cls.grid).reshape(cls.grid_shape).astype(np.int8))
    points.flags.writeable = False
    return points


@functools.cache
def packed() -> np.ndarray:
    """Every grid of GRID_ORDER, flattened one after another (the C kernels' table)."""
    return np.concatenate([grid(t).reshape(-1) for t in GRID_ORDER])


def install(lib: ctypes.CDLL) -> bool:
    """Give the C kernels their grids; False (the grid types then take the tensor-op path)
    where gguf-py lacks one or the library disagrees on their sizes."""
    try:
        table = packed()
    except (AttributeError, ImportError, ValueError):
        return False
    return lib.ws_iq_set_tables(table.ctypes.data, table.size) == 0
