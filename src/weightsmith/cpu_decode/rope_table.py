"""The RoPE cos/sin tables the fused C step reads, built once for a model rather than every step.

What it does: `RopeTable(model).upto(n)` returns (cos, sin), each (rows >= n, rotary_dim) fp32,
row p holding what `weightsmith.models.rope.rope_cos_sin` gives position p with the model's
inverse frequencies and attention scaling (any RoPE scaling the model has). The rows grow by
doubling as longer positions come; the tables are rebuilt when the model's `inv_freq` is
replaced or changed in place (`reset_rope`, a context-extension edit) or its `rope_scaling`
changes, so a step never reads stale angles. `RopeTable(model, "inv_freq_local")` holds Gemma
3's sliding layers' tables (their own base, no scaling), `"inv_freq_long"` LongRoPE's long set.

Not here: applying the rotation (the C step, quant/cpu_decode.c; the PyTorch model,
models/rope.py).
"""

from __future__ import annotations

import torch
from torch import nn

from weightsmith.models.rope import rope_cos_sin

#: Rows the first table holds (128 KB for head_dim 64).
FIRST_ROWS = 256


def _version(t: torch.Tensor) -> int:
    """How often `t` was changed in place (an inference tensor keeps no count: -1)."""
    return -1 if t.is_inference() else t._version


class RopeTable:
    """cos and sin for positions 0.. of `model`'s RoPE, fp32, rebuilt when its RoPE changes."""

    def __init__(self, model: nn.Module, buffer: str = "inv_freq") -> None:
        self.model = model
        #: The model's buffer of inverse frequencies these tables turn by.
        self.buffer = buffer
        #: (cos, sin), replaced as one (two threads may decode at once)
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._source: tuple[torch.Tensor, int, float] | None = None  # (inv_freq, its version, scaling)
        #: How many times the tables were computed (for tests).
        self.builds = 0

    def _current(self) -> bool:
        if self._source is None:
            return False
        inv_freq, version, scaling = self._source
        return (
            getattr(self.model, self.buffer) is inv_freq
            and _version(inv_freq) == version
            and self._scaling() == scaling
        )

    def _scaling(self) -> float:
        """The tables' attention factor: the model's, but 1 for Gemma 3's local tables (as the model's)."""
        return 1.0 if self.buffer == "inv_freq_local" else self.model.rope_scaling

    def upto(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (rows, head_dim) fp32 with rows >= n: row p is position p's."""
        tables = self.tables
        if tables is not None and tables[0].shape[0] >= n and self._current():
            return tables
        rows = max(n, FIRST_ROWS, 2 * tables[0].shape[0] if tables is not None and self._current() else 0)
        inv_freq, scaling = getattr(self.model, self.buffer), self._scaling()
        positions = torch.arange(rows, device=inv_freq.device)[None, :]  # (1, rows)
        with torch.no_grad():
            cos, sin = rope_cos_sin(inv_freq, positions, scaling, torch.float32)  # (1, 1, rows, D)
        tables = cos[0, 0].cpu().contiguous(), sin[0, 0].cpu().contiguous()
        self.tables, self._source = tables, (inv_freq, _version(inv_freq), scaling)
        self.builds += 1
        return tables
