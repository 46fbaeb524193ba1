"""Linear layers with a CPU fast path for decoding.

Decoding multiplies one or a few rows by every weight matrix. That is bound by
memory bandwidth, and one BLAS GEMV call on a row-major weight uses one core at
about half the machine's bandwidth. `use_decode_layout` stores the large weights
column-major instead (each parameter becomes a transposed view of an (in, out)
buffer; names, shapes and values are unchanged, so state dicts, adapters and
saving see no difference) and packs projections that read the same input (q/k/v,
gate/up) side by side in one buffer. A decode-sized input is then multiplied as a
batched matmul over `k` contiguous chunks of the input dimension, which BLAS
spreads over `k` cores, and the partial products are summed.

Measured on a 2-core CPU (benchmarks/generate.py shows the end-to-end effect),
this roughly doubles decode GEMV throughput over row-major `F.linear`. Results
differ from the plain product only by summation order (~1e-6 relative).

Not here: quantized linears (a later issue) or anything for GPUs, where cuBLAS
already handles either layout well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Inputs with at most this many rows take the split path; longer prefills do not. Measured on
#: the default model (2 cores, one decode step): the split path beats `F.linear` on the
#: column-major weight at every batch size up to 32 rows (16 rows: 114 vs 131 ms; 4 rows: 67 vs
#: 134 ms) and loses by 48, which is what the server's continuous batching runs at.
MAX_SPLIT_ROWS = 32
#: Weights smaller than this are not worth re-laying out.
MIN_SPLIT_NUMEL = 1 << 16


class SplitMatmul:
    """y = x @ wt + bias for decode-sized x, with wt (in, out) cut into k row chunks."""

    def __init__(self, wt: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
        in_features, self.out = wt.shape
        self.k, self.chunk = k, in_features // k
        self.chunks = wt.view(k, self.chunk, self.out)  # (k, in/k, out), a view
        self.bias = bias

    @staticmethod
    def possible(wt: torch.Tensor, k: int) -> bool:
        return k > 1 and wt.device.type == "cpu" and wt.stride(1) == 1 and wt.shape[0] % k == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // (self.k * self.chunk)
        if rows == 1:
            xs = x.reshape(self.k, 1, self.chunk)
        else:
            xs = x.reshape(rows, self.k, self.chunk).transpose(0, 1)  # (k, rows, in/k)
        parts = torch.bmm(xs, self.chunks)  # (k, rows, out)
        # Two chunks (the 2-core case) add faster than a reduction kernel launches.
        y = parts[0] + parts[1] if self.k == 2 else parts.sum(0)
        y = y.view(*x.shape[:-1], self.out)
        return y if self.bias is None else y + self.bias


def _decode_sized(x: torch.Tensor, in_features: int) -> bool:
    return x.numel() <= MAX_SPLIT_ROWS * in_features and x.device.type == "cpu"


class Linear(nn.Linear):
    """`nn.Linear` (same parameter names and shapes) that takes the split path for
    decode-sized inputs once its weight is in the decode layout."""

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._split_plan() if self.splits > 1 and _decode_sized(x, self.in_features) else None
        if plan is None:
            return F.linear(x, self.weight, self.bias)
        return plan(x)

    def _split_plan(self) -> SplitMatmul | None:
        """Cached per (weight, bias) tensor, so a replaced parameter is noticed."""
        weight, bias = self._parameters["weight"], self._parameters.get("bias")
        cached = self.__dict__.get("_plan")
        if cached is not None and cached[0] is weight and cached[1] is bias:
            return cached[2]
        wt = weight.t()
        plan = SplitMatmul(wt, bias, self.splits) if SplitMatmul.possible(wt, self.splits) else None
        self.__dict__["_plan"] = (weight, bias, plan)
        return plan


class PackedLinears:
    """Bias-free projections of one input whose weights share a column-major buffer
    (q/k/v, gate/up): one split matmul, then split the output. Valid while the
    modules are still plain `Linear`s holding the packed parameters (an adapter
    swapped in, or a parameter replaced, turns it off)."""

    def __init__(self, modules: list[Linear], buffer: torch.Tensor, k: int) -> None:
        self.weights = [m._parameters["weight"] for m in modules]
        self.matmul = SplitMatmul(buffer, None, k)
        self.sizes = [m.out_features for m in modules]

    def applies(self, x: torch.Tensor, modules: list[nn.Module]) -> bool:
        if not _decode_sized(x, self.matmul.k * self.matmul.chunk):
            return False
        return all(
            type(m) is Linear and m._parameters["weight"] is w
            for m, w in zip(modules, self.weights, strict=True)
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.matmul(x).split(self.sizes, dim=-1)


def _column_major(module: Linear, storage: torch.Tensor | None = None) -> None:
    w = module.weight
    wt = storage if storage is not None else w.detach().t().contiguous()
    module.weight = nn.Parameter(wt.t(), requires_grad=w.requires_grad)


def pack_linears(modules: list[Linear], k: int) -> PackedLinears | None:
    """Move `modules`' weights side by side into one (in, sum(out)) buffer."""
    if k < 2 or any(m.bias is not None or m.weight.is_meta or m.weight.device.type != "cpu" for m in modules):
        return None
    buffer = torch.cat([m.weight.detach().t() for m in modules], dim=1).contiguous()  # (in, sum out)
    offset = 0
    for m in modules:
        _column_major(m, buffer[:, offset : offset + m.out_features])
        m.splits = k
        offset += m.out_features
    return PackedLinears(modules, buffer, k)


def use_decode_layout(model: nn.Module, splits: int) -> None:
    """Lay out every large CPU `Linear` of `model` column-major, split `splits` ways.
    Modules that call `pack_linears` for their projections (Attention, MLP) are
    expected to have done so first; this handles the rest."""
    for module in model.modules():
        if type(module) is not Linear or module.weight.is_meta or module.weight.device.type != "cpu":
            continue
        if module.weight.numel() < MIN_SPLIT_NUMEL:
            continue
        if module.weight.stride(0) != 1:
            _column_major(module)
        module.splits = splits
