"""GGUF IQ4_NL and IQ4_XS blocks made from float weights, for `export --quant iq4_nl | iq4_xs`.

Both store 4-bit codes that index 16 fixed int8 levels, spaced closer near zero than at the
ends (-127 ... 113: weights cluster near zero, so that is where resolution pays), times a scale:

- IQ4_NL (4.5 bits a weight), 18 bytes per 32 weights: an fp16 scale d, then 16 bytes whose
  low nibbles are codes 0..15 and high nibbles codes 16..31; w ~ d * LEVELS[code].
- IQ4_XS (4.25 bits), 136 bytes per 256 weights in eight sub-blocks of 32: an fp16 d, 16 bits
  holding each sub-block's scale's top 2 bits (bits 2i, 2i+1), 4 bytes of their low 4 bits
  (sub-block i in byte i / 2, high nibble for odd i), then IQ4_NL's 16 code bytes per sub-block;
  w ~ d * (ls - 32) * LEVELS[code] with the 6-bit ls.

The fit, per sub-block of 32: the weight of largest magnitude is mapped onto each trial level
(`TRIES`: near -127 and near 113, so the scale may come out negative), every weight is rounded to
its nearest level, and the scale is refitted by weighted least squares for those codes; the trial
that removes the most weighted error wins. The weights of that error are
`importance * sqrt(sigma2 + w**2)` (sigma2: twice the block's mean square), ggml's weights under
an importance matrix, with an importance of 1 without one: llama.cpp's IQ4 quantizer weighs by
`w**2` there, which on seeded normal, Student-t and uniform weights gives 2.5-3% more RMS error
than this (a search over more scales under `w**2` makes the RMS error worse, not better). IQ4_NL then stores the scale in fp16 and rounds again to the stored scale. IQ4_XS puts
the eight scales on one grid (the scale of largest magnitude is -32 steps of fp16 d) and, as for
the k-quants, each sub-block takes the best of its grid level and the ones beside it, the codes
rounded again for each. llama.cpp tries only the negative end and rounds with the unrounded
scale; on the same weights these blocks have 2.5-3% less RMS error (tests/test_gguf_kquants.py).

The steps run in C (quant/cpu_kquant.c) where the kernels are built, else as the tensor passes
here; the tests hold both to the same error.
"""

from __future__ import annotations

import torch

from weightsmith.quant.fits import fp16, importance_weights, keep_better_scale

#: ggml's IQ4 levels (kvalues_iq4nl).
LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: The levels the largest weight of a sub-block is mapped onto, one trial each.
TRIES = tuple(float(end + t) for end in (-127, 113) for t in range(-7, 8))
_LEVELS = torch.tensor(LEVELS, dtype=torch.float32)
_MIDPOINTS = (_LEVELS[1:] + _LEVELS[:-1]) / 2


def nearest(v: torch.Tensor) -> torch.Tensor:
    """The index of the level nearest each value (a tie goes to the upper level)."""
    return torch.bucketize(v, _MIDPOINTS, right=True)


def _codes(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Each weight's code for a per-row step (n, 1); a step of 0 gives the level nearest 0."""
    inv = torch.where(step != 0, 1 / step, torch.zeros_like(step))
    return nearest(x * inv)


def fit_levels(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per row of x (n, 32): the scale s with x ~ s * LEVELS[code] (weighted least squares)."""
    big = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    inv = torch.where(big != 0, 1 / big, torch.zeros_like(big))
    wx = weight * x
    best_scale = torch.zeros_like(big)
    best_gain = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in TRIES:
        q = _LEVELS[nearest(x * (t * inv)[:, None])]
        best_scale, best_gain = keep_better_scale(wx, weight, q, best_scale, best_gain)
    return best_scale


def _pack(idx: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes -> (n, 16) bytes: code l in the low nibble of byte l, code 16 + l in the high."""
    idx = idx.to(torch.uint8)
    return idx[:, :16] | (idx[:, 16:] << 4)


def iq4_nl(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 32) float weights -> (n, 18) IQ4_NL blocks."""
    d = fp16(fit_levels(blocks, importance_weights(blocks, qw)))
    idx = _codes(blocks, d.float()[:, None])
    return torch.cat([d[:, None].view(torch.uint8), _pack(idx)], 1)


def iq4_xs(blocks: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 256) float weights -> (n, 136) IQ4_XS blocks."""
    n = blocks.shape[0]
    weight = importance_weights(blocks, qw).reshape(n * 8, 32)
    sub = blocks.reshape(n * 8, 32)
    scale = fit_levels(sub, weight).reshape(n, 8)
    big = scale.gather(1, scale.abs().argmax(1, keepdim=True))[:, 0]
    d = fp16(big / -32)  # the largest scale is -32 steps of d
    inv = torch.where(d != 0, 1 / d.float(), torch.zeros_like(big))
    ls = (scale * inv[:, None]).round_().clamp_(-32, 31).reshape(n * 8, 1)
    d_sub = d.float().repeat_interleave(8)[:, None]
    best_err, best_ls = None, ls
    for step in (0, -1, 1):
        ls_try = (ls + step).clamp_(-32, 31)
        scale_try = d_sub * ls_try
        err = (weight * (scale_try * _LEVELS[_codes(sub, scale_try)] - sub).square_()).sum(1, keepdim=True)
        better = err < best_err if best_err is not None else torch.ones_like(err, dtype=torch.bool)
        best_err = err if best_err is None else torch.where(better, err, best_err)
        best_ls = torch.where(better, ls_try, best_ls)
    idx = _codes(sub, d_sub * best_ls)
    u = (best_ls.reshape(n, 8) + 32).to(torch.int32)
    high = ((u >> 4) << (2 * torch.arange(8))).sum(1)  # 2 bits a sub-block, a 16-bit word
    low = (u & 15).reshape(n, 4, 2)
    return torch.cat(
        [
            d[:, None].view(torch.uint8),
            torch.stack([high & 0xFF, high >> 8], 1).to(torch.uint8),
            (low[:, :, 0] | (low[:, :, 1] << 4)).to(torch.uint8),
            _pack(idx).reshape(n, 128),
        ],
        1,
    )
