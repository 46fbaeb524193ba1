"""4-bit NormalFloat (NF4) weights: the frozen base of QLoRA.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314, §3 and Appendix E) stores each frozen linear weight as 4-bit
indices into 16 NormalFloat code values (quantiles of N(0, 1) scaled to [-1, 1],
with an exact zero), with one absmax scale per block of 64 consecutive weights.
"Double quantization" stores those fp32 scales again in 8 bits, one fp32 step per
block of 256 scales, after subtracting their mean. Matmuls dequantize the weight to
the compute dtype on the fly; only the LoRA adapters on top are trained.

Here: the code book (`NF4_CODEBOOK`, and its construction from normal quantiles),
`quantize_nf4` -> `NF4Weight` -> `dequantize`, the `NF4Linear` module whose backward
re-dequantizes instead of keeping a dense copy, and `quantize_linears_nf4`, which
swaps a model's linears in place.

Layout (the same as bitsandbytes' and torchao's, so codes compare one to one): the
weight is flattened row-major and cut into blocks of `block_size`; element 2k is the
high nibble of byte k, element 2k+1 the low nibble. A weight whose size is not a
multiple of `block_size` is padded with zeros internally (the padding dequantizes to
0 and is cut off); `shape` is always the original one.

Not here: LoRA adapters (they wrap an `NF4Linear` like any linear), fused 4-bit
matmul kernels (each call dequantizes one dense matrix, one layer at a time), NF4
on disk (checkpoints stay HF safetensors; quantize after loading), paged optimizers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.models.linear import Linear

log = logging.getLogger(__name__)

#: The 16 NF4 code values, ascending, as published in the QLoRA paper (Appendix E)
#: and bitsandbytes. Index 7 is the exact zero.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

#: Quantiles are taken between 1 - offset and offset rather than 0 and 1, where the
#: normal quantile function is infinite. QLoRA picks offset = ½((1 - 1/32) + (1 - 1/30)),
#: the mean of the outermost quantile centres for 16 and 15 bins.
NF4_OFFSET = 0.9677083

#: Default block of weights sharing one absmax scale (QLoRA: 64).
BLOCK_SIZE = 64
#: Block of first-level scales sharing one fp32 step under double quantization (QLoRA: 256).
SCALE_BLOCK_SIZE = 256
#: Double-quantized scales are symmetric int8 in [-127, 127].
_INT8_MAX = 127


def nf4_codebook_from_normal_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The NF4 code book built as in QLoRA §3 / Appendix E: 8 positive quantiles of N(0, 1)
    at probabilities evenly spaced from `offset` down to 0.5 (0.5 itself excluded),
    7 negative ones likewise, plus an exact 0, then divided by the largest magnitude.
    One more positive than negative value is what buys the exact zero with 16 codes."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values  # (16,)
    return (values / values.abs().max()).to(torch.float32)


@dataclass
class NF4Weight:
    """A weight in NF4: packed 4-bit codes plus block scales, in one of two forms.

    Single quantization: `absmax` is the fp32 absmax of each block.
    Double quantization (QLoRA §3): `absmax` is int8, and block b's scale is
    `absmax[b] * absmax_step[b // scale_block_size] + absmax_mean`.
    """

    codes: torch.Tensor  # (padded numel / 2,) uint8: two codes per byte, first in the high nibble
    absmax: torch.Tensor  # (n_blocks,) float32, or int8 when double-quantized
    absmax_step: torch.Tensor | None  # (ceil(n_blocks / scale_block_size),) float32
    absmax_mean: torch.Tensor | None  # () float32
    shape: torch.Size
    block_size: int = BLOCK_SIZE
    scale_block_size: int = SCALE_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_step is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes and scales (what replaces the dense weight)."""
        parts = (self.codes, self.absmax, self.absmax_step, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of each block, undoing double quantization. (n_blocks,)"""
        if self.absmax_step is None:
            return self.absmax.float()
        steps = self.absmax_step.float().repeat_interleave(self.scale_block_size)[: self.absmax.numel()]
        return self.absmax.float() * steps + self.absmax_mean.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight, `shape`, in `dtype` (computed in fp32, then rounded once)."""
        # Decode a whole byte at once: a 256-row table of (high code, low code) values.
        pairs = _pair_table(self.codes.device).index_select(0, self.codes.int())  # (padded / 2, 2)
        blocks = pairs.view(-1, self.block_size).mul_(self.block_scales()[:, None])  # (n_blocks, block)
        return blocks.view(-1)[: self.numel].view(self.shape).to(dtype)


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: row b holds the code values of b's high and low nibble."""
    table = _PAIR_TABLES.get(device)
    if table is None:
        table = torch.stack([NF4_CODEBOOK.repeat_interleave(16), NF4_CODEBOOK.repeat(16)], dim=1)
        table = _PAIR_TABLES[device] = table.to(device)
    return table


@torch.no_grad()
def quantize_nf4(
    weight: torch.Tensor,
    block_size: int = BLOCK_SIZE,
    double_quant: bool = True,
    *,
    name: str = "weight",
) -> NF4Weight:
    """Quantize `weight` (any shape, any float dtype) to NF4 on its own device.

    Each value is divided by its block's absmax and mapped to the nearest code value;
    a value exactly halfway between two codes takes the lower one (as bitsandbytes'
    strict `>` comparisons do). The codes are chosen with the exact fp32 absmax and
    only then are the scales double-quantized, as in QLoRA eq. (6). `name` is used in
    error messages.
    """
    _check_quantizable(weight, block_size, name)
    flat = weight.detach().reshape(-1).float()  # row-major; copies a column-major view
    flat = F.pad(flat, (0, -flat.numel() % block_size))
    blocks = flat.view(-1, block_size)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    if not torch.isfinite(absmax).all():
        raise CheckpointError(f"{name}: has NaN or infinite values; NF4 cannot store them, fix the weights")
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero block maps to code 0.0
    midpoints = _midpoints(weight.device)
    codes = torch.bucketize(blocks / safe[:, None], midpoints, out_int32=True).view(-1, 2)  # (padded/2, 2)
    packed = (codes[:, 0] * 16 + codes[:, 1]).to(torch.uint8)  # (padded / 2,)
    step = mean = None
    if double_quant:
        absmax, step, mean = _double_quantize(absmax, SCALE_BLOCK_SIZE)
    return NF4Weight(packed, absmax, step, mean, weight.shape, block_size, SCALE_BLOCK_SIZE)


def _check_quantizable(weight: torch.Tensor, block_size: int, name: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ConfigError(f"{name}: NF4 block_size={block_size!r}; use a positive even integer such as 64")
    if weight.is_meta:
        raise CheckpointError(
            f"{name}: is on the meta device (not loaded); load the weights before quantizing"
        )
    if not weight.is_floating_point():
        raise CheckpointError(f"{name}: has dtype {weight.dtype}; NF4 quantizes float weights only")
    if weight.numel() == 0:
        raise CheckpointError(
            f"{name}: has shape {tuple(weight.shape)} with no elements; nothing to quantize"
        )


def _midpoints(device: torch.device) -> torch.Tensor:
    """(15,) decision boundaries halfway between adjacent code values."""
    cb = NF4_CODEBOOK.to(device)
    return (cb[:-1] + cb[1:]) / 2


def _double_quantize(
    absmax: torch.Tensor, scale_block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax (n_blocks,) fp32 -> (int8 codes (n_blocks,), fp32 steps (n_groups,), fp32 mean ()).

    QLoRA §3: the scales are positive, so subtract their mean to centre them and use a
    symmetric 8-bit code, one fp32 constant per 256 scales. We use a linear int8 code
    (step = group absmax / 127); bitsandbytes uses its 8-bit dynamic float map instead.
    """
    mean = absmax.mean()
    centred = absmax - mean
    n = centred.numel()
    groups = F.pad(centred, (0, -n % scale_block_size)).view(-1, scale_block_size)  # (n_groups, 256)
    step = groups.abs().amax(dim=1) / _INT8_MAX  # (n_groups,)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round(groups / safe[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q.view(-1)[:n].clone(), step, mean


def nf4_bits_per_parameter(block_size: int = BLOCK_SIZE, double_quant: bool = True) -> float:
    """Storage cost per weight for a large tensor, as counted in QLoRA §3: 4 bits of code
    plus 32/64 = 0.5 bits of fp32 scale, or 8/64 + 32/(64*256) = 0.127 bits with double quant."""
    if not double_quant:
        return 4 + 32 / block_size
    return 4 + 8 / block_size + 32 / (block_size * SCALE_BLOCK_SIZE)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized from NF4. Backward dequantizes W again for
    grad_input = grad_out W; only the 4-bit codes and scales are saved, never the dense
    (out, in) matrix, which is what keeps QLoRA's memory below LoRA's. The frozen weight
    gets no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layout: tuple[torch.Size, int, int],
        codes: torch.Tensor,
        absmax: torch.Tensor,
        step: torch.Tensor | None,
        mean: torch.Tensor | None,
    ) -> torch.Tensor:
        weight = NF4Weight(codes, absmax, step, mean, *layout).dequantize(x.dtype)  # (out, in)
        ctx.layout = layout
        ctx.save_for_backward(codes, absmax, step, mean)
        return F.linear(x, weight, bias)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = NF4Weight(*ctx.saved_tensors, *ctx.layout).dequantize(grad_out.dtype)  # (out, in)
            grad_x = grad_out @ weight  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, grad_bias, None, None, None, None, None


#: Buffers holding block scales: `.to(dtype)` / `.half()` must move them but never round them.
_SCALE_BUFFERS = ("weight_absmax", "weight_absmax_step", "weight_absmax_mean")


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (QLoRA).

    The weight is not a Parameter: its codes and scales are buffers (`weight_codes`,
    `weight_absmax`, and with double quant `weight_absmax_step`, `weight_absmax_mean`),
    so `.to(device)` moves them and the state dict holds them. The bias stays in full
    precision, frozen. forward dequantizes to `compute_dtype` (default: the input's
    dtype) and returns that dtype's result cast back to the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = BLOCK_SIZE,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """An empty (all-zero) layer of the right shapes, e.g. to `load_state_dict` into."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.compute_dtype = block_size, compute_dtype
        n_blocks = -(-in_features * out_features // block_size)
        n_groups = -(-n_blocks // SCALE_BLOCK_SIZE)
        self.register_buffer(
            "weight_codes", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8, device=device)
        )
        absmax_dtype = torch.int8 if double_quant else torch.float32
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=absmax_dtype, device=device))
        step = torch.zeros(n_groups, device=device) if double_quant else None
        self.register_buffer("weight_absmax_step", step)
        self.register_buffer("weight_absmax_mean", torch.zeros((), device=device) if double_quant else None)
        b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = BLOCK_SIZE,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        *,
        name: str = "weight",
    ) -> NF4Linear:
        """Quantize `linear`'s weight; the bias is kept (same tensor, frozen)."""
        nf4 = quantize_nf4(linear.weight, block_size, double_quant, name=name)
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            block_size=block_size,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            device="meta",
        )
        module.weight_codes, module.weight_absmax = nf4.codes, nf4.absmax
        module.weight_absmax_step, module.weight_absmax_mean = nf4.absmax_step, nf4.absmax_mean
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def nf4_weight(self) -> NF4Weight:
        """The stored weight as an `NF4Weight` (sharing the buffers)."""
        return NF4Weight(
            self.weight_codes,
            self.weight_absmax,
            self.weight_absmax_step,
            self.weight_absmax_mean,
            *self._layout(),
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: compute_dtype, else float32)."""
        return self.nf4_weight().dequantize(dtype or self.compute_dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        y = _NF4LinearFunction.apply(
            x.to(dtype),
            bias,
            self._layout(),
            self.weight_codes,
            self.weight_absmax,
            self.weight_absmax_step,
            self.weight_absmax_mean,
        )
        return y.to(x.dtype)

    def _layout(self) -> tuple[torch.Size, int, int]:
        return torch.Size((self.out_features, self.in_features)), self.block_size, SCALE_BLOCK_SIZE

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NF4Linear:
        # Module.to(torch.bfloat16) casts every float buffer; rounding the fp32 block
        # scales to bf16 would add error to every weight. Move them, keep them fp32.
        scales = {n: self._buffers.pop(n) for n in _SCALE_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.weight_codes.device
            for n, t in scales.items():
                self._buffers[n] = None if t is None else t.to(device)
        return self

    def extra_repr(self) -> str:
        dq = self.weight_absmax_step is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={dq}"
        )


def _skip_lm_head(name: str) -> bool:
    return name.rpartition(".")[2] == "lm_head"


def _swappable(module: nn.Module) -> bool:
    """Linears that add nothing a swap would lose: `nn.Linear` itself and the model's `Linear`
    (in the CPU decode layout or not). Other nn.Linear subclasses may carry behaviour (an
    adapter; MultiheadAttention reads `out_proj.weight` directly), so they are left alone."""
    return type(module) is nn.Linear or isinstance(module, Linear)


def quantize_linears_nf4(
    model: nn.Module,
    *,
    skip: Callable[[str], bool] | None = None,
    block_size: int = BLOCK_SIZE,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace `model`'s linear layers by `NF4Linear`s in place; return their names.

    `skip(name)` keeps a layer in full precision; the default keeps `lm_head` (QLoRA
    quantizes the transformer blocks, not the output head). A linear whose weight is
    shared with an embedding (tied word embeddings) is always kept: the embedding
    needs it dense. So is a LoRA adapter's own A or B matrix (under `lora_A` / `lora_B`),
    whatever `skip` says: it is what gets trained. The dense weights of replaced layers are released (unless still
    referenced elsewhere, e.g. by another module tied to them). `model` itself is
    never replaced (that cannot happen in place): use `NF4Linear.from_linear`.
    """
    skip = skip or _skip_lm_head
    embedded = _embedding_storages(model)
    names = []
    for name, module in model.named_modules():
        if not _swappable(module):
            if isinstance(module, nn.Linear):
                log.info("NF4: leaving %s (%s) unquantized", name, type(module).__name__)
            continue
        if name == "" or skip(name) or _is_adapter(name) or _storage(module.weight) in embedded:
            continue
        names.append(name)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        nf4 = NF4Linear.from_linear(
            getattr(parent, child), block_size, double_quant, compute_dtype, name=f"{name}.weight"
        )
        setattr(parent, child, nf4)
    return names


