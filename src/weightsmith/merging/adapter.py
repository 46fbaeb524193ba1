"""A merge written as a LoRA adapter instead of a model (`merge --fork ... --as-adapter`).

Each linear layer's merged delta (merged weight minus base weight) is factored by a truncated
SVD, `delta ~ B @ A` with `B = U[:, :r] sqrt(S[:r])` and `A = sqrt(S[:r]) Vh[:r]` (as
`mergekit-extract-lora` splits the singular values; PEFT's SVD combination puts them all in B,
which gives the same product), and saved as a PEFT adapter of rank r with alpha r (scaling 1). By Eckart-Young this is the closest rank-r delta in
the Frobenius norm. When every fork is a LoRA adapter and the method is linear or task
arithmetic, the merged delta of a layer has rank at most the sum of the forks' ranks there;
that sum (the largest over the layers) is the default rank, and the adapter is then the merge
itself, up to rounding. A full fork becomes an adapter the same way (LoRA extraction; give
`--rank`).

What a LoRA cannot hold is left out and reported: changes to norms, biases, embeddings and an
untied LM head (each with its relative size), and, per layer, the share of the delta's energy
(squared Frobenius norm) the rank kept.

Not here: the merge itself (merge.py), PEFT's file layout (weightsmith.lora).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from weightsmith.errors import UsageError
from weightsmith.files import atomic_dir
from weightsmith.lora import LoraConfig, apply_lora, is_linear_like, lora_layers, save_adapter, unload
from weightsmith.merging.forks import AdapterFork, Fork

ADAPTER = "merged"


def adapter_rank(forks: list[Fork], rank: int | None) -> int:
    """The adapter's rank: `rank`, or, for adapter forks only, the most any layer needs."""
    if rank is not None:
        return rank
    if not all(isinstance(f, AdapterFork) for f in forks):
        full = next(f.spec for f in forks if not isinstance(f, AdapterFork))
        raise UsageError(f"--as-adapter with a full fork ({full}) needs --rank R (the rank to keep, e.g. 16)")
    dora = next((f.spec for f in forks if isinstance(f, AdapterFork) and f.is_dora()), None)
    if dora is not None:  # g * (W + s B A) - W has the rank of W
        raise UsageError(
            f"--as-adapter with a DoRA fork ({dora}) needs --rank R (its change is not low-rank)"
        )
    needed: dict[str, int] = {}
    for f in forks:
        assert isinstance(f, AdapterFork)
        for name, layer in f.layers.items():
            needed[name] = needed.get(name, 0) + layer.lora_A[f.adapter].out_features
    return max(needed.values())  # exact for linear and task arithmetic; others approximate at this rank


@dataclass
class LowRank:
    """The merged deltas of a model's linears as rank-r factors, and what could not be kept."""

    model: nn.Module
    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    kept: dict[str, float] = field(default_factory=dict)  # module -> share of the delta's energy kept
    left_out: dict[str, float] = field(default_factory=dict)  # tensor -> |delta| / |base| dropped

    def __post_init__(self) -> None:
        if self.model.config.family.moe:
            raise UsageError(
                "--as-adapter writes adapters for dense models; a mixture of experts' merge is saved as a model "
                "(drop --as-adapter)"
            )
        self.linears = {
            f"{n}.weight": n
            for n, m in self.model.named_modules()
            if n.startswith("model.layers.") and is_linear_like(m)
        }

    def keep(self, name: str, base: torch.Tensor, merged: torch.Tensor) -> None:
        """`merge_forks`'s `keep`: factor a linear's delta, note any other tensor's."""
        delta = merged - base
        module = self.linears.get(name)
        if module is None:
            if delta.abs().max() > 0:
                self.left_out[name] = (delta.norm() / base.norm().clamp_min(1e-12)).item()
            return
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
        r = min(self.rank, s.numel())
        b = torch.zeros(delta.shape[0], self.rank, dtype=delta.dtype)
        a = torch.zeros(self.rank, delta.shape[1], dtype=delta.dtype)
        root = s[:r].sqrt()  # the singular values split evenly: A and B of one scale, to train on
        b[:, :r], a[:r] = u[:, :r] * root, root[:, None] * vh[:r]
        self.factors[module] = (a, b)
        energy = s.square().sum().item()
        self.kept[module] = s[:r].square().sum().item() / energy if energy > 0 else 1.0

    def save(self, out: Path, base_model: str) -> Path:
        """Write the factors as a PEFT adapter folder of rank r, alpha r."""
        if not self.factors:
            raise UsageError(
                "the forks change no linear layer; there is no adapter to write (merge to a model)"
            )
        leaves = _targets(list(self.factors), self.model.config.num_hidden_layers)
        cfg = LoraConfig(r=self.rank, alpha=self.rank, target_modules=leaves)
        apply_lora(self.model, cfg, ADAPTER)
        with torch.no_grad():
            for module, layer in lora_layers(self.model).items():
                a, b = self.factors.get(module, (None, None))
                layer.lora_A[ADAPTER].weight.copy_(a if a is not None else 0.0)
                layer.lora_B[ADAPTER].weight.copy_(b if b is not None else 0.0)
        try:
            with atomic_dir(out) as tmp:  # the whole folder appears at once, or nothing does
                save_adapter(self.model, tmp, cfg, name=ADAPTER, base_model=base_model)
            return out
        finally:
            unload(self.model)

    def summary(self) -> dict[str, float | int]:
        shares = list(self.kept.values()) or [1.0]
        return {
            "rank": self.rank,
            "layers": len(self.factors),
            "energy_kept_min": round(min(shares), 6),
            "left_out_tensors": len(self.left_out),
            "left_out_max_relative": round(max(self.left_out.values(), default=0.0), 6),
        }


def _targets(modules: list[str], layers: int) -> list[str]:
    """target_modules for the adapted modules: their leaf names when every layer adapts the same
    ones (`q_proj`, ...), else the full module names."""
    by_layer: dict[str, set[str]] = {}
    for m in modules:
        prefix, _, leaf = m.partition(".layers.")[2].partition(".")
        by_layer.setdefault(prefix, set()).add(leaf)
    sets = list(by_layer.values())
    if len(by_layer) == layers and all(s == sets[0] for s in sets):
        return sorted({m.rsplit(".", 1)[-1] for m in modules}) if _unique_leaves(modules) else sorted(modules)
    return sorted(modules)


def _unique_leaves(modules: list[str]) -> bool:
    """Whether each leaf name (`q_proj`) stands for one position in a layer (not both
    `self_attn.x` and `mlp.x`)."""
    leaves: dict[str, str] = {}
    for m in modules:
        inner = m.partition(".layers.")[2].partition(".")[2]
        leaf = inner.rsplit(".", 1)[-1]
        if leaves.setdefault(leaf, inner) != inner:
            return False
    return True
