"""Edits at hook points: replace, add, ablate, project out, each optionally at some token
positions and (for per-head hook points) some heads.

Each is a small frozen dataclass called as `edit(value, hook_name) -> new value` (hooks.Edit):
the hook name tells it which axes are tokens and heads (TransformerLens's layouts, hooks.py).
Positions count within the forward pass being edited (negative from its end); with a KV
cache, a decode step's forward has one token.

Not here: hook points (hooks.py), directions and steering specs (directions.py, steering.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightsmith.inspect.hooks import InspectError

Index = int | Sequence[int] | None

#: Hook points whose values have a heads axis, and where it is: (B, H, T, S) or (B, T, H, D).
_HEADS_FIRST = ("attn.hook_pattern", "attn.hook_attn_scores")
_HEADS_SECOND = (
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_z",
)


def _axes(name: str) -> tuple[int, int | None]:
    """(token axis, heads axis or None) of the value at hook point `name`."""
    if name.endswith(_HEADS_FIRST):
        return 2, 1
    if name.endswith(_HEADS_SECOND):
        return 1, 2
    return 1, None


def _as_list(index: Index, size: int, what: str, name: str) -> list[int] | None:
    if index is None:
        return None
    items = [index] if isinstance(index, int) else list(index)
    for i in items:
        if not -size <= i < size:
            raise InspectError(f"{what} {i} is out of range at {name} (it has {size}); use 0..{size - 1}")
    return [i % size for i in items]


def selection(x: torch.Tensor, name: str, positions: Index, heads: Index) -> torch.Tensor | None:
    """A boolean mask broadcastable to x selecting `positions` and `heads`, or None for all of x."""
    tok_axis, head_axis = _axes(name)
    if heads is not None and head_axis is None:
        raise InspectError(f"{name} has no heads axis; give heads only for attention hook points")
    mask = None
    for index, axis, what in ((positions, tok_axis, "position"), (heads, head_axis, "head")):
        items = _as_list(index, x.shape[axis], what, name) if axis is not None else None
        if items is None:
            continue
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        sel = torch.zeros(shape, dtype=torch.bool, device=x.device)
        sel.view(-1)[items] = True
        mask = sel if mask is None else mask & sel
    return mask


def _where(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return new if mask is None else torch.where(mask, new, old)


@dataclass(frozen=True)
class Replace:
    """Set the value to `value` (broadcast to the hook point's shape) where selected."""

    value: torch.Tensor
    positions: Index = None
    heads: Index = None

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        new = self.value.to(device=x.device, dtype=x.dtype).expand_as(x)
        return _where(selection(x, name, self.positions, self.heads), new, x)


@dataclass(frozen=True)
class Add:
    """Add `scale * vector` (broadcast over the last axis: a residual-stream direction) where selected."""

    vector: torch.Tensor
    scale: float = 1.0
    positions: Index = None
    heads: Index = None

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        new = x + self.scale * self.vector.to(device=x.device, dtype=x.dtype)
        return _where(selection(x, name, self.positions, self.heads), new, x)


@dataclass(frozen=True)
class Ablate:
    """Zero the value where selected, or set it to `mean` (mean ablation) when given."""

    positions: Index = None
    heads: Index = None
    mean: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        new = torch.zeros_like(x) if self.mean is None else self.mean.to(x.device, x.dtype).expand_as(x)
        return _where(selection(x, name, self.positions, self.heads), new, x)


@dataclass(frozen=True)
class ProjectOut:
    """Remove the component along `direction` (last axis): x - (x . d) d with d = direction / |d|
    (directional ablation, Arditi et al. 2024, eq. 4)."""

    direction: torch.Tensor
    positions: Index = None

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        d = self.direction.to(device=x.device, dtype=torch.float32)
        if d.shape[-1] != x.shape[-1]:
            raise InspectError(f"the direction has width {d.shape[-1]} but {name} has {x.shape[-1]}")
        d = d / d.norm().clamp_min(1e-12)
        x32 = x.float()
        new = (x32 - (x32 @ d)[..., None] * d).to(x.dtype)
        return _where(selection(x, name, self.positions, None), new, x)
