"""Scaled dot-product attention, and the soft-capped attention of Gemma 2.

`attend` is PyTorch's SDPA (flash / memory-efficient kernels) unless the model caps its scores.
Gemma 2 passes every score through cap * tanh(score / cap) before the mask and the softmax, which
no fused kernel does, so there the product is written out in the order transformers' eager
Gemma 2 computes it: scores in the inputs' dtype, the cap, the mask, a softmax in fp32 cast
back. A query's grouped heads share their key/value head through a view, with no copy of the
keys. Masked scores take the dtype's lowest value rather than -inf, so a query that sees no key
(a padding slot) gets finite outputs that nobody reads, not NaNs that would reach the keys of
later layers.

Not here: which mask a layer gets (model.py), packed rows (packed.py, which calls `attend`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, Hkv, S, D) -> (B, H, T, D), H a multiple of Hkv.

    mask: (B or 1, 1, T, S) booleans, True where a query sees a key; None: every key, or with
        is_causal (T == S) each query the keys up to its own.
    scale: the scores' factor (default D ** -0.5).
    softcap: Gemma 2's cap on the scores (None: none, and SDPA computes the whole attention)."""
    h, n_kv = q.shape[1], k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=n_kv != h
        )
    b, _, t, d = q.shape
    s, group = k.shape[2], h // n_kv
    scale = d**-0.5 if scale is None else scale
    # Query heads g*j .. g*j + g-1 read key head j: (B, Hkv, G*T, D) @ (B, Hkv, D, S).
    scores = (q.reshape(b, n_kv, group * t, d) @ k.transpose(-1, -2)).view(b, h, t, s) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return (probs.view(b, n_kv, group * t, s) @ v).view(b, h, t, d)
