"""`Linear`: the model's projection layer, `nn.Linear` under the checkpoint's names.

A class of its own only so that code which swaps projections can tell the model's
projections from other linears (a LoRA adapter's own A and B matrices are plain
`nn.Linear`s): weight-only quantization, NF4, LoRA targeting and the CPU decode layout
(weightsmith.cpu_decode.layout, whose `SplitLinear` subclass keeps these names and
parameters) all look for it.

Not here: the CPU decode layout and its measurements (weightsmith.cpu_decode.layout),
quantized linears (weightsmith.quant).
"""

from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    """`nn.Linear` (same parameter names, shapes and math): y = x W^T + b."""
