"""Names of checkpoint tensors that stack several of the model's projections (Phi-3).

Phi-3 checkpoints store q, k and v as one `self_attn.qkv_proj` and gate and up as one
`mlp.gate_up_proj`, stacked by output rows in that order. The model keeps separate
projections (design principle 4), so these helpers map names both ways: the loader splits
a fused tensor into its parts' rows (checkpoint/build.py), the saver stacks the parts back
(checkpoint/save.py), and PEFT adapter files keep the checkpoint's names (lora/fused.py).
Which tensors are fused is `Family.fused` in config.py.

Not here: any tensor arithmetic beyond stacking rows.
"""

from __future__ import annotations

import torch

from weightsmith.models.config import ModelConfig


def split_name(cfg: ModelConfig, name: str) -> list[str] | None:
    """Our names of the parts of fused checkpoint name `name` (a module, or a module's
    `.weight`/`.bias`), or None when `name` is not fused: `model.layers.0.mlp.gate_up_proj.weight`
    -> [`model.layers.0.mlp.gate_proj.weight`, `model.layers.0.mlp.up_proj.weight`]."""
    for fused, parts in cfg.family.fused:
        for suffix in ("", ".weight", ".bias"):
            stem = f".{fused}{suffix}"
            if name.endswith(stem):
                prefix = name[: -len(stem)]
                return [f"{prefix}.{p}{suffix}" for p in parts]
    return None


def fused_name(cfg: ModelConfig, name: str) -> tuple[str, int, int] | None:
    """(checkpoint name, index of this part, number of parts) for one of our names that the
    checkpoint stores fused, or None: `...self_attn.k_proj.weight` -> (`...qkv_proj.weight`, 1, 3)."""
    for fused, parts in cfg.family.fused:
        for i, part in enumerate(parts):
            for suffix in ("", ".weight", ".bias"):
                stem = f".{part}{suffix}"
                if name.endswith(stem):
                    return f"{name[: -len(stem)]}.{fused}{suffix}", i, len(parts)
    return None


def fuse_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the checkpoint's names: each group of parts stacked by rows, in order,
    at the position of its first part (so shards and files keep the model's order)."""
    if not cfg.family.fused:
        return state
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[torch.Tensor | None]] = {}
    for name, t in state.items():
        hit = fused_name(cfg, name)
        if hit is None:
            out[name] = t
            continue
        fused, i, n = hit
        parts = groups.setdefault(fused, [None] * n)
        parts[i] = t
        out.setdefault(fused, t)  # a placeholder that keeps the order
    for fused, parts in groups.items():
        missing = [i for i, p in enumerate(parts) if p is None]
        assert not missing, f"{fused}: parts {missing} missing from the state dict"
        out[fused] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out
