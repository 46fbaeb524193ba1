"""`models.attention.attend`: SDPA, or Gemma 2's soft-capped attention written out. The capped
path is checked against the attention computed head by head from its definition (scores scaled,
capped by cap * tanh(s / cap), masked, softmax), with grouped-query heads, masks and gradients;
the model-level parity with transformers' Gemma 2 is in test_model_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weightsmith.models.attention import attend


def _by_definition(q, k, v, visible, scale, cap):
    """Each query head against its key/value head (head h reads kv head h // group)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        s = torch.einsum("btd,bsd->bts", q[:, h], k[:, h // group]) * scale
        s = cap * torch.tanh(s / cap)
        s = s.masked_fill(~visible[:, 0], float("-inf"))
        out[:, h] = torch.softmax(s, dim=-1) @ v[:, h // group]
    return out


def _inputs(b, h, n_kv, t, s, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=g) * 3).requires_grad_(True)  # scores of a few units: tanh bends
        for shape in ((b, h, t, d), (b, n_kv, s, d), (b, n_kv, s, d))
    ]


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("kind", ["causal", "mask", "all keys"])
def test_capped_attention_is_its_definition_with_gradients(n_kv, kind):
    b, t, s = 2, 5, 5 if kind == "causal" else 9
    q, k, v = _inputs(b, 4, n_kv, t, s)
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    if kind == "mask":  # per row: a cache of s keys, the first two of row 1 not its own (padding)
        mask = causal.expand(b, 1, t, s).clone()
        mask[1, :, :, :2] = False
    else:
        mask = None
    visible = causal.expand(b, 1, t, s) if kind == "causal" else mask
    if visible is None:
        visible = torch.ones(b, 1, t, s, dtype=torch.bool)
    got = attend(q, k, v, mask=mask, is_causal=kind == "causal", scale=0.7, softcap=2.0)
    want = _by_definition(q, k, v, visible, 0.7, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(got)
    for a, w in zip(
        torch.autograd.grad((got * upstream).sum(), (q, k, v)),
        torch.autograd.grad((want * upstream).sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    # The cap matters at these scores: the uncapped attention is another result.
    uncapped = attend(q, k, v, mask=mask, is_causal=kind == "causal", scale=0.7)
    assert (uncapped - want).abs().max() > 0.1


def test_without_a_cap_it_is_sdpa():
    q, k, v = _inputs(1, 4, 2, 6, 6)
    got = attend(q, k, v, is_causal=True, scale=0.5)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    assert torch.equal(got, want)


def test_a_query_that_sees_no_key_stays_finite():
    """A padding slot that sees nothing gets finite outputs, so no NaN reaches later layers' keys."""
    q, k, v = _inputs(1, 2, 2, 3, 4)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    out = attend(q, k, v, mask=mask, softcap=5.0)
    assert torch.isfinite(out).all()
    visible = mask.clone()
    visible[0, 0, 0] = True  # the blind row's value is not compared
    torch.testing.assert_close(out[:, :, 1:], _by_definition(q, k, v, visible, 8**-0.5, 5.0)[:, :, 1:])


def test_bf16_follows_the_reference_order():
    """bf16 inputs: scores and cap in bf16, softmax in fp32 (transformers' eager Gemma 2), so the
    result is close to the fp32 one at bf16's precision and comes back in bf16."""
    q, k, v = (x.detach() for x in _inputs(2, 4, 2, 7, 7))
    exact = attend(q, k, v, is_causal=True, softcap=3.0)
    half = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True, softcap=3.0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), exact, rtol=0.05, atol=0.05)
