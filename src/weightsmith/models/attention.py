"""Scaled dot-product attention, the soft-capped attention of Gemma 2 and gpt-oss's attention sinks.

`attend` is PyTorch's SDPA (flash / memory-efficient kernels) unless the model caps its scores
or has sinks. Gemma 2 passes every score through cap * tanh(score / cap) before the mask and the
softmax, and gpt-oss adds a learned logit per head (its "sink") to each softmax, whose share of
the probability goes to no value; no fused kernel does either, so there the product is written
out in the order transformers' eager paths compute it: scores in the inputs' dtype, the cap, the
mask, the sink, a softmax in fp32 cast back, a block of queries at a time for long inputs. A
query's grouped heads share their key/value head through a view, with no copy of the keys. Masked
scores take the dtype's lowest value rather than -inf, so a query that sees no key (a padding
slot) gets finite outputs that nobody reads, not NaNs that would reach the keys of later layers.

Not here: which mask a layer gets (model.py), packed rows (packed.py, which calls `attend`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Scores the written-out path holds at once (B * H * T * S): longer inputs go a block of queries at
#: a time, so a long prompt's scores never take more than ~128 MiB in fp32.
SCORE_BLOCK = 1 << 25


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, Hkv, S, D) -> (B, H, T, D), H a multiple of Hkv.

    mask: (B or 1, 1, T, S) booleans, True where a query sees a key; None: every key, or with
        is_causal (T == S) each query the keys up to its own.
    scale: the scores' factor (default D ** -0.5).
    softcap: Gemma 2's cap on the scores (None: none).
    sinks: gpt-oss's logit per head (H,), one more entry of each softmax whose value is zero.
    Without softcap and sinks SDPA computes the whole attention."""
    h, n_kv = q.shape[1], k.shape[1]
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=n_kv != h
        )
    b, _, t, d = q.shape
    s = k.shape[2]
    if is_causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scale = d**-0.5 if scale is None else scale
    rows = max(1, SCORE_BLOCK // max(1, b * h * s))
    if t <= rows:
        return _written_out(q, k, v, mask, scale, softcap, sinks)
    outs = []
    for i in range(0, t, rows):  # a block of queries (and their mask rows) at a time
        m = None if mask is None else mask[..., i : i + rows, :]
        outs.append(_written_out(q[:, :, i : i + rows], k, v, m, scale, softcap, sinks))
    return torch.cat(outs, dim=2)


def _written_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """The attention as transformers' eager path computes it: scores in the inputs' dtype, the cap,
    the mask, the sinks, a softmax in fp32 cast back."""
    b, h, t, d = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    group = h // n_kv
    # Query heads g*j .. g*j + g-1 read key head j: (B, Hkv, G*T, D) @ (B, Hkv, D, S).
    scores = (q.reshape(b, n_kv, group * t, d) @ k.transpose(-1, -2)).view(b, h, t, s) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    else:  # the sink is one more logit, its value zero: softmax over [scores, sink], sink dropped
        sink = sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, t, 1)
        probs = F.softmax(torch.cat((scores, sink), dim=-1), dim=-1, dtype=torch.float32)[..., :s].to(v.dtype)
    return (probs.reshape(b, n_kv, group * t, s) @ v).view(b, h, t, d)
