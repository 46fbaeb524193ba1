"""Q4_0, Q4_1, Q5_0 and Q5_1 blocks fitted under an importance matrix (`export --imatrix`).

Without one, kquants.quantize_blocks writes these types bit for bit as ggml's reference
quantizers do (in C, quant/cpu_kquant.c; a block's largest weight sets its step). With one, each block of 32 is
fitted as ggml's imatrix quantizers do: least squares weighted by `importance * sqrt(sigma2 +
w**2)` (sigma2 the row's mean square), over a few trial steps, so the columns the inputs use
most are reproduced best. The fits are quant/fits.py's, as the k-quants use them; this
module packs their codes in ggml's layouts (checked by gguf-py's dequantizers in the tests):

- Q4_0, 18 bytes: fp16 d, then byte j = code j | code j + 16 << 4; w ~ d * (code - 8).
- Q5_0, 22 bytes: fp16 d, 32 bits whose bit j is code j's fifth, then Q4_0's nibbles of the
  low four bits; w ~ d * (code - 16).
- Q4_1, 20 bytes / Q5_1, 24 bytes: fp16 d and m, then as Q4_0 / Q5_0; w ~ d * code + m.

`weighted_int4` fits `weightsmith quantize --to int4 --imatrix`'s groups the same way (an int4
group is a Q4_1 block of `group_size` weights).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

from weightsmith.quant.fits import (
    AFFINE_TRIES,
    SYMMETRIC_TRIES,
    codes,
    fit_affine,
    fit_symmetric,
    fp16,
    importance_weights,
)

#: type -> (codes' levels - 1, symmetric): Q4_0 / Q5_0 centre their codes, Q4_1 / Q5_1 add m.
_KINDS = {QT.Q4_0: (15, True), QT.Q5_0: (31, True), QT.Q4_1: (15, False), QT.Q5_1: (31, False)}


def weighted_affine(blocks: torch.Tensor, weight: torch.Tensor, top: int) -> tuple:
    """Per row of blocks (n, G): codes in [0, top] (float), fp16 d and m with w ~ d * code + m,
    fitted by least squares under `weight` (n, G)."""
    scale, low = fit_affine(blocks, weight, top, AFFINE_TRIES, signed_low=True)
    d, m = fp16(scale), fp16(low)
    return codes(blocks - m.float()[:, None], d.float()[:, None], 0, top), d, m


def weighted_int4(w: torch.Tensor, qw: torch.Tensor, group_size: int) -> tuple:
    """`weightsmith quantize --to int4 --imatrix`: w (N, K) as (codes uint8 (N, K), scales fp16
    (N, K/G), zeros fp16 (N, K/G)), w ~ code * scale + zero, each group fitted as a Q4_1 block
    under the importance qw (broadcastable to w)."""
    n, k = w.shape
    rows = w.detach().float()
    weight = importance_weights(rows, qw.float().expand(n, k), rows.pow(2).mean(1, keepdim=True))
    q, d, m = weighted_affine(rows.reshape(-1, group_size), weight.reshape(-1, group_size), 15)
    scales = d.float().clamp(min=2.0**-24).half()  # int4 layers keep a positive scale
    return q.to(torch.uint8).reshape(n, k), scales.reshape(n, -1), m.reshape(n, -1)


def weighted_blocks(x: torch.Tensor, qw: torch.Tensor, qtype: QT) -> torch.Tensor:
    """The blocks of `qtype` for x (..., K), K a multiple of 32, weighted by qw (x's shape):
    uint8 (rows, K / 32 * bytes)."""
    rows = x.reshape(-1, x.shape[-1])
    sigma2 = rows.pow(2).mean(1, keepdim=True)
    weight = importance_weights(rows, qw.reshape(rows.shape), sigma2).reshape(-1, 32)
    blocks = rows.reshape(-1, 32)
    top, symmetric = _KINDS[qtype]
    if symmetric:
        half = (top + 1) // 2
        scale = fit_symmetric(blocks, half, SYMMETRIC_TRIES, weight)
        d = fp16(scale)
        q = codes(blocks, d.float()[:, None], -half, half - 1) + half
        head = d[:, None].view(torch.uint8)
    else:
        q, d, m = weighted_affine(blocks, weight, top)
        head = torch.stack([d, m], 1).view(torch.uint8)
    q = q.to(torch.uint8)
    nibbles = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    parts = [head]
    if top == 31:
        bits = (q >> 4).to(torch.int64) << torch.arange(32)
        parts.append(bits.sum(1, keepdim=True).to(torch.int32).view(torch.uint8))  # little-endian
    parts.append(nibbles)
    return torch.cat(parts, 1).reshape(rows.shape[0], -1).numpy()
