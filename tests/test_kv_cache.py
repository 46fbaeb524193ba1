"""KVCache owns its rows' lengths: the methods that change them, read-only `lengths`, views
that share storage and lengths, copies, and refusals past the end."""

from __future__ import annotations

import pytest
import torch

from weightsmith.kv_cache import KVCache


def cache(rows: int = 4, max_len: int = 8) -> KVCache:
    return KVCache(2, rows, max_len, 1, 2, dtype=torch.float32, device="cpu")


def test_lengths_change_only_through_methods():
    c = cache()
    assert c.lengths == (0, 0, 0, 0)
    c.set_lengths(1, [3, 5])
    assert c.lengths == (0, 3, 5, 0) and c.length(2) == 5 and c.room(2) == 3
    c.advance(3)  # a decode step over rows 0..2
    assert c.lengths == (1, 4, 6, 0)
    c.advance(2, by=2)
    assert c.lengths == (3, 6, 6, 0)
    c.set_length(1, 2)  # a rollback
    assert c.lengths == (3, 2, 6, 0)
    c.reset(0)
    assert c.lengths == (0, 2, 6, 0)
    c.reset()
    assert c.lengths == (0, 0, 0, 0)
    with pytest.raises(AttributeError):
        c.lengths = [1, 1, 1, 1]  # no outside writes
    with pytest.raises(TypeError):
        c.lengths[0] = 1  # type: ignore[index]


def test_a_full_row_is_refused_before_its_length_changes():
    c = cache(rows=2, max_len=4)
    c.set_lengths(0, [4, 1])
    with pytest.raises(ValueError, match="KV cache is full"):
        c.advance(2)
    assert c.lengths == (4, 1)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="0..4"):
            c.set_length(1, bad)
    assert c.lengths == (4, 1)


def test_a_rows_view_shares_storage_and_lengths():
    c = cache()
    c.set_length(0, 2)
    view = c.rows(1, 2)
    assert view.lengths == (0, 0) and view.batch_size == 2
    view.set_lengths(0, [3, 1])
    view.advance(1)
    assert c.lengths == (2, 4, 1, 0) and view.lengths == (4, 1)
    view.k[0, 0, 0, 0, 0] = 7.0
    assert c.k[0, 1, 0, 0, 0] == 7.0  # the same storage
    view.reset()
    assert c.lengths == (2, 0, 0, 0)  # only the view's rows
    inner = view.rows(1, 1)  # a view of a view
    inner.set_length(0, 5)
    assert c.lengths == (2, 0, 5, 0)


def test_select_copies_rows_and_their_lengths():
    c = cache()
    c.k.normal_()
    c.set_lengths(0, [1, 2, 3, 4])
    picked = c.select([2, 0, 2])
    assert picked.batch_size == 3 and picked.lengths == (3, 1, 3)
    assert torch.equal(picked.k[:, 1], c.k[:, 0]) and torch.equal(picked.v[:, 2], c.v[:, 2])
    picked.k.zero_()
    picked.advance(3)
    assert c.k.abs().sum() > 0 and c.lengths == (1, 2, 3, 4)  # copies: the source is unchanged


def test_copy_row_copies_the_filled_part_and_the_length():
    a, b = cache(), cache()
    b.k.normal_()
    b.v.normal_()
    b.set_length(1, 3)
    a.copy_row(1, 2, source=b)
    assert a.lengths == (0, 0, 3, 0)
    assert torch.equal(a.k[:, 2, :, :3], b.k[:, 1, :, :3]) and a.k[:, 2, :, 3:].abs().sum() == 0
    a.copy_row(2, 0)  # within one cache (compacting the batch)
    assert a.lengths == (3, 0, 3, 0) and torch.equal(a.v[:, 0, :, :3], b.v[:, 1, :, :3])


def test_a_bf16_cache_stores_rounded_entries_and_returns_the_keys_dtype():
    """Under an fp32 model: both write paths (a prompt's slice, decode positions) store bf16, and
    attention gets the stored values back in fp32."""
    c = KVCache(1, 2, 8, 2, 4, dtype=torch.bfloat16, device="cpu")
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    keys, values = c.write(0, torch.arange(3).expand(2, 3), k, v, kv_len=3, start=0)
    assert keys.dtype == values.dtype == torch.float32 and c.k.dtype == torch.bfloat16
    assert torch.equal(keys, k.to(torch.bfloat16).float()) and torch.equal(
        values, v.to(torch.bfloat16).float()
    )
    assert not torch.equal(keys, k)  # rounded
    k1, v1 = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    keys, values = c.write(0, torch.tensor([[3], [5]]), k1, v1, kv_len=6)
    assert torch.equal(keys[0, :, 3], k1[0, :, 0].to(torch.bfloat16).float())
    assert torch.equal(values[1, :, 5], v1[1, :, 0].to(torch.bfloat16).float())
    assert (
        c.k.element_size() * 2 == KVCache(1, 2, 8, 2, 4, dtype=torch.float32, device="cpu").k.element_size()
    )


def test_an_int8_cache_stores_codes_and_scales_and_returns_the_entries():
    """Each entry (one head's head_dim values at one position) is its absmax / 127 times int8 codes:
    within half a step of the value; both write paths; views, copies and row copies carry the scales."""
    from weightsmith.kv_cache import quantize_entries

    c = KVCache(1, 3, 8, 2, 16, dtype=torch.int8, device="cpu")
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g) * 50
    keys, values = c.write(0, torch.arange(3).expand(2, 3), k, v, kv_len=3, start=0)
    assert keys.dtype == torch.float32 and c.k.dtype == torch.int8
    for x, got in ((k, keys), (v, values)):
        step = x.abs().amax(-1, keepdim=True) / 127
        assert ((got - x).abs() <= step / 2 + 1e-6 * step).all() and not torch.equal(got, x)
    assert torch.equal(c.k_scale[0, :2, :, :3], k.abs().amax(-1) / 127)
    k1 = torch.randn(2, 2, 1, 16, generator=g)
    keys, _ = c.write(0, torch.tensor([[3], [5]]), k1, k1, kv_len=6)
    codes, scale = quantize_entries(k1)
    assert torch.equal(c.k[0, 0, :, 3], codes[0, :, 0]) and torch.equal(c.k_scale[0, 1, :, 5], scale[1, :, 0])
    assert torch.equal(keys[1, :, 5], codes[1, :, 0].float() * scale[1, :, 0, None])
    zero, zero_scale = quantize_entries(torch.zeros(2, 16))
    assert zero.abs().sum() == 0 and zero_scale.abs().sum() == 0  # no division by a zero scale
    c.set_lengths(0, [4, 6])
    c.copy_row(1, 2)
    assert torch.equal(c.k[:, 2, :, :6], c.k[:, 1, :, :6]) and torch.equal(
        c.v_scale[:, 2, :, :6], c.v_scale[:, 1, :, :6]
    )
    view, picked = c.rows(1, 2), c.select([1])
    assert view.quantized and torch.equal(view.k_scale[:, 0], c.k_scale[:, 1])
    assert picked.quantized and torch.equal(picked.v_scale[:, 0, :, :6], c.v_scale[:, 1, :, :6])
    fp32 = KVCache(1, 3, 8, 2, 16, dtype=torch.float32, device="cpu")
    assert c.bytes_per_token * 64 == fp32.bytes_per_token * 20  # 16 codes + a 4-byte scale against 64 bytes
    with pytest.raises(ValueError, match="same kind"):
        fp32.copy_row(0, 0, source=c)
