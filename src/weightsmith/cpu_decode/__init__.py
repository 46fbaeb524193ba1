"""Faster decoding on the CPU, as an explicit, reversible swap (see plan.py).

`prepare_cpu_decode(model)` lays a model out for the PyTorch decode path (layout.py) and
returns a `CpuDecodePlan` that also holds the fused C decode step (fused.py); `undo()`
puts the model back. The `Engine` prepares and owns one for every CPU model.
"""

from weightsmith.cpu_decode.plan import CpuDecodePlan, prepare_cpu_decode

__all__ = ["CpuDecodePlan", "prepare_cpu_decode"]
