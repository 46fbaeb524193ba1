"""LoRA layers: the wrapping `LoRALinear`, targeting, enable/disable/merge and per-row adapters.

A `LoRALinear` wraps a loaded linear (`base_layer`) and adds `scaling * B(A(x))` per
named adapter (Hu et al. 2021, "LoRA"; rsLoRA scaling alpha/sqrt(r) from Kalajdzievski
2023). Its parameters are named as PEFT names them in memory (`q_proj.lora_A.default.
weight`, `q_proj.base_layer.weight`), so PEFT's files line up by construction.
Targeting follows PEFT's rules (list entries match a module name or its dotted suffix, a
string is a full regex match, patterns match by regex suffix); "all-linear" is resolved
here to what PEFT on transformers 5 selects (`_selected`), and `target_parameters` (a MoE
layer's fused experts and router, as transformers 5 names them) through lora/experts.py.

`row_adapters` serves several adapters in one batch (continuous batching of requests for
different adapters): row i of the batch gets adapter i's delta, or none.

Not here: reading and writing adapter files (weightsmith.lora.files); the settings and
PEFT's config schema (lora_config.py); DoRA's magnitudes and norms (lora/dora.py); LoRA
biases, embedding or conv adapters, `modules_to_save`; the quantized base layer itself (weightsmith.quant.nf4; this module only
needs its `in_features`, `out_features` and forward); and training (weightsmith.train).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import ConfigError
from weightsmith.lora import dora
from weightsmith.lora.experts import parameter_modules
from weightsmith.lora_config import (
    ALL_LINEAR,
    LoraConfig,
)
from weightsmith.models.model import Expert, SparseMoE


class LoRADropout(nn.Dropout):
    """nn.Dropout (same p, same training/eval behaviour, same expected mask) whose CPU mask costs
    a third: torch's CPU bernoulli draws one double per element, while here each element takes
    16 bits of a 64-bit draw, kept where they are at least p * 2^16 (p rounded to 1/65536).
    Autograd keeps the boolean mask, as nn.Dropout does. Elsewhere (a GPU, inside torch.compile)
    it is nn.Dropout. A LoRA step on the CPU runs this on every adapted layer's input, where it
    cost more than the adapter's matmuls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        if self.p == 1:
            return x * 0.0
        draws = torch.randint(-(2**63), 2**63 - 1, (-(-x.numel() // 4),), dtype=torch.int64)
        lanes = draws.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over -2^15 .. 2^15 - 1
        keep = lanes >= round(self.p * 65536) - 32768
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * B(A(dropout(x)))` for the active adapter, if not merged; or,
    inside `row_adapters`, per batch row for that row's adapter. A DoRA adapter (one with a
    `lora_magnitude_vector`) rescales each output row instead (lora/dora.py)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        #: DoRA adapters' magnitudes m (out,), PEFT's in-memory names; the norms they divide by.
        self.lora_magnitude_vector = nn.ModuleDict()
        self.dora_norms = dora.Norms()
        self.merged_norms: dict[str, torch.Tensor] = {}  # a merged DoRA adapter's norm, to unmerge
        self.active_adapter: str | None = None
        self.merged: list[str] = []
        #: Set by `row_adapters`: (adapter, batch-row indices (n,) long) for each adapter of this
        #: layer that some row uses; rows in no group get no delta. None: use `active_adapter`.
        self.row_groups: list[tuple[str, torch.Tensor]] | None = None
        #: The batch size `row_groups` was built for, and each row's adapter (set with it).
        self.row_count: int | None = None
        self.row_names: tuple[str | None, ...] | None = None
        #: Set by a CUDA-graph decoder (cuda_graphs.py) for its steps: (codes (rows,) long, code
        #: of each adapter name); row i gets the adapter whose code is codes[i] (0: none). It
        #: takes precedence over `row_groups`, whose per-group indexing a graph cannot hold.
        self.row_index: tuple[torch.Tensor, dict[str, int]] | None = None

    def add_adapter(
        self,
        name: str,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        *,
        use_dora: bool = False,
    ) -> None:
        """A fresh adapter: A as nn.Linear's default init (kaiming-uniform, a=sqrt(5)), B = 0,
        so it changes nothing until trained; with `use_dora`, its magnitude m = ||W|| per row."""
        if name in self.lora_A:
            raise ConfigError(f"adapter {name!r} already exists on this layer; pass another adapter name")
        # A quantized base may hold its weight in buffers only.
        held = itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())
        device = next(held, torch.empty(0)).device
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        if use_dora:
            m = dora.initial_magnitude(self, name).to(device=device, dtype=dtype)
            self.lora_magnitude_vector[name] = dora.Magnitude(m)
        self.train(self.training)  # new modules start in training mode; an eval model stays eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.row_index is not None:
            return self._add_indexed(x, y, *self.row_index)
        if self.row_groups is not None:
            return self._add_per_row(x, y, self.row_groups)
        name = self.active_adapter
        if name is None or name not in self.lora_A or name in self.merged:
            return y
        return self._add_adapter(x, y, name)

    def _add_per_row(
        self, x: torch.Tensor, y: torch.Tensor, groups: list[tuple[str, torch.Tensor]]
    ) -> torch.Tensor:
        """y plus each group's adapter delta on that group's rows; x is (B, ..., in), y (B, ..., out)."""
        # Checked only where there is a delta: an adapter-free layer's rows need not be batch rows
        # (a Mixtral expert's routed tokens, whose adapters `row_adapters` refuses to use).
        if groups and x.shape[0] != self.row_count:
            raise ConfigError(
                f"row_adapters was given {self.row_count} adapter names but a LoRA layer got a batch of "
                f"{x.shape[0]} rows; pass one name per batch row"
            )
        for name, rows in groups:
            if name in self.merged:
                # Its delta is in the base weights now, i.e. on every row: no per-row answer exists.
                raise ConfigError(f"adapter {name!r} was merged inside row_adapters; unmerge it first")
            if rows.numel() == x.shape[0]:
                # One adapter for the whole batch (groups are disjoint, so it is the only one).
                return self._add_adapter(x, y, name)
            # The same addmm as one adapter alone, on the group's rows, written back: a row's
            # result does not depend on which other rows share its batch.
            y.index_copy_(0, rows, self._add_adapter(x[rows], y[rows], name))  # (n, ..., out) into (B, ...)
        return y

    def _add_indexed(
        self, x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor, code_of: dict[str, int]
    ) -> torch.Tensor:
        """y plus, on each row, the delta of the adapter its code names: every adapter of the layer
        runs on every row, its low-rank input zeroed where the row's code is another's. Fixed
        shapes and no host sync whatever the rows' adapters are, so a captured graph replays it
        for any mix (each step reads every adapter of the layer, which is small at decode)."""
        rows = codes[: x.shape[0]].view((-1,) + (1,) * (x.dim() - 1))  # (B, 1, ...)
        for name in self.lora_A:
            y = self._add_adapter(x, y, name, (rows == code_of[name]).to(x.dtype))
        return y

    def _add_adapter(
        self, x: torch.Tensor, y: torch.Tensor, name: str, row_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y + scaling * B(A(dropout(x))) for adapter `name` (a DoRA adapter: lora/dora.py); y is
        base_layer(x), (..., out). With `row_mask` ((B, 1, ...) of 0 and 1), only on its rows."""
        if name in self.lora_magnitude_vector:
            return dora.add(self, x, y, name, row_mask)
        # In the input's dtype: fp32 adapter weights are cast for a bf16 activation, say.
        a, b = self.lora_A[name].weight.to(x.dtype), self.lora_B[name].weight.to(x.dtype)
        h = F.linear(self.lora_dropout[name](x), a)  # (..., r)
        alpha = self.scaling[name]
        if row_mask is not None:
            h, alpha = h * (row_mask * alpha), 1.0
        # y + scaling * h @ B^T as one addmm: no separate scale and add passes over (N, out),
        # which on a CPU saves ~7% of a LoRA training step (benchmarks/finetune.py).
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=alpha)
        return out.view(y.shape)  # (..., out)

    def dora_scale(self, name: str) -> torch.Tensor:
        """A DoRA adapter's g = m / ||W + scaling * B @ A|| per output row (out,), detached."""
        return dora.scale(self, name).detach()

    def delta_lora(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped like the base weight (out, in)."""
        a, b = self.lora_A[name].weight.detach().float(), self.lora_B[name].weight.detach().float()
        return (b @ a) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """What adapter `name` adds to the base weight, in fp32 (out, in): scaling * B @ A, or for a
        DoRA adapter g * (W + scaling * B @ A) - W (W: the base weight, nothing merged into it)."""
        if name not in self.lora_magnitude_vector:
            return self.delta_lora(name)
        return dora.delta(self, name)

    def merge(self, name: str) -> None:
        """Add the adapter into base_layer.weight in place (fp32 sum, cast back)."""
        weight = self._mergeable_weight(name)
        if name in self.merged:
            raise ConfigError(f"adapter {name!r} is already merged; unmerge it first")
        dora.refuse_mix(self, name)
        with torch.no_grad():
            if name in self.lora_magnitude_vector:
                merged = dora.merge(self, name, weight)
            else:
                merged = weight.float() + self.delta_lora(name).to(weight.device)
            weight.copy_(merged.to(weight.dtype))
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Subtract a merged adapter from base_layer.weight again."""
        weight = self._mergeable_weight(name)
        if name not in self.merged:
            raise ConfigError(f"adapter {name!r} is not merged; nothing to unmerge")
        with torch.no_grad():
            if name in self.lora_magnitude_vector:
                base = dora.unmerge(self, name, weight)
            else:
                base = weight.float() - self.delta_lora(name).to(weight.device)
            weight.copy_(base.to(weight.dtype))
        self.merged.remove(name)

    def _mergeable_weight(self, name: str) -> nn.Parameter:
        if name not in self.lora_A:
            raise ConfigError(f"no adapter named {name!r} on this layer (has {sorted(self.lora_A)})")
        weight = getattr(self.base_layer, "weight", None)
        if not (isinstance(weight, nn.Parameter) and weight.is_floating_point()):
            raise ConfigError(
                f"cannot merge into a {type(self.base_layer).__name__} base: merge needs a full-precision "
                "base weight; load the model without QLoRA (no 4-bit quantization) to merge"
            )
        return weight


# ---- targeting and applying ------------------------------------------------------------


def is_linear_like(m: nn.Module) -> bool:
    """Whether `m` multiplies like a linear layer (int in_features and out_features): LoRA can wrap it."""
    return isinstance(getattr(m, "in_features", None), int) and isinstance(
        getattr(m, "out_features", None), int
    )


def _named_linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, module, parent) of every linear-like module; a LoRALinear counts as one (its
    lora_A/lora_B are not candidates)."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if is_linear_like(child):
            yield name, child, module
        else:
            yield from _named_linears(child, name)


def _layer_index(name: str) -> int | None:
    # PEFT's rule: the first numbered segment ("model.layers.3.mlp..." -> 3), not an expert index.
    m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _selected(cfg: LoraConfig, name: str, parent: nn.Module, moe: str = "") -> bool:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        # Every decoder-layer linear, not the LM head, as PEFT (0.22) on transformers 5 resolves it.
        # On a MoE model that is the attention, a dense layer's MLP (`mlp_only_layers`), the router
        # and the experts (PEFT adds those as target_parameters). On gpt-oss PEFT adds no
        # parameters (its experts and router are not linear modules): the attention only.
        hit = name.startswith("model.layers.") and not (
            moe == "gpt_oss" and isinstance(parent, (Expert, SparseMoE))
        )
    elif isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    elif name in targets:
        return True  # PEFT: an exact module name is taken regardless of layers_to_transform
    else:
        hit = any(name.endswith("." + t) for t in targets)
    if hit and cfg.layers_to_transform is not None:
        return _layer_index(name) in cfg.layers_to_transform
    return hit


def resolve_targets(
    model: nn.Module, cfg: LoraConfig, source: str = "LoraConfig"
) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, module, parent) of the modules `cfg` adapts (by target_modules, or by
    target_parameters through lora/experts.py); ConfigError when there are none."""
    via = parameter_modules(model, cfg, source)
    family = getattr(getattr(model, "config", None), "family", None)
    moe = getattr(family, "moe", "")
    found = [(n, m, p) for n, m, p in _named_linears(model) if n in via or _selected(cfg, n, p, moe)]
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _, _ in _named_linears(model)})
        raise ConfigError(
            f"target_modules {cfg.target_modules!r} (layers_to_transform={cfg.layers_to_transform}) matches no "
            f"linear layer; choose from {suffixes} or 'all-linear'"
        )
    config = getattr(model, "config", None)
    for name, _, _ in found:
        if name == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise ConfigError(
                "target_modules selects lm_head, whose weight is tied to the embedding; an adapter there "
                "would also change the input embedding when merged. Leave lm_head out of target_modules"
            )
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    cfg: LoraConfig,
    name: str = "default",
    *,
    dtype: torch.dtype = torch.float32,
    ranks: dict[str, tuple[int, float]] | None = None,
) -> list[str]:
    """Wrap the target linears of a loaded `model` in place (or add adapter `name` to those
    already wrapped), freeze every non-LoRA parameter, make `name` the active adapter and
    return the wrapped module names. Adapter weights are kept in `dtype` (fp32 by default,
    as PEFT does for half-precision bases; the forward casts them to the input's dtype).
    `ranks`: (rank, scale) of some modules, overriding cfg's (an adapter file's expert LoRAs)."""
    cfg.validate()
    targets = resolve_targets(model, cfg)
    via = parameter_modules(model, cfg)  # rank and alpha of a module adapted through a parameter
    for module_name, module, _ in targets:
        if isinstance(module, LoRALinear) and name in module.lora_A:
            raise ConfigError(f"{module_name} already has an adapter named {name!r}; pass another name")
    if cfg.use_dora:
        dora.refuse_in_moe(model, [n for n, _, _ in targets])
    for param_name, p in model.named_parameters():
        if ".lora_A." not in param_name and ".lora_B." not in param_name:
            p.requires_grad_(False)
    for module_name, module, parent in targets:
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module).train(module.training)
            setattr(parent, module_name.rsplit(".", 1)[-1], module)
        key = via.get(module_name, module_name)
        r, scale = (ranks or {}).get(module_name) or (cfg.rank_for(key), cfg.scale_for(key))
        module.add_adapter(name, r, scale, cfg.dropout, dtype, use_dora=cfg.use_dora)
    set_adapter(model, name)
    return [n for n, _, _ in targets]


# ---- switching, merging ----------------------------------------------------------------


def layers_with(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    layers = {n: m for n, m in lora_layers(model).items() if name in m.lora_A}
    if not layers:
        names = sorted({a for m in lora_layers(model).values() for a in m.lora_A})
        raise ConfigError(
            f"the model has no adapter named {name!r} (adapters: {names or 'none'}); apply or load it first"
        )
    return layers


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter of every LoRA layer; None turns adapters off."""
    if name is not None:
        layers_with(model, name)
    for layer in lora_layers(model).values():
        layer.active_adapter = name


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (e.g. as the DPO reference) without a second copy of it."""
    with adapter_active(model, None):
        yield


@contextlib.contextmanager
def adapter_active(model: nn.Module, name: str | None) -> Iterator[None]:
    """Inside, every LoRA layer runs adapter `name` alone (None: none, the base model; a name:
    in eval mode too, no dropout); afterwards each layer's adapter and each module's mode are as
    before. So one base runs as several models: the reference (None), or a reward model's
    adapter beside the adapter being trained. Merged adapters are refused: they are in every
    answer."""
    layers = lora_layers(model)
    merged = sorted({a for m in layers.values() for a in m.merged})
    if merged:
        raise ConfigError(f"adapters {merged} are merged into the base weights; unmerge_adapter them first")
    active = {n: m.active_adapter for n, m in layers.items()}
    training = {n: m.training for n, m in model.named_modules()} if name is not None else {}
    set_adapter(model, name)
    if name is not None:
        model.eval()
    try:
        yield
    finally:
        for n, layer in layers.items():
            layer.active_adapter = active[n]
        for n, m in model.named_modules():
            if n in training:
                m.training = training[n]


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside, batch row i of every forward uses adapter `names[i]` (None: the base model only),
    whatever the active adapter is, so requests for different adapters share one batch. Every
    forward inside must have len(names) rows. A layer without a row's adapter adds nothing to
    that row, as when the adapter is active alone."""
    layers = lora_layers(model)
    wanted = sorted({n for n in names if n is not None})
    for name in wanted:
        layers_with(model, name)  # ConfigError naming the adapters there are
    # Any merged adapter is in the base weights of every row, base-only rows included.
    merged = sorted({a for m in layers.values() for a in m.merged})
    if merged:
        raise ConfigError(
            f"adapters {merged} are merged into the base weights, so no row could run without them; "
            "unmerge_adapter them first"
        )
    # A Mixtral expert (or router) sees a subset of tokens, not batch rows: refuse, don't misapply.
    for moe_name, moe in model.named_modules():
        if isinstance(moe, SparseMoE):
            for sub_name, layer in lora_layers(moe).items():
                if used := [n for n in wanted if n in layer.lora_A]:
                    raise ConfigError(
                        f"adapter {used[0]!r} adapts {moe_name}.{sub_name}, inside a mixture of experts, "
                        "whose inputs are routed tokens rather than batch rows; row_adapters cannot serve "
                        "it, run its requests in their own batch with set_adapter"
                    )
    # One index tensor per adapter, built once and shared by every layer.
    groups: dict[str, torch.Tensor] = {}
    for name in wanted:
        device = next(m for m in layers.values() if name in m.lora_A).lora_A[name].weight.device
        rows = [i for i, n in enumerate(names) if n == name]
        groups[name] = torch.tensor(rows, dtype=torch.long, device=device)
    previous = {n: (m.row_groups, m.row_count, m.row_names) for n, m in layers.items()}
    try:
        for layer in layers.values():
            layer.row_groups = [(name, rows) for name, rows in groups.items() if name in layer.lora_A]
            layer.row_count, layer.row_names = len(names), tuple(names)
        yield
    finally:
        for n, layer in layers.items():
            layer.row_groups, layer.row_count, layer.row_names = previous[n]


def _check_mergeable(layers: dict[str, LoRALinear], name: str) -> None:
    """Refuse before changing any weight, so a failure never leaves the model half merged."""
    for module_name, layer in layers.items():
        try:
            layer._mergeable_weight(name)
        except ConfigError as e:
            raise ConfigError(f"{module_name}: {e}") from None


def merge_adapter(model: nn.Module, name: str) -> None:
    """Add adapter `name` into the base weights (outputs unchanged up to rounding)."""
    layers = layers_with(model, name)
    _check_mergeable(layers, name)
    if already := [n for n, m in layers.items() if name in m.merged]:
        raise ConfigError(f"adapter {name!r} is already merged into {already[0]}; unmerge it first")
    for layer in layers.values():
        layer.merge(name)


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Subtract a merged adapter `name` from the base weights again."""
    layers = layers_with(model, name)
    if not_merged := [n for n, m in layers.items() if name not in m.merged]:
        raise ConfigError(f"adapter {name!r} is not merged into {not_merged[0]}; nothing to unmerge")
    for layer in layers.values():
        layer.unmerge(name)


def merge_and_unload(model: nn.Module, name: str = "default") -> nn.Module:
    """Merge adapter `name`, then put every base layer back in place of its LoRALinear, so the
    state dict has the base model's names. Other adapters on the model are dropped."""
    layers = layers_with(model, name)
    _check_mergeable(layers, name)
    for layer in layers.values():
        if name not in layer.merged:
            layer.merge(name)
    return unload(model)


def unload(model: nn.Module) -> nn.Module:
    """Put every LoRALinear's base layer back in its place (as it is: merged adapters stay in
    its weights, the others are dropped), so the state dict has the base model's names."""
    for module_name, layer in lora_layers(model).items():
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model
