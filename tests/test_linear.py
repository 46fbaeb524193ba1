"""The CPU decode layout for linear layers (cpu_decode/layout.py): same results as nn.Linear,
same names and values in the state dict, and it steps aside when weights or modules change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightsmith.cpu_decode import layout
from weightsmith.cpu_decode.layout import MAX_SPLIT_ROWS, SplitLinear, Swaps, lay_out, pack
from weightsmith.models.linear import Linear


def make_linear(i: int, o: int, bias: bool = False, seed: int = 0) -> Linear:
    """A frozen layer, as in inference (a weight that wants gradients takes F.linear)."""
    torch.manual_seed(seed)
    lin = Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin.requires_grad_(False)


@pytest.fixture
def split_calls(monkeypatch):
    """Rows of every split matmul taken."""
    calls: list[int] = []
    original = layout.SplitMatmul.__call__

    def call(self, x, bias=None):
        calls.append(x.numel() // (self.k * self.chunk))
        return original(self, x, bias)

    monkeypatch.setattr(layout.SplitMatmul, "__call__", call)
    return calls


@pytest.mark.parametrize("splits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_split_path_equals_plain_linear(splits, rows, bias, split_calls):
    lin = make_linear(384, 512, bias)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    x = torch.randn(rows, 1, 384)
    want = nn.functional.linear(x, lin.weight, lin.bias)
    lay_out(lin, splits, Swaps())
    assert type(lin) is SplitLinear
    assert lin.weight.stride() == (1, 512)  # column-major: a view of an (in, out) buffer
    assert lin.split is not None and lin.split.k == splits
    got = lin(x)
    assert split_calls == [rows]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_weight_that_wants_gradients_takes_the_plain_path(split_calls):
    lin = make_linear(256, 512).requires_grad_(True)
    lay_out(lin, 2, Swaps())
    x = torch.randn(1, 256)
    lin(x).sum().backward()  # the split matmul reads a detached view: it must not run here
    assert split_calls == [] and lin.weight.grad is not None
    with torch.no_grad():
        lin(x)
    assert split_calls == [1]


def test_replaced_weight_is_noticed(split_calls):
    lin = make_linear(256, 512)
    lay_out(lin, 2, Swaps())
    x = torch.randn(1, 256)
    lin(x)
    assert split_calls == [1]
    new = torch.randn(512, 256)
    lin.weight = nn.Parameter(new)  # row-major again: plain path must be used, with the new values
    torch.testing.assert_close(lin(x), x @ new.t())


def test_in_place_update_is_seen():
    """Merging an adapter edits the weight in place; the split path must use the new values."""
    lin = make_linear(256, 512)
    lay_out(lin, 2, Swaps())
    x = torch.randn(1, 256)
    lin(x)
    with torch.no_grad():
        lin.weight.add_(1.0)
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight), rtol=1e-5, atol=1e-4)


def test_a_moved_weight_is_split_anew(split_calls):
    """`Module.to` gives the weight new data (same Parameter): the split matmul follows it."""
    lin = make_linear(256, 512)
    lay_out(lin, 2, Swaps())
    x = torch.randn(1, 256)
    lin.to(torch.float64)
    with torch.no_grad():
        lin.weight.mul_(1.5)
    lin.to(torch.float32)
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight), rtol=1e-5, atol=1e-4)
    assert split_calls == [1] and lin.weight.stride(0) == 1


def test_packed_projections_equal_separate_and_step_aside():
    q, k, v = make_linear(256, 256, seed=1), make_linear(256, 64, seed=2), make_linear(256, 64, seed=3)
    x = torch.randn(1, 1, 256)
    want = [m(x) for m in (q, k, v)]
    packed = pack(Swaps(), [q, k, v], 2)
    assert packed is not None and packed.serves(x, (q, k, v))
    got = packed(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
    # Individually, each still computes its own projection (views into the shared buffer).
    torch.testing.assert_close(k(x), want[1], rtol=1e-5, atol=1e-4)
    # A wrapper swapped in for one projection (as an adapter does) turns packing off.
    wrapped = nn.Sequential(k)
    assert not packed.serves(x, (q, wrapped, v))
    # Prefill-sized inputs (more rows than a decode batch) do not take the packed path.
    assert packed.serves(torch.randn(1, MAX_SPLIT_ROWS, 256), (q, k, v))
    assert not packed.serves(torch.randn(1, MAX_SPLIT_ROWS + 1, 256), (q, k, v))
    # A weight replaced since (a new Parameter somewhere else) turns it off too.
    v.weight = nn.Parameter(v.weight.detach().clone())
    assert not packed.serves(x, (q, k, v))


def test_biased_projections_are_not_packed():
    q, k = make_linear(256, 256, bias=True), make_linear(256, 64, bias=True)
    assert pack(Swaps(), [q, k], 2) is None


def test_undo_restores_the_class_and_a_row_major_weight():
    lin = make_linear(256, 512, bias=True)
    weight, bias = lin.weight, lin.bias
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    swaps = Swaps()
    lay_out(lin, 2, swaps)
    assert type(lin) is SplitLinear and lin.weight is weight and not weight.is_contiguous()
    swaps.undo()
    assert type(lin) is Linear and not hasattr(lin, "split")
    assert lin.weight is weight and lin.bias is bias and weight.is_contiguous()
    assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items())
