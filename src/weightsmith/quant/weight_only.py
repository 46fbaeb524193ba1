"""Weight-only int8 and int4 linear layers for inference.

int8: symmetric, one scale per output channel: scale = absmax(row) / 127,
q = round(w / scale) in [-127, 127], w ~ q * scale.

int4: asymmetric, group-wise along the input dimension (groups of 32, 64 or 128
consecutive weights of a row), 16 levels between the group's min and max:
zero = min and scale = (max - zero) / 15, both rounded to fp16 (as GGUF's Q4_1 holds them:
decoding reads 4.5 bits a weight, not 5), then q = round((w - zero) / scale) in [0, 15]
against the rounded values, w ~ q * scale + zero. This is the form PyTorch's int4 "tinygemm" kernels take, after a
change of convention: they compute (q - 8) * scale + zero', so zero' = zero + 8 * scale,
passed as `scales_and_zeros` (K/G, N, 2) holding [..., 0] = scale, [..., 1] = zero'
(checked numerically against `dequantize_int4` in the tests).

Layer state (also the saved layout, see weightsmith.checkpoint.quantized): `qweight`
(int8 (N, K) for int8; uint8 (N, K/2) for int4, two 4-bit codes per byte, low nibble
first, i.e. byte j of a row holds codes 2j (bits 0-3) and 2j+1 (bits 4-7)), `scales`
(fp32 (N,) for int8, fp16 (N, K/G) for int4) and for int4 `zeros` (fp16 (N, K/G)).

The CPU decode layout (weightsmith.cpu_decode.layout) may put a layer in 16-row tiles
(`tile_into`, quant/tiles.py): the same bytes reordered for the kernels, in place of
`qweight`, `scales` (and `zeros`), which are then None; `rows()` and `state_dict()` give the
portable tensors either way, and a move or cast untiles first.

Which matmul runs (measured on a 2-core AVX-512 CPU, torch 2.13, see the issue notes):
- fp32 activations on the CPU with at most `KERNEL_MAX_ROWS` rows (decoding), or
  `TILED_KERNEL_MAX_ROWS` for a layer in tiles (short prompts too): our C kernels (cpu_qdot.c, built on first use), which quantize the input to int8 per block of
  32 and multiply with the CPU's integer dot-product instructions, reading the weights as
  the layer holds them (rows or tiles, no second copy): the matrix is read once at 4 or 8
  bits a weight, and the result is the exact path's up to the input's rounding (as in
  llama.cpp's Q4/Q8 decoding).
- other fp32 inputs, or where the kernels cannot be built: the exact path. int8 computes
  `F.linear(x, q.float()) * scale` (the scale factors out of the row), int4 dequantizes its
  codes (kept unpacked, one byte each, for this path) and calls `F.linear`. PyTorch's own
  packed kernels are 10-70x slower than that with fp32 activations.
- bf16 activations on CPU and all CUDA inputs in bf16: PyTorch's packed kernels (repacked
  once, lazily, from the portable layout).

Not here: NF4 for QLoRA (nf4.py), activation quantization, file I/O (checkpoint.py).
"""

from __future__ import annotations

import abc
import logging

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import ConfigError
from weightsmith.models.linear import Linear
from weightsmith.models.model import SparseMoE
from weightsmith.quant import cpu_kernels
from weightsmith.quant import tiles as qtiles
from weightsmith.quant.legacy_blocks import weighted_int4

