"""Merge forks of one base model into it, one tensor at a time (`weightsmith merge --fork ...`).

`merge_forks` walks the base model's parameters; for each, it asks every fork for its delta
(forks.py), sparsifies and combines them as the method says (methods.py), and writes
`base + scale * merged delta` (or, for SLERP, the interpolation of the two forks' weights) back
into the parameter in fp32 arithmetic, cast to the parameter's dtype. A tensor no fork changes
is left alone. DARE's random drops come from a generator seeded by `seed`, the fork's place
and the tensor's name, so a merge is reproducible and a tensor's mask does not depend on which
tensors came before it.

Not here: opening forks (forks.py), loading the base or saving the result (commands/train.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from weightsmith.errors import UsageError
from weightsmith.merging.forks import Fork
from weightsmith.merging.methods import METHODS, Method, breadcrumbs, combine, drop, slerp, stock, trim
from weightsmith.merging.settings import LayerSetting, value_for


@dataclass
class Recipe:
    """How to merge: the method and its parameters, each checked in `__post_init__`."""

    method: str
    forks: int
    weights: list[float] = field(default_factory=list)  # one per fork; [] = 1 each
    density: list[float] = field(default_factory=list)  # one, or one per fork; [] = 1 (keep all)
    t: list[LayerSetting] = field(default_factory=list)  # SLERP's position, per tensor
    scale: float = 1.0  # TIES' lambda: multiplies the merged delta
    gamma: float = 0.01  # breadcrumbs: the share of largest-magnitude entries dropped
    normalize: bool | None = None  # None: the method's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(
                f"--method {self.method}: not a merge method; choose one of {', '.join(METHODS)}"
            )
        low, high = self.spec.forks
        if self.forks < low or (high is not None and self.forks > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            raise UsageError(f"--method {self.method} merges {wanted} --fork, got {self.forks}")
        self.weights = self._per_fork("--weights", self.weights, 1.0)
        self.density = self._per_fork("--density", self.density, 1.0)
        if bad := [d for d in self.density if not 0 < d <= 1]:
            raise UsageError(f"--density {bad[0]:g}: the fraction of each delta kept, in (0, 1]")
        if self.spec.sparsify is None and any(d != 1 for d in self.density):
            raise UsageError(f"--density applies to ties, dare_* and breadcrumbs*, not {self.method}")
        if not 0 <= self.gamma < 1:
            raise UsageError(f"--gamma {self.gamma:g}: the share of largest entries dropped, in [0, 1)")
        if self.gamma != 0.01 and self.spec.sparsify != "outliers":
            raise UsageError(f"--gamma applies to breadcrumbs and breadcrumbs_ties, not {self.method}")
        if self.spec.kind == "stock" and (any(w != 1 for w in self.weights) or self.normalize is not None):
            raise UsageError(
                "--method model_stock weighs the forks by their agreement; no --weights or --normalize"
            )
        if self.spec.kind == "interpolate":
            if not self.t:
                raise UsageError("--method slerp needs --t (0: the first fork, 1: the second; e.g. --t 0.5)")
            if any(w != 1 for w in self.weights) or self.scale != 1 or self.normalize is not None:
                raise UsageError("--method slerp takes --t only (no --weights, --scale or --normalize)")
        elif self.t:
            raise UsageError(f"--t is SLERP's position; --method {self.method} takes --weights")

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def _per_fork(self, flag: str, values: Sequence[float], default: float) -> list[float]:
        if not values:
            return [default] * self.forks
        if len(values) == 1:
            return list(values) * self.forks
        if len(values) != self.forks:
            raise UsageError(
                f"{flag}: {len(values)} values for {self.forks} forks; give one, or one per --fork"
            )
        return [float(v) for v in values]


def merge_forks(
    model: nn.Module,
    forks: list[Fork],
    recipe: Recipe,
    on_tensor: Callable[[int, int], None] | None = None,
    keep: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, int]:
    """Merge `forks` into `model`'s parameters in place, or, with `keep`, hand each merged
    tensor to `keep(name, base, merged)` (fp32) and leave the model as it is;
    `on_tensor(done, total)` after each tensor. Returns how many tensors and values changed."""
    params = list(model.named_parameters())
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", 1)
    if recipe.spec.kind == "interpolate":  # every tensor has its t before any changes
        for name, _ in params:
            value_for(recipe.t, name, layers, "--t")
    changed = values = 0
    with torch.no_grad():
        for done, (name, p) in enumerate(params, 1):
            base = p.detach().float()
            deltas = [f.delta(name, base) for f in forks]
            if any(d is not None for d in deltas):
                merged = _merge_tensor(name, base, deltas, recipe, layers)
                if keep is not None:
                    keep(name, base, merged)
                else:
                    p.copy_(merged.to(p.dtype))
                changed += 1
                values += p.numel()
            if on_tensor is not None:
                on_tensor(done, len(params))
    return {"tensors": changed, "values": values}


def _merge_tensor(
    name: str, base: torch.Tensor, deltas: list[torch.Tensor | None], recipe: Recipe, layers: int
) -> torch.Tensor:
    method = recipe.spec
    if method.kind == "interpolate":
        t = value_for(recipe.t, name, layers, "--t")
        ends = [base if d is None else d.add_(base) for d in deltas]
        return slerp(ends[0], ends[1], t)
    if method.kind == "stock":
        full = torch.stack([torch.zeros_like(base) if d is None else d for d in deltas])
        return stock(full).mul_(recipe.scale).add_(base)
    stacked = base.new_zeros((len(deltas), *base.shape))  # (N, ...): one buffer, filled in place
    for i, (d, density) in enumerate(zip(deltas, recipe.density, strict=True)):
        if d is None:
            continue
        if method.sparsify == "magnitude":
            d = trim(d, density)
        elif method.sparsify == "random":
            d = drop(d, density, tensor_generator(recipe.seed, i, name))
        elif method.sparsify == "outliers":
            d = breadcrumbs(d, density, recipe.gamma)
        stacked[i] = d
    normalize = method.normalize if recipe.normalize is None else recipe.normalize
    mixed = combine(stacked, recipe.weights, elect=method.elect, normalize=normalize)
    return mixed.mul_(recipe.scale).add_(base)


def tensor_generator(seed: int, fork: int, name: str) -> torch.Generator:
    """DARE's generator for fork number `fork` (from 0) and tensor `name`."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{fork}:{name}".encode()))
