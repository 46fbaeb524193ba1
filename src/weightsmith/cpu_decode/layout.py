"""The CPU decode layout: column-major weights, split matmuls, packed projections.

Decoding multiplies one or a few rows by every weight matrix. That is bound by
memory bandwidth, and one BLAS GEMV call on a row-major weight uses one core at
about half the machine's bandwidth. The decode layout stores the large weights
column-major instead (each parameter keeps its object, name, shape and values; its
data becomes a transposed view of an (in, out) buffer, so state dicts, adapters and
saving see no difference) and packs projections that read the same input (q/k/v,
gate/up) side by side in one buffer. A decode-sized input is then multiplied as a
batched matmul over `k` contiguous chunks of the input dimension, which BLAS
spreads over `k` cores, and the partial products are summed.

Measured on a 2-core CPU (benchmarks/generate.py shows the end-to-end effect),
this roughly doubles decode GEMV throughput over row-major `F.linear`. Results
differ from the plain product only by summation order (~1e-6 relative).

How it is applied: `lay_out` changes the class of each module it lays out, in place,
to a subclass defined here (`SplitLinear`, `PackedAttention`, `PackedMLP`), as
`torch.nn.utils.parametrize` does: the module objects, their children, parameters,
hooks and every outside reference to them stay, so a LoRA adapter or a quantizer can
still wrap or replace them. Each subclass overrides only the step it speeds up and
falls back to the model's own math when its weights or children were replaced since.
`Swaps.undo` changes the classes back and makes the weights row-major again.

Not here: deciding when to lay out and owning the result (plan.py), the fused C
step (fused.py), quantized linears (weightsmith.quant), anything for GPUs, where
cuBLAS handles either layout well.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.models.linear import Linear
from weightsmith.models.model import MLP, Attention, AttentionInputs
from weightsmith.models.rope import apply_rope
from weightsmith.quant import tiles as qtiles
from weightsmith.quant.weight_only import QuantizedLinear

#: Inputs with at most this many rows take the split path; longer prefills do not. Measured on
#: the default model (2 cores, one decode step): the split path beats `F.linear` on the
#: column-major weight at every batch size up to 32 rows (16 rows: 114 vs 131 ms; 4 rows: 67 vs
#: 134 ms) and loses by 48, which is what the server's continuous batching runs at.
MAX_SPLIT_ROWS = 32
#: Weights smaller than this are not worth re-laying out.
MIN_SPLIT_NUMEL = 1 << 16


class SplitMatmul:
    """y = x @ wt (+ bias) for decode-sized x, with wt (in, out) cut into k row chunks."""

    def __init__(self, wt: torch.Tensor, k: int, source: torch.Tensor | None = None) -> None:
        in_features, self.out = wt.shape
        self.k, self.chunk = k, in_features // k
        self.chunks = wt.detach().view(k, self.chunk, self.out)  # (k, in/k, out), a view
        self.source = source  # the parameter whose data `wt` is (another one assigned since: stale)

    @staticmethod
    def possible(wt: torch.Tensor, k: int) -> bool:
        return k > 1 and wt.device.type == "cpu" and wt.stride(1) == 1 and wt.shape[0] % k == 0

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // (self.k * self.chunk)
        if rows == 1:
            xs = x.reshape(self.k, 1, self.chunk)
        else:
            xs = x.reshape(rows, self.k, self.chunk).transpose(0, 1)  # (k, rows, in/k)
        parts = torch.bmm(xs, self.chunks)  # (k, rows, out)
        # Two chunks (the 2-core case) add faster than a reduction kernel launches.
        y = parts[0] + parts[1] if self.k == 2 else parts.sum(0)
        y = y.view(*x.shape[:-1], self.out)
        return y if bias is None else y + bias


def _decode_sized(x: torch.Tensor, in_features: int) -> bool:
    return x.numel() <= MAX_SPLIT_ROWS * in_features and x.device.type == "cpu"


def _wants_grad(weight: torch.Tensor) -> bool:
    # The split matmuls read detached views: a weight being trained takes F.linear.
    return weight.requires_grad and torch.is_grad_enabled()


class PackedGroup:
    """Bias-free projections of one input whose weights are side-by-side column-major slices
    of one (in, sum(out)) buffer (q/k/v, gate/up): one split matmul, then split the output."""

    def __init__(self, buffer: torch.Tensor, weights: list[nn.Parameter], k: int) -> None:
        self.matmul = SplitMatmul(buffer, k)
        self.weights = weights  # the members' parameters, whose data are slices of `buffer`
        self.sizes = [w.shape[0] for w in weights]

    def serves(self, x: torch.Tensor, members: tuple[nn.Module, ...]) -> bool:
        """Whether x is decode-sized and `members` are still this group's layers and weights."""
        if not _decode_sized(x, self.matmul.k * self.matmul.chunk):
            return False
        for m, w in zip(members, self.weights, strict=True):
            if type(m) is not SplitLinear or m.group is not self or m._parameters["weight"] is not w:
                return False
        return not _wants_grad(self.weights[0])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.matmul(x).split(self.sizes, dim=-1)