#: fp32 CPU inputs with at most this many rows use the C kernels. Measured on the default
#: model's shapes (2 cores): the kernels beat dequantize + `F.linear` up to a few rows and
#: tie around 16, where the matmul stops being bound by reading the weights.
KERNEL_MAX_ROWS = 8
#: The same for a layer in 16-row tiles (the decode layout), whose kernels reuse each tile's
#: weights for every input row. Measured on the default model's 210 projections (2 cores, Intel
#: Xeon AVX-512): int4 tiles beat dequantize + `F.linear` 8.6x at 8 rows, 2.2x at 128 and still
#: 1.3x at 512 with AVX512-VNNI; forced to AVX2 there 1.03x at 128 and 0.8x at 256 (torch's
#: matmul kept its AVX-512). On an AMD EPYC (AVX2 only, torch's matmul AVX2 too), a 5632 x 2048
#: layer at 512 rows took 0.58-0.96x the time of dequantize + `F.linear` (int4 g32, int8, Q4_K,
#: Q8_0 tiles; the GGUF types' dequantize untiles first) and 0.73-0.92x at 2048. One limit for
#: every instruction set, so which path a prompt takes, and its rounding, does not depend on the
#: CPU.
TILED_KERNEL_MAX_ROWS = 512

log = logging.getLogger(__name__)

BITS = (8, 4)
#: fp16's largest finite value and its smallest positive (subnormal) one: int4's scales and zeros.
FP16_MAX, FP16_TINY = 65504.0, 2.0**-24
GROUP_SIZES = (32, 64, 128)


# -- quantize / dequantize ----------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (q int8 (N, K), scales fp32 (N,)), symmetric per output channel."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def dequantize_int8(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (q.to(torch.float32) * scales[:, None].float()).to(dtype)  # (N, K)


def check_group_size(k: int, group_size: int, name: str) -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(
            f"group size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"
        )
    if k % group_size:
        raise ConfigError(
            f"tensor {name!r}: input dimension {k} is not divisible by group size {group_size}; "
            "choose a group size that divides it, or keep this module in full precision"
        )


