"""The least-squares fits of quantization blocks, shared by the k-quants (kquants.py) and the
32-weight types weighted by an importance matrix (legacy_blocks.py).

Each fits, per row of a batch of sub-blocks, a scale (and for the affine kind an offset) to the
row's weights: a few trial steps around the one its range suggests, the codes rounded for each,
then the best scale (and offset) for those codes by weighted least squares; the trial with the
least weighted error wins. The weights say which errors cost most: `importance_weights`, with an
importance matrix or without one (importance 1), except Q4_K / Q5_K without one (`rms + |w|`,
ggml's heuristic, which measured as well there).
"""

from __future__ import annotations

import torch

#: Trial steps, in levels around the one a range suggests: the wide affine set (Q4_K, and the
#: 32-weight Q4_1 / Q5_1 under an importance matrix) and the symmetric set (Q3_K, Q6_K, Q4_0 / Q5_0).
AFFINE_TRIES = tuple(-1 + 0.1 * i for i in range(21))
SYMMETRIC_TRIES = tuple(0.1 * i for i in range(-9, 10) if i)


def importance_weights(
    blocks: torch.Tensor, qw: torch.Tensor | None, sigma2: torch.Tensor | None = None
) -> torch.Tensor:
    """ggml's fit weights under an importance matrix: qw * sqrt(sigma2 + x^2), per row of blocks
    (n, s); qw None: importance 1; sigma2 (n, 1), by default twice each row's mean square."""
    if sigma2 is None:
        sigma2 = 2 * blocks.pow(2).mean(1, keepdim=True)
    weight = (sigma2 + blocks * blocks).sqrt()
    return weight if qw is None else qw * weight


def fit_affine(
    x: torch.Tensor, weight: torch.Tensor, nmax: int, tries: tuple[float, ...], signed_low: bool = False
) -> tuple:
    """Per row of x (n, s): scale >= 0 and low <= 0 with x ~ scale*q + low, q in [0, nmax].

    Each try rounds with the range's step stretched by `nmax + t` levels, then refits scale and
    low by weighted least squares for those codes (low held at 0 when the fit wants it above).
    The plain min/max fit is the starting point; the smallest weighted error wins. With
    `signed_low` (Q4_1 / Q5_1 store the offset as a signed half) low may be above 0.
    """
    lo = x.amin(1) if signed_low else x.amin(1).clamp(max=0)
    span = x.amax(1) - lo
    inv = torch.where(span > 0, 1 / span, torch.zeros_like(span))
    # Sums of 32 terms are taken in fp32 (accurate to ~1e-7 of their size, and twice as fast as
    # fp64 sums); the least-squares algebra on them runs in fp64.
    wx = weight * x
    sw, sx, sxx = weight.sum(1).double(), wx.sum(1).double(), (wx * x).sum(1).double()
    best_scale, best_low = span / nmax, lo

    def error(scale: torch.Tensor, low: torch.Tensor, sq, sqq, sqx) -> torch.Tensor:
        s, b = scale.double(), low.double()
        return s * s * sqq + 2 * s * b * sq + b * b * sw - 2 * s * sqx - 2 * b * sx + sxx

    def sums(q: torch.Tensor) -> tuple:
        wq = weight * q
        return wq.sum(1).double(), (wq * q).sum(1).double(), (wq * x).sum(1).double()

    shifted = x - lo[:, None]
    q = (shifted * (nmax * inv)[:, None]).round_().clamp_(0, nmax)
    best_err = error(best_scale, best_low, *sums(q))
    for t in tries:
        q = (shifted * ((nmax + t) * inv)[:, None]).round_().clamp_(0, nmax)
        sq, sqq, sqx = sums(q)
        det = sw * sqq - sq * sq
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        scale = (sw * sqx - sq * sx) / safe
        low = (sqq * sx - sq * sqx) / safe
        above = (low > 0) & (not signed_low)  # an offset above zero: fit the scale alone (low = 0)
        scale = torch.where(above, sqx / sqq.clamp(min=1e-30), scale)
        low = torch.where(above, torch.zeros_like(low), low)
        ok &= scale > 0
        scale, low = scale.float(), low.float()
        err = error(scale, low, sq, sqq, sqx)
        better = ok & (err < best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, low, best_low)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_low


def fit_symmetric(x: torch.Tensor, nmax: int, tries: tuple[float, ...], weight: torch.Tensor) -> torch.Tensor:
    """Per row of x (n, s): a signed scale with x ~ scale*q, q in [-nmax, nmax - 1].

    The weight of largest magnitude maps to -nmax (using the extra negative level); each try
    stretches that by `t` levels and refits the scale by least squares weighted by `weight`.
    """
    big = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    inv = torch.where(big != 0, -1 / big, torch.zeros_like(big))
    wx = weight * x
    best_scale = torch.zeros_like(big)
    best_gain = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in (0.0, *tries):
        q = (x * ((nmax + t) * inv)[:, None]).round_().clamp_(-nmax, nmax - 1)
        best_scale, best_gain = keep_better_scale(wx, weight, q, best_scale, best_gain)
    return best_scale


def keep_better_scale(
    wx: torch.Tensor, weight: torch.Tensor, q: torch.Tensor, best_scale: torch.Tensor, best_gain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the least-squares scale for the codes' values q (weights `weight`, wx = weight *
    x) where it removes more weighted error than the best so far, else the best so far; with
    that gain. (The weighted error is sum(w x^2) - sqx^2/sqq at the best scale: the largest
    gain wins.)"""
    sqx = (wx * q).sum(1).double()
    sqq = (weight * q * q).sum(1).double()
    gain = torch.where(sqq > 0, sqx * sqx / sqq.clamp(min=1e-300), torch.zeros_like(sqq))
    better = gain > best_gain
    scale = torch.where(better, (sqx / sqq.clamp(min=1e-300)).float(), best_scale)
    return scale, torch.where(better, gain, best_gain)


def fp16(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-65504, 65504).to(torch.float16)


def codes(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """round(x / step) in [lo, hi] (float), 0 where the step is 0; step is (n, 1)."""
    inv = torch.where(step != 0, 1 / step, torch.zeros_like(step))
    return (x * inv).round_().clamp_(lo, hi)
