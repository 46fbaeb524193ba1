"""LoRA on a mixture of experts as PEFT has it on transformers 5: `target_parameters`.

transformers 5 keeps a MoE layer's experts as two 3-D parameters, `mlp.experts.gate_up_proj`
(E, 2I, h: each expert's gate rows, then its up rows) and `mlp.experts.down_proj` (E, h, I),
and its router as a module holding `mlp.gate.weight` (E, h). PEFT adapts them through
`target_parameters` (its all-linear adds all three on such a model) with one LoRA per expert.
For a parameter of E experts, rank r, the file holds

    lora_A.weight  (E*r, in)    rows e*r .. e*r + r - 1: expert e's A_e
    lora_B.weight  (out, r*E)   column k*E + e: column k of expert e's B_e

and expert e computes with W_e + s B_e A_e (s = alpha / r, or alpha / sqrt(r) with rsLoRA, with
rank and alpha looked up by the parameter's name, e.g. `model.layers.0.mlp.experts.gate_up_proj`,
in the rank/alpha patterns). A 2-D parameter is one expert: a plain LoRA on that linear.
Several parameters of one module nest, so the file calls the first-defined one (gate_up_proj)
`experts.base_layer` and the outermost (down_proj) `experts`.

The model keeps one module per expert projection under the checkpoint's names (models/model.py),
and Mixtral's layer under `block_sparse_moe` where transformers 5 says `mlp`. So:

- reading (`unfuse_parameters`): expert e's gate and up modules each get A_e and their rows of
  B_e (exactly the same delta, as for Phi-3's fused projections in fused.py); down gets A_e, B_e.
- writing (`fuse_parameters`): every LoRA inside a MoE layer (experts and router) is written as
  `target_parameters`: each expert's parts stacked as in fused.py (`stack_loras`), padded with
  zero rows to one rank and laid out as above, with rank/alpha patterns wherever that rank or
  scale differs from what the config gives, so PEFT computes the same delta.

Not here: the layers and targeting (layers.py), the files (files.py).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.lora.fused import AdapterTensors, stack_loras
from weightsmith.lora_config import KEY_PREFIX, LoraConfig
from weightsmith.models.model import SparseMoE

log = logging.getLogger(__name__)

#: transformers 5's names for a MoE layer's parameters, as `target_parameters` suffixes, in the
#: order PEFT writes them (its all-linear on a MoE model selects all three).
MOE_PARAMETERS = ("gate_up_proj", "down_proj", "gate.weight")


@dataclass(frozen=True)
class ParamTarget:
    """One transformers-5 parameter and the modules of ours that hold it."""

    key: str  #: its name: model.layers.1.mlp.experts.gate_up_proj
    module: str  #: the module holding it, as a PEFT file names it before nesting
    experts: tuple[tuple[str, ...], ...]  #: per expert, our modules stacked by rows (2-D: one)
    moe: bool  #: inside a MoE layer (saved as target_parameters)
    #: gpt-oss's gate_up_proj: the parts' rows alternate (gate 0, up 0, gate 1, ...), not stacked.
    interleaved: bool = False


def parameter_targets(model: nn.Module) -> dict[str, ParamTarget]:
    """Every parameter `target_parameters` can name, by its transformers-5 name, in model order."""
    out: dict[str, ParamTarget] = {}
    _walk(model, "", out)
    return out


def _walk(module: nn.Module, prefix: str, out: dict[str, ParamTarget]) -> None:
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, SparseMoE):
            _add_moe(child, name, out)
        elif isinstance(getattr(child, "in_features", None), int):  # a linear, or a LoRA on one
            out[f"{name}.weight"] = ParamTarget(f"{name}.weight", name, ((name,),), False)
        else:
            _walk(child, name, out)


def _add_moe(moe: SparseMoE, name: str, out: dict[str, ParamTarget]) -> None:
    hf = f"{name.rsplit('.', 1)[0]}.mlp"  # Mixtral's block_sparse_moe is `mlp` in transformers 5
    gate, up, down = moe.experts[0].names
    n = len(moe.experts)
    mixed = moe.router_name == "router"  # gpt-oss
    for key, parts in (("gate_up_proj", (gate, up)), ("down_proj", (down,))):
        experts = tuple(tuple(f"{name}.experts.{e}.{p}" for p in parts) for e in range(n))
        target = ParamTarget(f"{hf}.experts.{key}", f"{hf}.experts", experts, True, mixed and len(parts) == 2)
        out[f"{hf}.experts.{key}"] = target
    r = moe.router_name
    out[f"{hf}.{r}.weight"] = ParamTarget(f"{hf}.{r}.weight", f"{hf}.{r}", ((f"{name}.{r}",),), True)


def select_parameters(
    model: nn.Module, cfg: LoraConfig, source: str = "LoraConfig"
) -> dict[str, ParamTarget]:
    """The parameters `cfg.target_parameters` names (PEFT's rule: the full name or a dotted suffix)."""
    if not cfg.target_parameters:
        return {}
    targets = parameter_targets(model)
    hit: set[str] = set()
    for entry in cfg.target_parameters:
        found = [k for k in targets if k == entry or k.endswith(f".{entry}")]
        if not found:
            names = sorted({".".join(k.split(".")[-2:]) for k in targets})
            raise ConfigError(
                f"{source}: target_parameters entry {entry!r} names no parameter of this model; "
                f"choose from {names}"
            )
        hit.update(found)
    return {k: t for k, t in targets.items() if k in hit}


def parameter_modules(model: nn.Module, cfg: LoraConfig, source: str = "LoraConfig") -> dict[str, str]:
    """Our module -> the parameter it is adapted through, for the modules `cfg.target_parameters`
    selects; their rank and alpha are looked up by that parameter's name, as PEFT does."""
    selected = select_parameters(model, cfg, source)
    return {m: t.key for t in selected.values() for parts in t.experts for m in parts}


def _file_modules(selected: dict[str, ParamTarget]) -> dict[str, str]:
    """Parameter -> its module's name in a PEFT file: the wrappers of one module nest in the
    order its parameters are defined, the first innermost (`experts.base_layer`)."""
    by_module: dict[str, list[str]] = {}
    for key, t in selected.items():
        by_module.setdefault(t.module, []).append(key)
    return {
        key: module + ".base_layer" * (len(keys) - 1 - i)
        for module, keys in by_module.items()
        for i, key in enumerate(keys)
    }


#: Per module of ours: (rank, scale) of the LoRA `unfuse_parameters` gives it.
Ranks = dict[str, tuple[int, float]]


def unfuse_parameters(
    model: nn.Module, cfg: LoraConfig, tensors: AdapterTensors, path: Path
) -> tuple[AdapterTensors, Ranks]:
    """The file's tensors for `cfg.target_parameters` as LoRAs on our modules (the rest unchanged),
    and each such module's rank and scale."""
    selected = select_parameters(model, cfg, str(path.with_name("adapter_config.json")))
    out = dict(tensors)
    ranks: Ranks = {}
    for key, module in _file_modules(selected).items():
        target, r = selected[key], cfg.rank_for(key)
        rows = [model.get_submodule(m).out_features for m in target.experts[0]]
        n = len(target.experts)
        n_in = model.get_submodule(target.experts[0][0]).in_features
        shapes = {"lora_A": (n * r, n_in), "lora_B": (sum(rows), r * n)}
        got = {part: _take(out, module, part, shape, key, path) for part, shape in shapes.items()}
        a = got["lora_A"][1].reshape(n, r, -1)  # (E, r, in)
        b = got["lora_B"][1].reshape(sum(rows), r, n)  # (out, r, E)
        if target.interleaved:  # gpt-oss: gate rows first, then up rows
            b = torch.cat((b[0::2], b[1::2]))
        for e, parts in enumerate(target.experts):
            for m, (a_m, b_m) in zip(parts, _split_expert(a[e], b[:, :, e], rows), strict=True):
                out[(m, "lora_A")], out[(m, "lora_B")] = (got["lora_A"][0], a_m), (got["lora_B"][0], b_m)
                ranks[m] = (a_m.shape[0], cfg.scale_for(key))
    return out, ranks


def _take(
    tensors: AdapterTensors, module: str, part: str, shape: tuple[int, int], key: str, path: Path
) -> tuple[str, torch.Tensor]:
    if (module, part) not in tensors:
        raise CheckpointError(
            f"{path}: no tensor {KEY_PREFIX}{module}.{part}.weight for {key}, which target_parameters "
            "selects; the adapter file is incomplete or for another base model"
        )
    file_key, t = tensors.pop((module, part))
    if tuple(t.shape) != shape:
        raise CheckpointError(
            f"{path}: tensor {file_key!r} has shape {tuple(t.shape)}, expected {shape} for {key} (from "
            "adapter_config.json's rank and the model's experts); is this adapter for another base model?"
        )
    return file_key, t


def _split_expert(
    a: torch.Tensor, b: torch.Tensor, rows: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One expert's (A, B) as a LoRA per part (B's rows for that part). Where B is block-diagonal
    with equal blocks (what `fuse_parameters` writes for parts trained apart) each part gets its
    own block, so a saved adapter reloads with the ranks it was trained with; else each part
    gets all of A."""
    pieces = b.split(rows)
    k, n = a.shape[0] // len(rows), len(rows)
    if n > 1 and a.shape[0] % n == 0:
        blocks = [slice(i * k, (i + 1) * k) for i in range(n)]
        off = [
            torch.cat([p[:, : blocks[i].start], p[:, blocks[i].stop :]], dim=1) for i, p in enumerate(pieces)
        ]
        if all(not o.any() for o in off):
            return [(a[blocks[i]].clone(), p[:, blocks[i]].contiguous()) for i, p in enumerate(pieces)]
    return [(a.clone(), p.contiguous()) for p in pieces]


def fuse_parameters(
    model: nn.Module, layers: dict[str, nn.Module], name: str, state: dict[str, torch.Tensor], peft: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's file tensors and adapter_config.json with every LoRA inside a MoE layer
    written as PEFT's `target_parameters`; `layers` are the LoRA layers holding adapter `name`."""
    targets = {
        k: t
        for k, t in parameter_targets(model).items()
        if t.moe and any(m in layers for p in t.experts for m in p)
    }
    if not targets:
        return state, peft
    inside = {m for t in targets.values() for parts in t.experts for m in parts}
    out = {k: v for k, v in state.items() if k[len(KEY_PREFIX) : -len(".lora_A.weight")] not in inside}
    wanted: dict[str, tuple[int, float]] = {}
    for key, module in _file_modules(targets).items():
        a, b, r, s = _pack(model, targets[key], layers, name, state)
        out[f"{KEY_PREFIX}{module}.lora_A.weight"] = a
        out[f"{KEY_PREFIX}{module}.lora_B.weight"] = b
        wanted[key] = (r, s)
    outside = [n for n in layers if n not in inside]
    return out, _parameters_peft_dict(model, peft, wanted, outside)


def _pack(
    model: nn.Module,
    target: ParamTarget,
    layers: dict[str, nn.Module],
    name: str,
    state: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(lora_A, lora_B, rank, scale) of one parameter in PEFT's per-expert layout."""
    rows = [model.get_submodule(m).out_features for m in target.experts[0]]
    n_in = model.get_submodule(target.experts[0][0]).in_features
    per_expert = []
    for parts in target.experts:
        got = {
            i: (state[f"{KEY_PREFIX}{m}.lora_A.weight"], state[f"{KEY_PREFIX}{m}.lora_B.weight"],
                layers[m].scaling[name])
            for i, m in enumerate(parts) if m in layers
        }  # fmt: skip
        per_expert.append(stack_loras(rows, got) if got else None)
    present = [p for p in per_expert if p is not None]
    r, s = max(p[2] for p in present), present[0][3]
    ref = present[0][0]
    a_list, b_list = [], []
    for p in per_expert:
        if p is None:  # an expert without an adapter: a zero delta
            a_list.append(ref.new_zeros(r, n_in))
            b_list.append(ref.new_zeros(sum(rows), r))
            continue
        a, b, ri, si = p
        a_list.append(F.pad(a, (0, 0, 0, r - ri)))  # zero rows of A, zero columns of B: same delta
        b_list.append(F.pad(b if si == s else b * (si / s), (0, r - ri)))
    b_all = torch.stack(b_list, dim=-1)  # (out, r, E)
    if target.interleaved:  # gpt-oss: gate row j, then up row j
        b_all = torch.stack(b_all.split(rows), dim=1).flatten(0, 1)
    return torch.cat(a_list), b_all.reshape(b_all.shape[0], -1), r, s


def _parameters_peft_dict(
    model: nn.Module, peft: dict[str, Any], wanted: dict[str, tuple[int, float]], outside: list[str]
) -> dict[str, Any]:
    """adapter_config.json naming the MoE parameters in `target_parameters` (a suffix where every
    MoE layer has it, else each name), the modules outside MoE layers in `target_modules`, and,
    first in the rank/alpha patterns (PEFT takes the first match), each parameter's own rank and
    alpha where the config's would differ."""
    peft = dict(peft)
    every = [k for k, t in parameter_targets(model).items() if t.moe]
    names: list[str] = []
    groups: dict[str, list[str]] = {}
    for suffix in MOE_PARAMETERS:
        mine = [k for k in wanted if k.endswith(f".{suffix}")]
        if mine:
            full = len(mine) == len([k for k in every if k.endswith(f".{suffix}")])
            names += [suffix] if full else mine
            groups[suffix] = mine
    peft["target_parameters"] = sorted(names)
    modules = peft["target_modules"]
    if isinstance(modules, list):
        peft["target_modules"] = sorted(
            t for t in modules if any(n == t or n.endswith(f".{t}") for n in outside)
        )
    else:  # a regex: name the modules it selected instead
        peft["target_modules"] = sorted(outside)
    kept = {
        field: {k: v for k, v in peft[field].items() if any(re.match(rf"(.*\.)?({k})$", n) for n in outside)}
        for field in ("rank_pattern", "alpha_pattern")
    }
    theirs = LoraConfig(
        r=peft["r"], alpha=peft["lora_alpha"], use_rslora=peft["use_rslora"],
        rank_pattern=kept["rank_pattern"], alpha_pattern=kept["alpha_pattern"],
    )  # fmt: skip
    differ = {
        k: (r, s)
        for k, (r, s) in wanted.items()
        if r != theirs.rank_for(k) or not math.isclose(s, theirs.scale_for(k), rel_tol=1e-12)
    }
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for suffix, keys in groups.items():
        values = {differ[k] for k in keys if k in differ}
        if not values:
            continue
        shared = len(values) == 1 and all(k in differ for k in keys)
        for pattern, (r, s) in ([(rf".*\.{re.escape(suffix)}", values.pop())] if shared else
                                [(re.escape(k), differ[k]) for k in keys if k in differ]):  # fmt: skip
            alpha = s * (math.sqrt(r) if peft["use_rslora"] else r)
            ranks[pattern], alphas[pattern] = r, int(alpha) if float(alpha).is_integer() else alpha
    peft["rank_pattern"] = {**ranks, **kept["rank_pattern"]}
    peft["alpha_pattern"] = {**alphas, **kept["alpha_pattern"]}
    if peft["lora_dropout"]:
        log.warning(
            "adapter_config.json: lora_dropout written as 0 (was %s): PEFT's LoRA on expert parameters has no "
            "dropout, and dropout does not change what a trained adapter computes",
            peft["lora_dropout"],
        )
        peft["lora_dropout"] = 0.0
    return peft
