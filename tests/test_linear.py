"""The CPU decode layout for linear layers: same results as nn.Linear, same names
and values in the state dict, and it steps aside when weights or modules change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith.models.linear import MAX_SPLIT_ROWS, Linear, pack_linears, use_decode_layout


def make_linear(i: int, o: int, bias: bool = False, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("splits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_split_path_equals_plain_linear(splits, rows, bias):
    lin = make_linear(384, 512, bias)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    x = torch.randn(rows, 1, 384)
    want = nn.functional.linear(x, lin.weight, lin.bias)
    use_decode_layout(lin, splits)
    assert lin.weight.stride() == (1, 512)  # column-major: a view of an (in, out) buffer
    assert lin.splits == splits
    got = lin(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_replaced_weight_is_noticed():
    lin = make_linear(256, 512)
    use_decode_layout(lin, 2)
    x = torch.randn(1, 256)
    lin(x)  # builds the cached plan
    new = torch.randn(512, 256)
    lin.weight = nn.Parameter(new)  # row-major again: plain path must be used, with the new values
    torch.testing.assert_close(lin(x), x @ new.t())


def test_in_place_update_is_seen():
    """Merging an adapter edits the weight in place; the split path must use the new values."""
    lin = make_linear(256, 512)
    use_decode_layout(lin, 2)
    x = torch.randn(1, 256)
    lin(x)
    with torch.no_grad():
        lin.weight.add_(1.0)
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight), rtol=1e-5, atol=1e-4)


def test_packed_projections_equal_separate_and_step_aside():
    q, k, v = make_linear(256, 256, seed=1), make_linear(256, 64, seed=2), make_linear(256, 64, seed=3)
    x = torch.randn(1, 1, 256)
    want = [m(x) for m in (q, k, v)]
    packed = pack_linears([q, k, v], 2)
    assert packed is not None and packed.applies(x, [q, k, v])
    got = packed(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
    # Individually, each still computes its own projection (views into the shared buffer).
    torch.testing.assert_close(k(x), want[1], rtol=1e-5, atol=1e-4)
    # A wrapper swapped in for one projection (as an adapter does) turns packing off.
    wrapped = nn.Sequential(k)
    assert not packed.applies(x, [q, wrapped, v])
    # Prefill-sized inputs (more rows than a decode batch) do not take the packed path.
    assert packed.applies(torch.randn(1, MAX_SPLIT_ROWS, 256), [q, k, v])
    assert not packed.applies(torch.randn(1, MAX_SPLIT_ROWS + 1, 256), [q, k, v])


def test_biased_projections_are_not_packed():
    q, k = make_linear(256, 256, bias=True), make_linear(256, 64, bias=True)
    assert pack_linears([q, k], 2) is None