class SplitLinear(Linear):
    """A `Linear` in the decode layout (made by `lay_out`, never constructed): column-major
    weight, split matmul for decode-sized inputs, `F.linear` for everything else."""

    split: SplitMatmul | None  # None with one split (one thread): F.linear on the column-major weight
    splits: int  # the k its split matmul cuts the input into
    group: PackedGroup | None  # the packed q/k/v or gate/up this layer's weight is a slice of

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split, w = self.split, self._parameters["weight"]
        if (
            split is not None
            and split.source is w
            and _decode_sized(x, self.in_features)
            and not _wants_grad(w)
        ):
            return split(x, self._parameters["bias"])
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):  # `.to()` gives the weight new data: split it anew
        before = self.weight.data_ptr()
        super()._apply(fn, recurse)
        if self.weight.data_ptr() != before:
            self.group = None  # converted one by one, the group's weights share no buffer now
            _set_split(self, self.splits)
        return self


def _group_of(module: nn.Module) -> PackedGroup | None:
    return module.group if type(module) is SplitLinear else None


class PackedAttention(Attention):
    """`Attention` whose q/k/v weights share one buffer: q, k, v from one packed matmul and
    q and k rotated in one pass, while the projections are still the ones packed."""

    def qkv(self, x: torch.Tensor, a: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        members = (self.q_proj, self.k_proj, self.v_proj)
        group = _group_of(members[0])
        if group is None or not group.serves(x, members):
            return super().qkv(x, a)
        b, t, _ = x.shape
        heads = self.n_heads + self.n_kv
        y = group.matmul(x)  # (B, T, (H + 2 Hkv) D): [q | k | v]
        qk = y[..., : heads * self.head_dim].view(b, t, heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            qk = apply_rope(qk, *a.cos_sin(self.layer_type))  # (B, H + Hkv, T, D)
        v = y[..., heads * self.head_dim :].view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return qk[:, : self.n_heads], qk[:, self.n_heads :], v


class PackedMLP(MLP):
    """`MLP` whose gate and up weights share one buffer: both from one packed matmul."""

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = (self.gate_proj, self.up_proj)
        group = _group_of(members[0])
        if group is None or not group.serves(x, members):
            return super().gate_up(x)
        gate, up = group(x)
        return gate, up


@dataclass
class Swaps:
    """What `lay_out` changed, held weakly (a layer a quantizer replaced since is freed), for `undo`."""

    classes: list[tuple[weakref.ref, type[nn.Module]]] = field(default_factory=list)
    params: list[weakref.ref] = field(default_factory=list)
    tiled: list[weakref.ref] = field(default_factory=list)  # int4 / int8 layers holding tiles

    def swap(self, module: nn.Module, cls: type[nn.Module]) -> None:
        self.classes.append((weakref.ref(module), type(module)))
        module.__class__ = cls

    def relayout(self, p: nn.Parameter, data: torch.Tensor) -> None:
        """Give `p` (the same Parameter object: names, optimizers and ties keep it) new data."""
        self.params.append(weakref.ref(p))
        p.data = data

    @torch.no_grad()
    def undo(self) -> None:
        """Every module back to its class, every weight row-major again (values unchanged)."""
        with torch.inference_mode(False):
            for ref, cls in reversed(self.classes):
                module = ref()
                if module is not None and type(module) in (SplitLinear, PackedAttention, PackedMLP):
                    if isinstance(module, SplitLinear):
                        del module.split, module.splits, module.group
                    module.__class__ = cls
            for ref in self.params:
                p = ref()
                if p is not None and not p.is_contiguous():
                    p.data = p.detach().contiguous()
            for ref in self.tiled:
                layer = ref()
                if layer is not None:
                    layer.untile()
        self.classes.clear()
        self.params.clear()
        self.tiled.clear()


def _cpu_weight(m: nn.Module) -> bool:
    """An fp32 CPU weight. bf16 weights stay row-major: oneDNN's bf16 matmuls (prefill) run faster
    on them (one 256 x 576 x 1536 product, 2 threads: 1.5 ms row-major, 2.0 ms column-major; 33
    rows: 0.41 vs 1.18 ms) and the C decode step reads them with vdpbf16ps (quant/cpu_bf16.c)."""
    w = m.weight
    return not w.is_meta and w.device.type == "cpu" and w.dtype == torch.float32


def _set_split(linear: SplitLinear, k: int) -> None:
    wt = linear.weight.detach().t()  # (in, out), contiguous rows when column-major
    linear.split = SplitMatmul(wt, k, linear.weight) if SplitMatmul.possible(wt, k) else None
    linear.splits = k


def split_linear(swaps: Swaps, linear: Linear, k: int, group: PackedGroup | None = None) -> None:
    """Lay one `Linear` out column-major (unless it is already) and make it a `SplitLinear`."""
    w = linear.weight
    if w.stride(0) != 1:
        swaps.relayout(w, w.detach().t().contiguous().t())
    swaps.swap(linear, SplitLinear)
    _set_split(linear, k)
    linear.group = group


def pack(swaps: Swaps, members: list[nn.Module], k: int) -> PackedGroup | None:
    """Move `members`' weights side by side into one (in, sum(out)) buffer and make each a
    `SplitLinear` of the group; None if they cannot be (a bias, not a plain `Linear`, one split)."""
    if k < 2 or any(type(m) is not Linear or m.bias is not None or not _cpu_weight(m) for m in members):
        return None
    if members[0].in_features % k:
        return None
    buffer = torch.cat([m.weight.detach().t() for m in members], dim=1).contiguous()  # (in, sum out)
    group = PackedGroup(buffer, [m.weight for m in members], k)
    offset = 0
    for m in members:
        swaps.relayout(m.weight, buffer[:, offset : offset + m.out_features].t())
        split_linear(swaps, m, k, group)
        offset += m.out_features
    return group


def lay_out(model: nn.Module, splits: int, swaps: Swaps) -> None:
    """Lay out every CPU projection of `model` not laid out yet, recording the changes in `swaps`:
    q/k/v and gate/up packed (plain bias-free `Linear`s only), then every other large `Linear`."""
    with torch.no_grad(), torch.inference_mode(False):
        for module in list(model.modules()):
            # QK-norm (Qwen3, Gemma 3) comes between the projections and RoPE: not packed.
            if (
                type(module) is Attention
                and not hasattr(module, "q_norm")
                and pack(swaps, [module.q_proj, module.k_proj, module.v_proj], splits)
            ):
                swaps.swap(module, PackedAttention)
            elif type(module) is MLP and pack(swaps, [module.gate_proj, module.up_proj], splits):
                swaps.swap(module, PackedMLP)
        for module in list(model.modules()):
            if type(module) is Linear and _cpu_weight(module) and module.weight.numel() >= MIN_SPLIT_NUMEL:
                split_linear(swaps, module, splits)
        tile_quantized(model, swaps)


def tile_quantized(model: nn.Module, swaps: Swaps) -> None:
    """Put every int4 and int8 layer that can take them in 16-row tiles (quant/tiles.py), all in
    one huge-page buffer, 64-byte aligned each: the same bytes as before, read as one stream."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.can_tile()]
    sizes = [m.tile_nbytes() for m in layers]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // 64) * 64)
    if not layers:
        return
    buffer = qtiles.hugepage_buffer(starts[-1])
    for layer, start, size in zip(layers, starts, sizes, strict=False):
        layer.tile_into(buffer[start : start + size])
        swaps.tiled.append(weakref.ref(layer))