def quantize_int4(
    w: torch.Tensor, group_size: int, name: str = "weight", importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> (codes uint8 (N, K) in 0..15, scales fp16 (N, K/G), zeros fp16 (N, K/G)),
    w ~ q * scale + zero, the codes chosen against the fp16 scale and zero; with `importance`
    (K,), an importance matrix's row, each group is fitted under it (legacy_blocks.py)."""
    n, k = w.shape
    check_group_size(k, group_size, name)
    g = w.detach().float().reshape(n, k // group_size, group_size)  # (N, K/G, G)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, K/G)
    top = float(torch.maximum(lo.abs(), hi.abs()).max()) if g.numel() else 0.0
    if not top <= FP16_MAX / 2:  # (also NaN) the range (max - min) must fit fp16 too
        raise ConfigError(
            f"tensor {name!r} has weights of magnitude {top:.4g}, beyond what int4's fp16 scales and "
            f"zeros hold (|w| <= {FP16_MAX / 2:g}); keep this module in full precision or use int8"
        )
    if importance is not None:
        return weighted_int4(w, importance, group_size)
    zeros = lo.half()
    scales = ((hi - zeros.float()) / 15).clamp(min=FP16_TINY).half()
    q = (g - zeros.float()[..., None]) / scales.float()[..., None]
    return torch.round(q).clamp(0, 15).to(torch.uint8).reshape(n, k), scales, zeros


def dequantize_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """codes (N, K) uint8 -> w (N, K)."""
    n, k = codes.shape
    groups = scales.shape[1]
    w = codes.reshape(n, groups, k // groups).to(torch.float32)  # (N, K/G, G)
    return w.mul_(scales[..., None].float()).add_(zeros[..., None].float()).reshape(n, k).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (N, K/2) uint8, low nibble first (the portable layout)."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> codes (N, K) uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# -- layers -------------------------------------------------------------------


class QuantizedLinear(qtiles.Tiled, nn.Module, abc.ABC):
    """Common part: shapes, an optional full-precision bias, `weight` for inspection, and the
    decode layout (qtiles.Tiled)."""

    bits: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._runtime: dict[str, torch.Tensor] = {}  # lazily built kernel forms, not saved
        #: The weights as 16-row tiles (uint8) after `tile_into`, the PORTABLE buffers then None.
        self.tiles: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (N, K), materialised on each access: for inspection only."""
        return self.dequantize().to(self.device)

    @property
    def device(self) -> torch.device:
        held = (*self._buffers.values(), getattr(self, "tiles", None))  # an int4 layer may hold tiles
        return next(t for t in held if t is not None).device

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full-precision weight (N, K) these codes stand for."""

    def _apply(self, fn, recurse=True):  # a move (.to, .cuda) sees the portable buffers, drops kernel forms
        self.untile()
        self._runtime = {}
        return super()._apply(fn, recurse)

    def kernel_rows(self) -> int:
        """The most rows of fp32 CPU input this layer sends to the C kernels."""
        return TILED_KERNEL_MAX_ROWS if self.tiles is not None else KERNEL_MAX_ROWS

    def _kernels(self, x: torch.Tensor):
        """The C kernel library when this input should use it, else None."""
        if (
            x.dtype != torch.float32
            or x.device.type != "cpu"
            or x.numel() > self.kernel_rows() * self.in_features
        ):
            return None
        return cpu_kernels.library()

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        tiled = ", tiled" if self.tiles is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{tiled}"


class Int8Linear(QuantizedLinear):
    """y = x @ (q * scale).T + bias with q int8 (N, K), scale per output channel."""

    bits = 8

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        n, k = qweight.shape
        super().__init__(k, n, bias)
        self.register_buffer("qweight", qweight)  # int8 (N, K)
        self.register_buffer("scales", scales.float())  # (N,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, s = quantize_int8(linear.weight)
        return cls(q, s, linear.bias)

    def aligned_qweight(self) -> torch.Tensor:
        """The weight at a 64-byte-aligned address: PyTorch's int8 CPU kernel (bf16 inputs)
        segfaults otherwise (e.g. on a tensor read straight from a safetensors file)."""
        q = self.rows()[0]
        if q.is_cuda or (q.is_contiguous() and q.data_ptr() % 64 == 0):
            return q
        if "aligned" not in self._runtime:
            self._runtime["aligned"] = q.clone()
        return self._runtime["aligned"]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(*self.rows(), dtype)

    def tile_format(self) -> qtiles.TileFormat | None:
        n, k = self.out_features, self.in_features
        if not qtiles.can_tile_int8(n, k):
            return None
        return qtiles.TileFormat(
            qtiles.nbytes_int8(n, k), qtiles.tile_int8, lambda t: qtiles.untile_int8(t, n, k)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            flat = x.reshape(-1, self.in_features)  # (M, K)
            y = torch.ops.aten._weight_int8pack_mm(
                flat, self.aligned_qweight(), self.rows()[1].to(x.dtype)
            )  # (M, N)
            return self._add_bias(y.view(*x.shape[:-1], self.out_features))
        lib = self._kernels(x)
        if lib is not None:
            bias = None if self.bias is None else self.bias.float()
            if self.tiles is not None:
                return cpu_kernels.tiled_matmul(lib, x, self.tiles, self.out_features, 8, None, bias)
            return cpu_kernels.int8_matmul(lib, x, self.qweight, self.scales, bias)  # any alignment
        # Exact path: the per-row scale factors out of the matmul.
        lib = cpu_kernels.library() if self.tiles is not None and x.dtype == torch.float32 else None
        if lib is not None:  # the float codes straight from the tiles
            qweight, scales = cpu_kernels.int8_tiled_dequantize(
                lib, self.tiles, self.out_features, self.in_features
            )
        else:
            qweight, scales = self.rows()
        y = F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)  # (..., N)
        return self._add_bias(y)


class Int4Linear(QuantizedLinear):
    """y = x @ (q * scale + zero).T + bias with 4-bit codes q, one (scale, zero) per group of G inputs."""

    bits = 4
    PORTABLE = ("qweight", "scales", "zeros")

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        n, half = qweight.shape
        super().__init__(half * 2, n, bias)
        self.group_size = group_size
        self.register_buffer("qweight", qweight)  # uint8 (N, K/2), portable layout
        self.register_buffer("scales", scales.to(torch.float16))  # (N, K/G)
        self.register_buffer("zeros", zeros.to(torch.float16))  # (N, K/G)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int, name: str = "weight", importance: torch.Tensor | None = None
    ) -> Int4Linear:
        codes, scales, zeros = quantize_int4(linear.weight, group_size, name, importance)
        return cls(pack_nibbles(codes), scales, zeros, group_size, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qweight, scales, zeros = self.rows()
        return dequantize_int4(unpack_nibbles(qweight), scales, zeros, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def tile_format(self) -> qtiles.TileFormat | None:
        n, k, g = self.out_features, self.in_features, self.group_size
        if not qtiles.can_tile_int4(n, k, g):
            return None
        return qtiles.TileFormat(
            qtiles.nbytes_int4(n, k, g),
            lambda q, s, z: qtiles.tile_int4(q, s, z, g),
            lambda t: qtiles.untile_int4(t, n, k, g),
        )

    def _apply(self, fn, recurse=True):
        """The scales and zeros stay fp16: a model cast to fp32 or bf16 keeps its int4 values."""
        self.untile()
        scales, zeros = self.scales, self.zeros
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self._buffers["scales"] = scales.to(self.scales.device)
            self._buffers["zeros"] = zeros.to(self.zeros.device)
        return self

    def _kernel_path(self, x: torch.Tensor) -> bool:
        """bf16 only; on CUDA the tinygemm tiles also need K % 128 == 0 and N % 8 == 0."""
        if x.dtype != torch.bfloat16:
            return False
        return not x.is_cuda or (_inner_k_tiles(self.in_features) > 0 and self.out_features % 8 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_path(x):
            flat = x.reshape(-1, self.in_features)  # (M, K)
            packed, sz = self._packed(x.is_cuda)
            if x.is_cuda:
                y = torch.ops.aten._weight_int4pack_mm(flat, packed, self.group_size, sz)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, sz)
            return self._add_bias(y.view(*x.shape[:-1], self.out_features))
        lib = self._kernels(x)
        if lib is not None:
            bias = None if self.bias is None else self.bias.float()
            if self.tiles is not None:
                return cpu_kernels.tiled_matmul(
                    lib, x, self.tiles, self.out_features, 4, self.group_size, bias
                )
            return cpu_kernels.int4_matmul(
                lib, x, self.qweight, self.scales, self.zeros, self.group_size, bias
            )
        w = self._exact_weight(x.dtype)  # (N, K)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _exact_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight for the exact path, made per call (the codes are held once,
        packed): by the C kernels for fp32 on the CPU, ~10x faster than unpacking in torch."""
        lib = cpu_kernels.library() if dtype == torch.float32 and self.device.type == "cpu" else None
        if lib is not None and self.tiles is not None:
            return cpu_kernels.int4_tiled_dequantize(
                lib, self.tiles, self.out_features, self.in_features, self.group_size
            )
        if lib is not None:
            return cpu_kernels.int4_dequantize(lib, self.qweight, self.scales, self.zeros, self.group_size)
        return self.dequantize(dtype)

    def _packed(self, cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The tinygemm packed weight and its scales_and_zeros (K/G, N, 2) bf16, built once."""
        if "packed" not in self._runtime:
            qweight, scales, zeros = self.rows()
            codes = unpack_nibbles(qweight)  # (N, K)
            if cuda:
                # The CUDA op takes uint8 (N, K/2) with the first code of each pair in the high nibble.
                hi_first = (codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous()
                packed = torch.ops.aten._convert_weight_to_int4pack(
                    hi_first, _inner_k_tiles(self.in_features)
                )
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            scales, zeros = scales.float(), zeros.float()
            sz = torch.stack([scales, zeros + 8 * scales], dim=-1)  # (N, K/G, 2)
            self._runtime["packed"] = packed
            self._runtime["sz"] = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/G, N, 2)
        return self._runtime["packed"], self._runtime["sz"]


def _inner_k_tiles(k: int) -> int:
    """tinygemm's inner K tiling (8, 4 or 2 tiles of 16) that divides K; 0 if none does."""
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), 0)


# -- whole models -------------------------------------------------------------


def check_quant_args(bits: int, group_size: int | None) -> int | None:
    """Validate (bits, group_size); returns the group size to use (None for int8)."""
    if bits not in BITS:
        raise ConfigError(f"bits {bits} is not supported; use 8 (int8) or 4 (int4)")
    if bits == 8:
        return None
    group_size = 32 if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise ConfigError(
            f"--group-size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"
        )
    return group_size


def quantizable_modules(model: nn.Module, *, lm_head: bool = False) -> list[str]:
    """Names of the projections weight-only quantization replaces (every `Linear`, in the CPU
    decode layout or not; the LM head only if asked; MoE routers never: they are tiny and
    decide which experts run)."""
    routers = {f"{n}.{m.router_name}" for n, m in model.named_modules() if isinstance(m, SparseMoE)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or name in routers:
            continue
        if name == "lm_head" and not lm_head:
            continue
        names.append(name)
    return names


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int | None = None,
    *,
    lm_head: bool = False,
    head_bits: int | None = None,
    int4_codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    importance: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Replace the model's projections in place by Int8Linear / Int4Linear; returns their names.

    Every shape is checked before any module is replaced, so a bad group size changes nothing.
    With `lm_head=True` on a tied model, the embedding stays full precision and is untied.
    `head_bits` (8 or 4; implies `lm_head`) quantizes the LM head to other bits than the rest,
    e.g. int4 projections with an int8 head, the mix GGUF Q4_0/Q4_1 files ship (Q8_0 output).
    `int4_codes` maps "NAME.weight" to ready (codes, scales, zeros) groups of `group_size`
    (a GGUF file's Q4_0/Q4_1 blocks): those modules take them as they are. `importance` maps a
    module name to its importance matrix row (K,), which weighs that module's int4 fit.
    """
    group_size = check_quant_args(bits, group_size)
    if head_bits is not None:
        check_quant_args(head_bits, group_size if head_bits == 4 else None)
        lm_head = True
    names = quantizable_modules(model, lm_head=lm_head)
    group4 = group_size or 32  # an int4 head under int8 projections takes groups of 32

    def bits_of(name: str) -> int:
        return head_bits if name == "lm_head" and head_bits is not None else bits

    for name in names:
        if bits_of(name) == 4:
            check_group_size(model.get_submodule(name).in_features, group4, f"{name}.weight")
    for name in names:
        linear = model.get_submodule(name)
        ready = (int4_codes or {}).get(f"{name}.weight") if bits_of(name) == 4 else None
        if bits_of(name) == 8:
            new: nn.Module = Int8Linear.from_linear(linear)
        elif (
            ready is not None
            and ready[0].shape == linear.weight.shape
            and ready[1].shape[1] * group4 == linear.in_features
        ):
            codes, scales, zeros = ready
            new = Int4Linear(pack_nibbles(codes), scales, zeros, group4, linear.bias)
        else:
            qw = (importance or {}).get(name)
            new = Int4Linear.from_linear(linear, group4, f"{name}.weight", qw)
        set_submodule(model, name, new)
    if "lm_head" in names:
        untie(model)
    head = f", LM head int{head_bits}" if head_bits is not None and head_bits != bits else ""
    log.info(
        "quantized %d modules to int%d%s%s", len(names), bits, f" g{group_size}" if group_size else "", head
    )
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule `name`, in the mode (train / eval) it was in."""
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(old := getattr(owner, attr, None), nn.Module):
        module.train(old.training)
    setattr(owner, attr, module)


def untie(model: nn.Module) -> None:
    """Mark a CausalLM's config as untied (its LM head is no longer the embedding)."""
    import dataclasses

    cfg = getattr(model, "config", None)
    if cfg is not None and cfg.tie_word_embeddings:
        model.config = dataclasses.replace(cfg, tie_word_embeddings=False)
