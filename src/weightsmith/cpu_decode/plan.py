"""`prepare_cpu_decode`: the CPU decode swaps for one model, owned, refreshed and undone as one.

Decoding on the CPU goes faster with two changes to a loaded model, both explicit and
reversible, like a LoRA adapter:

- the decode layout (layout.py): column-major weights, split and packed matmuls for
  the PyTorch path, swapped in with every parameter name, object and value kept, so
  `state_dict()` has the same keys and values before, during and after;
- the fused C step (fused.py), built on first use from the weights where they are.

`prepare_cpu_decode(model)` applies the layout and returns the `CpuDecodePlan` that owns
both; the `Engine` prepares one for a CPU model and keeps it. `plan.decode_step(fallback)`
is the step to decode with: it first `refresh`es the plan, which rebuilds the C step when
the model changed since it was built (an adapter applied or merged, a layer quantized,
weights moved) and lays out layers that are new. `plan.undo()` puts every module and weight
back as it was (row-major, original classes) and keeps only the C step, which reads either
layout.

Not here: the layout's modules and measurements (layout.py), the C step's struct and call
(fused.py), the kernels and their build (weightsmith.quant.cpu_kernels).
"""

from __future__ import annotations

import threading

import torch

from weightsmith.cpu_decode.fused import FusedDecode, FusedStep, Step, supports
from weightsmith.cpu_decode.layout import Swaps, lay_out
from weightsmith.models.model import CausalLM
from weightsmith.quant import cpu_kernels


class CpuDecodePlan:
    """The CPU decode layout applied to `model` and its fused C step (see the module doc)."""

    def __init__(self, model: CausalLM, *, splits: int, layout: bool, fuse_fp32: bool) -> None:
        self.model = model
        #: Chunks each split matmul cuts the input dimension into (one per thread).
        self.splits = splits
        #: Whether to lay weights out for the PyTorch decode path (False after `undo`).
        self.layout = layout
        #: Whether a model with no quantized projection takes the C step too (False leaves
        #: fp32-only models to the PyTorch path).
        self.fuse_fp32 = fuse_fp32
        self._swaps = Swaps()
        self._fused: FusedDecode | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Bring the plan in line with the model as it is now: lay out layers that are new (an
        adapter merged back, a module replaced) and drop a C step the model changed under."""
        with self._lock:
            if self.layout:
                lay_out(self.model, self.splits, self._swaps)
            if self._fused is not None and not self._fused.current():
                self._fused = None

    def fused(self) -> FusedDecode | None:
        """The C step for the model as it is now, or None where it does not apply: kernels off
        or not built, an architecture, dtype or layer it does not run, or an fp32-only model
        with `fuse_fp32` False."""
        if not cpu_kernels.enabled() or type(self.model) is not CausalLM or not supports(self.model):
            return None
        with self._lock:
            if self._fused is None or not self._fused.current():
                lib = cpu_kernels.library()
                self._fused = None if lib is None else FusedDecode(self.model, lib)
            fused = self._fused
        if fused is None or not fused.ok or not (self.fuse_fp32 or not fused.fp32_only()):
            return None
        return fused

    def decode_step(self, fallback: Step) -> Step:
        """The step to decode the model with now: the C step (which hands more rows than it
        takes to `fallback`), or `fallback` itself where the C step does not apply."""
        self.refresh()
        fused = self.fused()
        return fallback if fused is None else FusedStep(fused, fallback)

    def undo(self) -> None:
        """Every module and weight back as before `prepare_cpu_decode` (original classes, row-major
        weights, same objects and values); the C step stays available and reads them as they are."""
        with self._lock:
            self._swaps.undo()
            self.layout = False
            self._fused = None


def prepare_cpu_decode(
    model: CausalLM, *, splits: int | None = None, layout: bool = True, fuse_fp32: bool = True
) -> CpuDecodePlan:
    """Lay `model` out for decoding on the CPU and return the plan that owns the change.

    splits: chunks per split matmul (default: torch's thread count; 1 lays weights out
        column-major without splitting).
    layout: lay weights out for the PyTorch decode path (False: only the C step).
    fuse_fp32: let a model with only fp32 projections (no int4, int8 or bf16 one) take the C step too.
    """
    plan = CpuDecodePlan(model, splits=splits or torch.get_num_threads(), layout=layout, fuse_fp32=fuse_fp32)
    plan.refresh()
    return plan
