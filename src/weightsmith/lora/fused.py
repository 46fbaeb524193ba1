"""PEFT adapters of models whose checkpoint fuses projections (Phi-3), under the checkpoint's names.

Phi-3's checkpoint, and so PEFT, has one `qkv_proj` and one `gate_up_proj` per layer; the
model has separate q/k/v and gate/up projections (models/fused.py). An adapter file keeps
Phi-3's names both ways:

- reading (`unfuse_adapter`): a LoRA on a fused projection, delta = s B A with B stacked by
  the parts' rows, is exactly one LoRA per part with the same A and s and that part's rows
  of B. Target modules and rank/alpha patterns naming `qkv_proj` are rewritten to the parts.
- writing (`fuse_adapter`): parts that share A and s (an adapter read from PEFT, untrained
  or merged) are written back as that A with B stacked; parts trained apart are written as
  one LoRA of rank sum(r_i): A stacked, B block-diagonal with each block scaled by s_i / s,
  and `rank_pattern`/`alpha_pattern` entries for that module so PEFT computes the same
  delta. A part without an adapter contributes zero rows. DoRA magnitudes split and stack by
  rows as B does (each output row's norm is its own).

Not here: the files themselves (files.py), the layers (layers.py).
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from weightsmith.errors import CheckpointError
from weightsmith.lora.dora import dense_weight
from weightsmith.lora_config import ALL_LINEAR, KEY_PREFIX, MAGNITUDE, LoraConfig
from weightsmith.models.fused import fused_name, split_name

#: {(module, "lora_A"|"lora_B"): (file key, tensor)}, as files.py reads an adapter file.
AdapterTensors = dict[tuple[str, str], tuple[str, torch.Tensor]]


def _suffixes(model: nn.Module) -> dict[str, list[str]]:
    """Fused module suffix -> its parts' suffixes: {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}."""
    return {
        fused.rsplit(".", 1)[-1]: [p.rsplit(".", 1)[-1] for p in parts]
        for fused, parts in model.config.family.fused
    }


def _rewrite_pattern(key: str, suffixes: dict[str, list[str]]) -> list[str]:
    """A rank/alpha pattern key for each part where the key names a fused module."""
    for fused, parts in suffixes.items():
        if fused in key:
            return [key.replace(fused, p) for p in parts]
    return [key]


def unfuse_adapter(
    model: nn.Module, cfg: LoraConfig, tensors: AdapterTensors
) -> tuple[LoraConfig, AdapterTensors]:
    """`cfg` and `tensors` of a PEFT adapter file under the model's own (split) names."""
    if not model.config.family.fused:
        return cfg, tensors
    suffixes = _suffixes(model)
    targets = cfg.target_modules
    if isinstance(targets, list):  # suffixes, or full names (PEFT's all-linear saves those)
        targets = [_part_name(t, p) for t in targets for p in suffixes.get(t.rpartition(".")[2], [None])]
    elif targets != ALL_LINEAR:
        for fused, parts in suffixes.items():
            targets = targets.replace(fused, f"(?:{'|'.join(parts)})")
    cfg = dataclasses.replace(
        cfg,
        target_modules=targets,
        rank_pattern={k: v for key, v in cfg.rank_pattern.items() for k in _rewrite_pattern(key, suffixes)},
        alpha_pattern={k: v for key, v in cfg.alpha_pattern.items() for k in _rewrite_pattern(key, suffixes)},
    )
    out: AdapterTensors = {}
    for (module, part), (key, t) in tensors.items():
        names = split_name(model.config, module)
        if names is None or any(_find(model, n) is None for n in names):
            out[(module, part)] = (key, t)  # checked (and refused if wrong) by the caller
            continue
        if part == "lora_A":
            out.update({(n, part): (key, t.clone()) for n in names})
            continue
        rows = [_find(model, n).out_features for n in names]  # type: ignore[union-attr]
        if t.shape[0] != sum(rows):
            raise CheckpointError(
                f"{key}: has {t.shape[0]} rows, expected {sum(rows)} for {module}; "
                "is this adapter for another base model?"
            )
        out.update({(n, part): (key, piece.clone()) for n, piece in zip(names, t.split(rows), strict=True)})
    return cfg, out


