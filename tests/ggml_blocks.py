"""GGUF quantized blocks for the tests of GGMLLinear: made by gguf-py's own quantizers where it
has them (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0, MXFP4), else random valid bytes (gguf-py
has no k-quant, IQ1-IQ4 quantizer) with fp16 scales chosen so the weights stay around `scale`
in size (IQ1_M's scale is spread over the top nibbles of its last four 16-bit words)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

TYPES = [
    QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    QT.IQ4_NL, QT.IQ4_XS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M,
    QT.TQ1_0, QT.TQ2_0, QT.MXFP4,
]  # fmt: skip
QUANTIZED_BY_GGUF = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.TQ1_0, QT.TQ2_0, QT.MXFP4}
#: The largest code times sub-scale of the others: Q2_K 3 * 15, Q3_K 4 * 32, Q4_K 15 * 63,
#: Q5_K 31 * 63, Q6_K 32 * 127; the IQ4 level 127 (times IQ4_XS's sub-scale, up to 32); the
#: IQ2 grid's 43 times (0.5 + 15) / 4, IQ3_XXS's 62 times (0.5 + 15) / 2, IQ3_S's 15 times 31,
#: IQ1's 1 + 1/8 times 15.
K_RANGE = {
    QT.Q2_K: 3 * 15, QT.Q3_K: 4 * 32, QT.Q4_K: 15 * 63, QT.Q5_K: 31 * 63, QT.Q6_K: 32 * 127,
    QT.IQ4_NL: 127, QT.IQ4_XS: 127 * 32, QT.IQ2_XXS: 167, QT.IQ2_XS: 167, QT.IQ2_S: 167,
    QT.IQ3_XXS: 481, QT.IQ3_S: 465, QT.IQ1_S: 17, QT.IQ1_M: 17,
}  # fmt: skip
#: Byte offset of a block's fp16 scale d (0 unless listed), and of its fp16 minimum's scale for
#: the types with one.
D_AT = {QT.Q2_K: 80, QT.Q3_K: 108, QT.Q6_K: 208, QT.TQ1_0: 52, QT.TQ2_0: 64}
DMIN_AT = {QT.Q2_K: 82, QT.Q4_K: 2, QT.Q5_K: 2}


def _halves(rng: np.random.Generator, shape: tuple[int, ...], size: float, signed: bool) -> np.ndarray:
    """fp16 values around `size` as (..., 2) bytes; signed: about a quarter negative."""
    v = size * rng.uniform(0.25, 1.0, shape)
    if signed:
        v = np.where(rng.random(shape) < 0.25, -v, v)
    return v.astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_blocks(
    qtype: QT, n: int, k: int, seed: int, scale: float = 0.05, signed: bool = True
) -> np.ndarray:
    """(n, row bytes) uint8: n rows of k weights in `qtype`."""
    rng = np.random.default_rng(seed)
    per, size = GGML_QUANT_SIZES[qtype]
    if qtype in QUANTIZED_BY_GGUF:
        w = rng.standard_normal((n, k)) * scale * rng.uniform(0.2, 2.0, (n, 1)) + rng.uniform(
            -scale, scale, k
        )
        return quantize(w.astype(np.float32), qtype)
    nb = k // per
    raw = rng.integers(0, 256, (n, nb, size), dtype=np.uint8)
    _set_d(raw, qtype, _halves(rng, (n, nb), scale / K_RANGE[qtype], signed))
    if qtype in DMIN_AT:
        at = DMIN_AT[qtype]
        raw[..., at : at + 2] = _halves(rng, (n, nb), scale / K_RANGE[qtype], signed)
    return raw.reshape(n, nb * size)


def with_edge_scales(blocks: np.ndarray, qtype: QT) -> np.ndarray:
    """A copy whose first blocks have scale 0, a subnormal fp16 scale and a negative one."""
    per, size = GGML_QUANT_SIZES[qtype]
    raw = blocks.copy().reshape(blocks.shape[0], -1, size)
    if qtype == QT.MXFP4:  # e8m0 exponents: 2^-128 and 2^-127 are subnormal floats
        for i, e in enumerate((0, 1, 120)):
            raw[i % raw.shape[0], i % raw.shape[1], 0] = e
        return raw.reshape(blocks.shape)
    for i, value in enumerate((0.0, 3e-7, -0.0123)):
        half = np.array([value], np.float16).view(np.uint8)
        _set_d(raw[i % raw.shape[0], i % raw.shape[1]][None], qtype, half[None])
    return raw.reshape(blocks.shape)


def _set_d(raw: np.ndarray, qtype: QT, halves: np.ndarray) -> None:
    """Write fp16 scales (..., 2) bytes into the blocks raw (..., block bytes) in place."""
    if qtype == QT.IQ1_M:  # the four nibbles of d in the top of the 16-bit words at 48, 50, 52, 54
        d = halves.copy().view(np.uint16)[..., 0]
        words = raw[..., 48:56].copy().view(np.uint16)
        for j in range(4):
            words[..., j] = (words[..., j] & 0x0FFF) | (d >> 4 * j & 15) << 12
        raw[..., 48:56] = words.view(np.uint8)
        return
    at = D_AT.get(qtype, 0)
    raw[..., at : at + 2] = halves
