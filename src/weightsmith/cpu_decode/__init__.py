"""Faster decoding on the CPU, as an explicit, reversible swap (see plan.py).

`prepare_cpu_decode(model)` lays a model out for the PyTorch decode path (layout.py) and
returns a `CpuDecodePlan` that also holds the fused C decode step (fused.py); `undo()`
puts the model back. The `Engine` prepares and owns one for every CPU model.

Not here: the kernels and their build (weightsmith.quant.cpu_kernels, quant/*.c), which
the int4/int8 layers call too; anything for GPUs.
"""

from weightsmith.cpu_decode.plan import CpuDecodePlan, prepare_cpu_decode

__all__ = ["CpuDecodePlan", "prepare_cpu_decode"]