def _part_name(target: str, part: str | None) -> str:
    """A target naming a fused module (`qkv_proj`, `model.layers.1.self_attn.qkv_proj`) with the
    part's suffix instead; `target` itself where it names no fused module (part None)."""
    if part is None:
        return target
    head, dot, _ = target.rpartition(".")
    return f"{head}{dot}{part}"


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def fuse_adapter(
    model: nn.Module, cfg: LoraConfig, state: dict[str, torch.Tensor], peft: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's file tensors and adapter_config.json under the checkpoint's (fused) names."""
    if not model.config.family.fused:
        return state, peft
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    magnitudes: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        module, _, part = key[len(KEY_PREFIX) :].removesuffix(".weight").rpartition(".")
        hit = fused_name(model.config, module)
        if hit is None:
            out[key] = t
        elif part == "lora_A":
            fused, i, _ = hit
            b = state[f"{KEY_PREFIX}{module}.lora_B.weight"]
            groups.setdefault(fused, {})[i] = (t, b, cfg.scale_for(module))
        elif part == MAGNITUDE:
            magnitudes.setdefault(hit[0], {})[hit[1]] = t
    patterns: dict[str, tuple[int, float]] = {}
    for fused, parts in groups.items():
        a, b, rank, scale = _fuse_group(model, fused, parts)
        out[f"{KEY_PREFIX}{fused}.lora_A.weight"] = a
        out[f"{KEY_PREFIX}{fused}.lora_B.weight"] = b
        patterns[fused] = (rank, scale)
    for fused, parts in magnitudes.items():  # DoRA: the rows' magnitudes, stacked as B's rows
        out[f"{KEY_PREFIX}{fused}.{MAGNITUDE}"] = _fuse_magnitudes(model, fused, parts)
    modules = sorted({k[len(KEY_PREFIX) :].removesuffix(".weight").rpartition(".")[0] for k in out})
    return out, _fused_peft_dict(model, cfg, peft, patterns, modules)


def _fuse_group(
    model: nn.Module, fused: str, parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]]
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, rank, scale) of one fused module from its parts' (A_i, B_i, s_i)."""
    names = split_name(model.config, fused)
    assert names is not None
    return stack_loras([model.get_submodule(n).out_features for n in names], parts)


def _fuse_magnitudes(model: nn.Module, fused: str, parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """A fused module's DoRA magnitudes: each part's, stacked; a part without an adapter gets its
    base rows' norms (its delta is zero there, so m / ||W|| = 1 leaves those rows as they are)."""
    names = split_name(model.config, fused)
    assert names is not None
    return torch.cat(
        [
            parts[i] if i in parts else dense_weight(model.get_submodule(n)).detach().float().norm(dim=1)
            for i, n in enumerate(names)
        ]
    )


def stack_loras(
    rows: list[int], parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]]
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One LoRA (A, B, rank, scale) whose delta s B A stacks the deltas s_i B_i A_i of parts
    with `rows[i]` output rows each (part i absent: zero rows). Parts sharing A and s keep
    that A with B stacked; otherwise A is stacked and B block-diagonal, scaled by s_i / s."""
    first = parts[min(parts)]
    a0, s0 = first[0], first[2]
    shared = all(p[0].shape == a0.shape and torch.equal(p[0], a0) and p[2] == s0 for p in parts.values())
    if shared:  # one A: B stacked, zero rows for a part without an adapter
        r = a0.shape[0]
        blocks = [parts[i][1] if i in parts else a0.new_zeros(n, r) for i, n in enumerate(rows)]
        return a0, torch.cat(blocks), r, s0
    ranks = [p[0].shape[0] for p in parts.values()]
    a = torch.cat([parts[i][0] for i in sorted(parts)])  # (sum r, in)
    b = a0.new_zeros(sum(rows), sum(ranks))  # block-diagonal (sum out, sum r)
    col = 0
    for i in sorted(parts):
        _, bi, si = parts[i]
        start = sum(rows[:i])
        b[start : start + rows[i], col : col + bi.shape[1]] = bi * (si / s0)
        col += bi.shape[1]
    return a, b, sum(ranks), s0


def _fused_peft_dict(
    model: nn.Module, cfg: LoraConfig, peft: dict, patterns: dict[str, tuple[int, float]], modules: list[str]
) -> dict:
    """adapter_config.json with target modules under the checkpoint's names and, first in the
    rank/alpha patterns (PEFT takes the first match), each fused module's own rank and alpha."""
    peft = dict(peft)
    targets = peft["target_modules"]
    back = {p: f for f, ps in _suffixes(model).items() for p in ps}
    if isinstance(targets, list):  # suffixes or full names, each part's back to its fused module's
        peft["target_modules"] = sorted({_part_name(t, back.get(t.rpartition(".")[2])) for t in targets})
    else:  # a regex over our names: name the saved modules exactly instead
        peft["target_modules"] = "|".join(re.escape(m) for m in modules)
    ours = [n for n, _ in model.named_modules() if n.startswith("model.layers.")]
    kept = {}
    for field in ("rank_pattern", "alpha_pattern"):  # keys that only name parts would match nothing
        kept[field] = {k: v for k, v in peft[field].items() if not _only_parts(model, k, ours)}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for fused, (rank, scale) in patterns.items():
        theirs = LoraConfig(
            r=cfg.r, alpha=cfg.alpha, use_rslora=cfg.use_rslora,
            rank_pattern=kept["rank_pattern"], alpha_pattern=kept["alpha_pattern"],
        )  # fmt: skip
        if rank != theirs.rank_for(fused) or not math.isclose(scale, theirs.scale_for(fused)):
            ranks[fused] = rank
            alphas[fused] = scale * (math.sqrt(rank) if cfg.use_rslora else rank)
    peft["rank_pattern"] = {**ranks, **kept["rank_pattern"]}
    peft["alpha_pattern"] = {**alphas, **kept["alpha_pattern"]}
    return peft


def _only_parts(model: nn.Module, key: str, names: list[str]) -> bool:
    """Whether pattern `key` matches some of `names` (our module names) and all of them are
    parts of fused modules."""
    hits = [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
    return bool(hits) and all(fused_name(model.config, n) is not None for n in hits)
