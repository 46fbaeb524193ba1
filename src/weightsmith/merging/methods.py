"""How several fine-tunes of one base become one model: the merge methods, as tensor functions.

Every method but SLERP works on task vectors (Ilharco et al. 2022, "Editing models with task
arithmetic"): a fork's weights minus the base's, one tensor at a time. The merged tensor is
`base + scale * combine(deltas)`, where `combine` sums the forks' weighted deltas, optionally
after sparsifying each delta and electing a sign per entry:

| method | sparsify each delta | elect signs | divide by the weights |
|---|---|---|---|
| `linear` | - | - | all forks' weights (a weighted mean of the models) |
| `task_arithmetic` | - | - | no |
| `ties` (Yadav et al. 2023) | keep the top `density` by magnitude | yes | the agreeing forks' weights |
| `dare_linear` (Yu et al. 2023) | keep each entry with probability `density`, x 1/density | - | no |
| `dare_ties` | as `dare_linear` | yes | no |
| `breadcrumbs` (Davari & Belilovsky 2023) | drop the top `gamma` by magnitude, keep the next `density` | - | no |
| `breadcrumbs_ties` | as `breadcrumbs` | yes | no |

These are mergekit's definitions and defaults (its `normalize`, `lambda`, `density` and
`weight` parameters; tests/test_merging.py checks the deterministic methods against mergekit
itself), with one difference: DARE rescales the entries it keeps by 1/density, as the DARE
paper and PEFT do, where mergekit rescales the kept entries to the dropped tensor's L1 norm.
The sign election is TIES' "sum" rule: an entry's sign is that of the weighted deltas' sum, and
only forks whose delta has that sign (not zero) contribute to the entry.

`model_stock` (Jang et al. 2024, "Model Stock") moves the base towards the forks' mean by
`t = N cos / (1 + (N - 1) cos)`, where `cos` is the mean cosine between the forks' deltas of the
tensor (each tensor one vector, mergekit's default): forks that agree move it further.

`slerp` interpolates two models' weights along the great circle between them, treating each
tensor as one vector (mergekit's `slerp`), and falls back to a straight line when they are
almost parallel.

Not here: where the deltas come from (forks.py), which tensor gets which `t` (settings.py),
the walk over the model (merge.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: |cos| above which SLERP interpolates linearly (the angle is too small to divide by).
SLERP_PARALLEL = 0.9995


@dataclass(frozen=True)
class Method:
    """One merge method: how each delta is sparsified, whether signs are elected, and the
    defaults of `normalize` (divide by the weights) and of the weights."""

    name: str
    sparsify: str | None  # None, "magnitude" (TIES' trim), "random" (DARE's drop) or "outliers"
    elect: bool
    normalize: bool
    #: "task vectors" (base + combined deltas), "stock" (Model Stock) or "interpolate" (SLERP)
    kind: str = "task vectors"
    #: how many forks it takes at least and at most (None: any number)
    forks: tuple[int, int | None] = (1, None)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", None, elect=False, normalize=True),
        Method("task_arithmetic", None, elect=False, normalize=False),
        Method("ties", "magnitude", elect=True, normalize=True),
        Method("dare_linear", "random", elect=False, normalize=False),
        Method("dare_ties", "random", elect=True, normalize=False),
        Method("breadcrumbs", "outliers", elect=False, normalize=False),
        Method("breadcrumbs_ties", "outliers", elect=True, normalize=False),
        Method("model_stock", None, elect=False, normalize=False, kind="stock", forks=(2, None)),
        Method("slerp", None, elect=False, normalize=False, kind="interpolate", forks=(2, 2)),
    )
}


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the `density` fraction of entries with the largest magnitude (at least
    one), zero the rest."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, 0.0).view_as(delta)


def breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: drop the `gamma` fraction of entries with the largest magnitude
    (outliers) and keep the `density` fraction just below them, zero the rest (fewer outliers
    are dropped when density + gamma > 1)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    n = flat.numel()
    keep_n, top_n = int(density * n), int(gamma * n)
    low = max(0, n - keep_n - top_n)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs())[low : low + keep_n]] = True
    return torch.where(keep, flat, 0.0).view_as(delta)


def stock(deltas: torch.Tensor) -> torch.Tensor:
    """Model Stock's merged delta of (N, ...) deltas: t times their mean, t from their mean
    pairwise cosine (N cos / (1 + (N - 1) cos); 0 where that is singular)."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    norms = flat.norm(dim=1)
    cosines = [
        ((flat[i] @ flat[j]) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = torch.stack(cosines).mean()
    denominator = 1 + (n - 1) * cos
    t = 0.0 if denominator.abs() < 1e-6 else (n * cos / denominator).item()
    return deltas.mean(dim=0) * t


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop and rescale: keep each entry with probability `density` (a Bernoulli draw
    from `generator`) and multiply the kept ones by 1/density, so the expected delta is
    unchanged."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def elected(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over (N, ...) weighted deltas: a (N, ...) mask of the entries whose
    sign is that of the sum over the N forks (a zero sum elects +)."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == majority


def combine(deltas: torch.Tensor, weights: Sequence[float], *, elect: bool, normalize: bool) -> torch.Tensor:
    """The merged delta of (N, ...) deltas (already sparsified) with one weight per fork:
    the weighted sum, over the elected entries only if `elect`, divided by the weights that
    contributed (all of them, or each entry's agreeing ones) if `normalize`."""
    w = torch.tensor(list(weights), dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w  # (N, ...)
    if elect:
        mask = elected(weighted).to(deltas.dtype)
        total = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        total = weighted.sum(dim=0)
        divisor = w.sum()
        divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    return total / divisor if normalize else total


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1), the tensors taken as vectors:
    the angle comes from their directions, the result keeps their magnitudes' blend. Linear
    where they are (anti)parallel within SLERP_PARALLEL. fp32 arithmetic (fp64 for fp64)."""
    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(work), v1.reshape(-1).to(work)
    na, nb = a.norm().item(), b.norm().item()
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = min(max(torch.dot(a, b).item() / (na * nb), -1.0), 1.0)
    if abs(dot) > SLERP_PARALLEL:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.add(a * ca, b, alpha=cb).view(v0.shape).to(v0.dtype)
