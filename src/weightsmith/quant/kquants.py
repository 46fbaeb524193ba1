"""GGUF k-quant blocks (Q2_K to Q6_K) made from float weights, for `export --quant q4_k_m` etc.

A k-quant row is cut into super-blocks of 256 weights, each with one fp16 scale (and one
fp16 scale for minima) and small integer scales for its sub-blocks:

- Q4_K (4.5 bits a weight) and Q5_K (5.5): eight sub-blocks of 32, each `w ~ d*sc*q - dmin*m`
  with q in [0, 15] / [0, 31] and 6-bit sc, m (so every sub-block has its own offset).
- Q6_K (6.5625): sixteen sub-blocks of 16, each `w ~ d*sc*q` with q in [-32, 31] and int8 sc.
- Q3_K (3.4375): as Q6_K with q in [-4, 3] and 6-bit signed sc; Q2_K (2.625): sixteen
  sub-blocks of 16, `w ~ d*sc*q - dmin*m` with q in [0, 3] and 4-bit sc, m.

How a sub-block's scale is chosen is what sets the error (the format only fixes how it is
stored). Here each sub-block tries a few scales near the one its range suggests; for each it
rounds the weights and then solves the weighted least-squares problem for the best scale (and
offset) given those codes, keeping the pair with the smallest weighted error (quant/fits.py).
The weights of that error favour large weights: `importance * sqrt(sigma2 + w**2)` (sigma2 twice
the super-block's mean square; importance 1 without an importance matrix), except Q4_K/Q5_K
without one, which weigh by `rms + |w|` of the super-block as llama.cpp's reference quantizer
does. llama.cpp weighs Q2_K by `|w|` and Q3_K/Q6_K by `w**2` without an importance matrix; the
weighting here gives those types 2-13% less RMS error, and llama.cpp's decode of a q2_k file
of width 2048 8% less KL divergence from F32 (README, Benchmarks). The sub-block scales are
then rounded onto the super-block's grid (6-bit or int8 levels of one fp16 step); as that costs
about 2% of RMS error, each sub-block then takes the best of its level and the levels one up
and one down (with the minimum's, for Q4_K/Q5_K), the codes rounded again for each. On the same
weights the result has 0.4-6% less RMS error than ggml's quantizer (tests/test_gguf_kquants.py).

The steps run in C (quant/cpu_kquant.c, a super-block at a time, about 5x faster) where the
kernels are built, and otherwise as the batched tensor passes below, over all blocks of a
matrix in chunks; the tests hold both to the same error.

The byte layouts are ggml's (checked against gguf-py's dequantizers in the tests):
- Q4_K, 144 bytes: d, dmin (fp16), 12 bytes of 6-bit scales and minima, 128 bytes of codes:
  byte l of each 32-byte chunk c holds sub-block 2c's code l (low nibble) and 2c+1's (high).
- Q5_K, 176 bytes: Q4_K's header, 32 bytes whose bit j of byte l is sub-block j's fifth bit
  of code l, then Q4_K's 128 bytes of low nibbles.
- Q6_K, 210 bytes: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d.
- Q3_K, 110 bytes: 32 bytes whose bit k of byte l is code 32k + l's third bit, 64 bytes of the
  codes' low 2 bits (byte 32h + l holds codes 128h + 32j + l at bits 2j), 12 bytes of 6-bit
  scales (sc + 32), d. Q2_K, 84 bytes: 16 bytes of sc | m << 4, the 64 bytes of 2-bit codes,
  d, dmin.

`quantize_blocks` also writes the 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) bit for bit as
ggml's reference quantizers do: in C (quant/cpu_kquant.c) where the kernels are built, else with
gguf-py's numpy ports of them, so that every export type goes through one call.

Not here: which tensor gets which type (checkpoint/gguf_mix.py), reading GGUF blocks
(quant/ggml_linear.py, checkpoint/gguf_quants.py).
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from weightsmith.quant import cpu_kernels, iq4
from weightsmith.quant.fits import (
    AFFINE_TRIES,
    SYMMETRIC_TRIES,
    codes,
    fit_affine,
    fit_symmetric,
    fp16,
    importance_weights,
)
from weightsmith.quant.legacy_blocks import weighted_blocks

QK_K = 256
#: Bytes of one 256-weight super-block.
BLOCK_BYTES = {QT.Q2_K: 84, QT.Q3_K: 110, QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210}
#: The IQ4 types (quant/iq4.py): bytes and weights of a block.
IQ4_BLOCKS = {QT.IQ4_NL: (18, 32), QT.IQ4_XS: (136, QK_K)}
#: The 32-weight types, written as ggml's reference quantizers write them (C, else gguf-py).
LEGACY_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q5_0: 22, QT.Q5_1: 24, QT.Q8_0: 34}
NOT_FINITE = "the weights hold NaN or infinity"
#: Super-blocks quantized at a time by the tensor passes (bounds their temporaries to tens of MB).
_CHUNK = 8192


def quantize_blocks(
    w: np.ndarray | torch.Tensor,
    qtype: QT,
    *,
    kernels: bool = True,
    importance: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """The GGUF blocks of `qtype` for a float matrix (..., K): uint8 (..., K / block * bytes).

    k-quants (K a multiple of 256) as described above and IQ4_NL / IQ4_XS (K a multiple of 32 /
    256) as iq4.py does, by the C kernels where they are built (and `kernels`), by the tensor
    passes otherwise; Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (K a multiple of 32) bit for bit as
    ggml's reference quantizers write them, by the C kernels, else by gguf-py's numpy ports.

    `importance` (an importance matrix's row for this matrix: the mean square of each input
    column over calibration text, shape broadcastable to w's, e.g. (K,)) weighs every fit by
    `importance * sqrt(sigma2 + w**2)` as ggml's quantizers do, so the columns the model's
    inputs use most are reproduced best; the 32-weight types then use legacy_blocks.py's
    weighted fits (Q8_0, whose step is fine enough, ignores it as ggml's does).
    """
    sizes = {**BLOCK_BYTES, **LEGACY_BYTES, **{t: b for t, (b, _) in IQ4_BLOCKS.items()}}
    if qtype not in sizes:
        raise ValueError(f"{qtype.name} is not a type this module writes")
    x = torch.as_tensor(w).to(torch.float32)
    weights = QK_K if qtype in BLOCK_BYTES else IQ4_BLOCKS.get(qtype, (0, 32))[1]
    if x.shape[-1] % weights:
        raise ValueError(f"rows of {x.shape[-1]} weights are not a multiple of {weights}")
    qw = None if importance is None or qtype == QT.Q8_0 else _importance(importance, x)
    lib = cpu_kernels.library() if kernels else None
    if (lib is None or qtype in LEGACY_BYTES and qw is not None) and not torch.isfinite(x).all():
        raise ValueError(NOT_FINITE)  # (the C kernels check as they go: a pass less)
    if qtype in LEGACY_BYTES:
        if qw is not None:
            return weighted_blocks(x, qw, qtype).reshape(*x.shape[:-1], -1)
        if lib is None:  # gguf-py loops over 16 rows at a time, in numpy
            rows = x.reshape(-1, x.shape[-1]).contiguous().numpy()
            return gguf.quants.quantize(rows, qtype).reshape(*x.shape[:-1], -1)
    blocks = x.reshape(-1, weights).contiguous()
    qw_blocks = None if qw is None else qw.reshape(-1, weights).contiguous()
    out = torch.empty(blocks.shape[0], sizes[qtype], dtype=torch.uint8)
    if lib is not None:
        tries = np.array(_TRIES.get(qtype, ()), dtype=np.float64)
        cpu_kernels.use_threads(lib)
        fn, i64, ptr = lib.ws_quantize_blocks, ctypes.c_int64, ctypes.c_void_p
        fn.argtypes, fn.restype = [i64, ptr, ptr, i64, ptr, i64, ptr], ctypes.c_int
        qw_ptr = None if qw_blocks is None else qw_blocks.data_ptr()
        n = blocks.shape[0]
        rc = fn(int(qtype), blocks.data_ptr(), qw_ptr, n, tries.ctypes.data, len(tries), out.data_ptr())
        if rc:
            raise ValueError(NOT_FINITE if rc == 2 else f"the C kernels do not write {qtype.name}")
    else:
        encode = {
            QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
            QT.IQ4_NL: iq4.iq4_nl, QT.IQ4_XS: iq4.iq4_xs,
        }[qtype]  # fmt: skip
        for start in range(0, blocks.shape[0], _CHUNK):
            part = None if qw_blocks is None else qw_blocks[start : start + _CHUNK]
            out[start : start + _CHUNK] = encode(blocks[start : start + _CHUNK], part)
    return out.numpy().reshape(*x.shape[:-1], -1)


def _importance(importance: np.ndarray | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The importance values as a float32 tensor of x's shape (checked: finite and >= 0)."""
    qw = torch.as_tensor(importance).to(torch.float32)
    try:
        qw = qw.expand_as(x).contiguous()
    except RuntimeError:
        raise ValueError(
            f"importance of shape {tuple(qw.shape)} does not fit weights {tuple(x.shape)}"
        ) from None
    if not torch.isfinite(qw).all() or (qw < 0).any():
        raise ValueError("importance values must be finite and >= 0")
    return qw


# ---------------------------------------------------------------------------------------------
# Sub-block grids


def _grid(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the fp16 step of a 0..levels grid over non-negative values, and each value's level."""
    step = fp16(values.amax(1) / levels)
    inv = torch.where(step > 0, 1 / step.float(), torch.zeros_like(step, dtype=torch.float32))
    return step, (values * inv[:, None]).round_().clamp_(0, levels).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K

_TRIES_Q4 = AFFINE_TRIES
_TRIES_Q5 = tuple(-0.5 + 0.1 * i for i in range(16))


def _affine_blocks(
    blocks: torch.Tensor,
    qw: torch.Tensor | None,
    nmax: int,
    tries: tuple[float, ...],
    size: int = 32,
    levels: int = 63,
) -> tuple:
    """Codes (n, 256) and the header (d, dmin, sc, m on a 0..levels grid) of super-blocks cut
    into sub-blocks of `size`: Q4_K / Q5_K (32, 6-bit levels, weights rms + |x| without qw) or
    Q2_K (16, 4-bit levels, `importance_weights` of importance 1 without qw); with importance
    values qw, `importance_weights` for all."""
    n, count = blocks.shape[0], QK_K // size
    if qw is not None or size == 16:
        weight = importance_weights(blocks, qw).reshape(n * count, size)
    else:
        weight = (blocks.pow(2).mean(1, keepdim=True).sqrt() + blocks.abs()).reshape(n * count, size)
    sub = blocks.reshape(n * count, size)
    scale, low = fit_affine(sub, weight, nmax, tries)
    d, sc = _grid(scale.reshape(n, count), levels)
    dmin, m = _grid((-low).reshape(n, count), levels)
    # Rounding the scales onto the grid costs about 2% of RMSE; each sub-block then takes the
    # best of its scale and minimum levels one up or down (weighted error, codes re-rounded).
    d_sub = d.float().repeat_interleave(count)[:, None]
    dmin_sub = dmin.float().repeat_interleave(count)[:, None]
    sc, m = sc.reshape(n * count, 1), m.reshape(n * count, 1)
    best_err, best_sc, best_m = None, sc, m
    for dsc in (0, -1, 1):
        for dm in (0, -1, 1):
            sc_try = (sc.short() + dsc).clamp_(0, levels).to(torch.uint8)
            m_try = (m.short() + dm).clamp_(0, levels).to(torch.uint8)
            step, offset = d_sub * sc_try, dmin_sub * m_try
            q = codes(sub + offset, step, 0, nmax)
            err = (weight * (step * q - offset - sub).square_()).sum(1, keepdim=True)
            better = err < best_err if best_err is not None else torch.ones_like(err, dtype=torch.bool)
            best_err = err if best_err is None else torch.where(better, err, best_err)
            best_sc, best_m = torch.where(better, sc_try, best_sc), torch.where(better, m_try, best_m)
    q = codes(sub + dmin_sub * best_m, d_sub * best_sc, 0, nmax).to(torch.uint8).reshape(n, QK_K)
    return q, d, dmin, best_sc.reshape(n, count), best_m.reshape(n, count)


def _pack_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ggml's 12 bytes of eight 6-bit scales and minima per super-block."""
    out = torch.empty(sc.shape[0], 12, dtype=torch.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _header(d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    halves = torch.stack([d, dmin], 1).view(torch.uint8)  # (n, 4): d then dmin, little-endian
    return torch.cat([halves, _pack_scales(sc, m)], 1)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """128 bytes a super-block: chunk c's byte l = code 64c + l | code 64c + 32 + l << 4."""
    q = (q & 15).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    q, d, dmin, sc, m = _affine_blocks(blocks, qw, 15, _TRIES_Q4)
    return torch.cat([_header(d, dmin, sc, m), _nibbles(q)], 1)


def _q5_k(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    q, d, dmin, sc, m = _affine_blocks(blocks, qw, 31, _TRIES_Q5)
    top = (q >> 4).reshape(-1, 8, 32)  # sub-block j's fifth bits
    qh = torch.zeros(q.shape[0], 32, dtype=torch.uint8)
    for j in range(8):
        qh |= top[:, j] << j
    return torch.cat([_header(d, dmin, sc, m), qh, _nibbles(q)], 1)


# ---------------------------------------------------------------------------------------------
# Q6_K

_TRIES_Q6 = SYMMETRIC_TRIES


def _symmetric_blocks(
    blocks: torch.Tensor, qw: torch.Tensor | None, nmax: int, smax: int, tries: tuple[float, ...]
) -> tuple:
    """Sixteen sub-blocks of 16, x ~ d * sc * q with q in [-nmax, nmax - 1], sc in [-smax,
    smax - 1] (Q6_K: 32, 128; Q3_K: 4, 32): codes + nmax as uint8 (n, 256), sc (n, 16), fp16 d.
    Fits and levels weigh by `importance_weights` (importance 1 without qw)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n * 16, 16)
    weight = importance_weights(blocks, qw).reshape(n * 16, 16)
    scale = fit_symmetric(sub, nmax, tries, weight).reshape(n, 16)
    # The scale of largest magnitude maps to -smax (the extra negative level), so d may be negative.
    big = scale.gather(1, scale.abs().argmax(1, keepdim=True))[:, 0]
    inv = torch.where(big != 0, -smax / big, torch.zeros_like(big))
    sc = (scale * inv[:, None]).round_().clamp_(-smax, smax - 1).to(torch.int8)
    d = fp16(torch.where(inv != 0, 1 / inv, torch.zeros_like(inv)))
    # As for Q4_K: each sub-block takes the best of its level and the ones beside it.
    d_sub, sc = d.float().repeat_interleave(16)[:, None], sc.reshape(n * 16, 1)
    best_err, best_sc = None, sc
    for dsc in (0, -1, 1):
        sc_try = (sc.short() + dsc).clamp_(-smax, smax - 1).to(torch.int8)
        step = d_sub * sc_try
        err = (step * codes(sub, step, -nmax, nmax - 1) - sub).square_()
        err = (weight * err).sum(1, keepdim=True)
        better = err < best_err if best_err is not None else torch.ones_like(err, dtype=torch.bool)
        best_err = err if best_err is None else torch.where(better, err, best_err)
        best_sc = torch.where(better, sc_try, best_sc)
    q = (codes(sub, d_sub * best_sc, -nmax, nmax - 1) + nmax).to(torch.uint8).reshape(n, QK_K)
    return q, best_sc.reshape(n, 16), d


def _q6_k(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    n = blocks.shape[0]
    q, sc, d = _symmetric_blocks(blocks, qw, 32, 128, _TRIES_Q6)
    q = q.reshape(n, 2, 4, 32)
    # Per half of 128: ql[l] = q[l] | q[64+l] << 4, ql[32+l] = q[32+l] | q[96+l] << 4;
    # qh[l] holds the top two bits of q[l], q[32+l], q[64+l], q[96+l] at bits 0, 2, 4, 6.
    low, high = q & 15, q >> 4
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(torch.uint8), d[:, None].view(torch.uint8)], 1
    )


# ---------------------------------------------------------------------------------------------
# Q2_K / Q3_K

_TRIES_Q2 = _TRIES_Q5
_TRIES_Q3 = _TRIES_Q6
#: Each type's tries (shared with the C kernels).
_TRIES = {
    QT.Q2_K: _TRIES_Q2, QT.Q3_K: _TRIES_Q3, QT.Q4_K: _TRIES_Q4, QT.Q5_K: _TRIES_Q5, QT.Q6_K: _TRIES_Q6,
    QT.IQ4_NL: iq4.TRIES, QT.IQ4_XS: iq4.TRIES,
}  # fmt: skip


def pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """Two bits of each code of (..., 256), 64 bytes a super-block (Q2_K's and Q3_K's layout): per
    half h of 128, byte 32h + l holds codes 128h + 32j + l (j = 0..3) at bits 2j."""
    q = (q & 3).unflatten(-1, (2, 4, 32))  # (h, j, l)
    return sum(q[..., j, :] << (2 * j) for j in range(4)).flatten(-2)


def unpack_crumbs(qs: torch.Tensor) -> torch.Tensor:
    """`pack_crumbs`' inverse: (..., 64) bytes -> (..., 256) codes 0..3."""
    halves = qs.unflatten(-1, (2, 32))  # (h, l)
    return torch.stack([(halves >> (2 * j)) & 3 for j in range(4)], dim=-2).flatten(-3)


def _q2_k(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    q, d, dmin, sc, m = _affine_blocks(blocks, qw, 3, _TRIES_Q2, size=16, levels=15)
    halves = torch.stack([d, dmin], 1).view(torch.uint8)
    return torch.cat([sc | (m << 4), pack_crumbs(q), halves], 1)


def _q3_k(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    n = blocks.shape[0]
    q, sc, d = _symmetric_blocks(blocks, qw, 4, 32, _TRIES_Q3)
    third = (q >> 2).reshape(n, 8, 32)  # hmask: bit k of byte l is code 32k + l's third bit
    hmask = torch.zeros(n, 32, dtype=torch.uint8)
    for k in range(8):
        hmask |= third[:, k] << k
    # 6-bit scales (sc + 32): low nibbles of 0-3 | 8-11 << 4, of 4-7 | 12-15 << 4, then the
    # high pairs of k, 4+k, 8+k, 12+k at bits 0, 2, 4, 6 of byte 8 + k.
    u = (sc.short() + 32).to(torch.uint8).reshape(n, 4, 4)
    low, high = u & 15, u >> 4
    packed = torch.cat(
        [low[:, 0] | (low[:, 2] << 4), low[:, 1] | (low[:, 3] << 4),
         high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)], 1,
    )  # fmt: skip
    return torch.cat([hmask, pack_crumbs(q), packed, d[:, None].view(torch.uint8)], 1)