def quantize_on_load(
    *, block_size: int = BLOCK_SIZE, double_quant: bool = True, compute_dtype: torch.dtype | None = None
) -> Callable[[nn.Module, str], None]:
    """A `load_checkpoint(on_tensor=...)` hook that turns each linear of the transformer
    blocks into an `NF4Linear` as soon as its weight (and bias) are loaded, so the
    full-precision model never exists at once: QLoRA's peak memory is then about one
    dense matrix above the 4-bit model, not the whole fp32 model. The same layers as
    `quantize_linears_nf4`'s default (the LM head and embedding stay dense)."""

    def hook(model: nn.Module, tensor_name: str) -> None:
        name = tensor_name.rpartition(".")[0]
        if not name.startswith("model.layers."):
            return
        module = model.get_submodule(name)
        if not _swappable(module) or any(p.is_meta for p in module.parameters()):
            return  # not a linear, or its bias has not arrived yet
        parent_name, _, child = name.rpartition(".")
        nf4 = NF4Linear.from_linear(module, block_size, double_quant, compute_dtype, name=f"{name}.weight")
        setattr(model.get_submodule(parent_name), child, nf4)

    return hook


#: PEFT's names for the containers of adapter matrices (weightsmith.lora uses them too).
_ADAPTER_CONTAINERS = {"lora_A", "lora_B"}


def _is_adapter(name: str) -> bool:
    return not _ADAPTER_CONTAINERS.isdisjoint(name.split("."))


def _storage(t: torch.Tensor) -> int:
    return 0 if t.is_meta else t.untyped_storage().data_ptr()


def _embedding_storages(model: nn.Module) -> set[int]:
    return {_storage(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - {0}
