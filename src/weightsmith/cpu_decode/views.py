"""The C decode step's view of a model's parts (quant/cpu_decode.c's structs): projections, LoRA
adapters, layers and the model, as ctypes structures, and the functions that point them at a
layer's tensors where they are.

`proj_view` reads an int4, int8, GGUF-block or fp32/bf16 projection (a LoRA layer's base layer);
`lora_view` an adapter's A and B; `row_names` says which adapter each row of a step takes now.
A bf16 (or Gemma's offset) norm weight or bias is read through an fp32 copy (`fp32_copy`), which
`fused.FusedDecode.current` checks against its source before each generation.

Not here: building a model's struct and calling the step (fused.py), the kernels (weightsmith.quant).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from weightsmith.models.linear import Linear
from weightsmith.quant import cpu_kernels
from weightsmith.quant.ggml_linear import GGMLLinear
from weightsmith.quant.weight_only import Int4Linear, Int8Linear

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
#: A layer's norms as `LayerStruct` names them (`_layer_norms` gives them in this order).
NORMS = ("norm1", "norm2", "attn_norm", "mlp_norm", "q_norm", "k_norm")


class Proj(ctypes.Structure):
    _fields_ = [(f, _i64) for f in ("kind", "n", "k", "group", "ld")] + [
        (f, _ptr) for f in ("q", "scales", "zeros", "bias")
    ]


class LoraView(ctypes.Structure):
    _fields_ = [("a", Proj), ("b", Proj), ("scale", ctypes.c_double), ("mag", _ptr)]


class LayerStruct(ctypes.Structure):
    _fields_ = (
        [("norm1", _ptr), ("norm2", _ptr)]
        + [(p, Proj) for p in PROJECTIONS]
        + [("window", _i64), ("rope", _i64)]
        + [(f, _ptr) for f in NORMS[2:]]
        + [(f, _i64) for f in ("n_experts", "top_k", "renorm")]
        + [("router", Proj), ("experts", ctypes.POINTER(Proj)), ("lora", ctypes.POINTER(LoraView) * 7)]
        + [("router_lora", ctypes.POINTER(LoraView)), ("expert_lora", ctypes.POINTER(LoraView))]
        + [("sinks", _ptr)]
    )


class ModelStruct(ctypes.Structure):
    _fields_ = [(f, _i64) for f in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter")] + [
        ("eps", ctypes.c_double),
        ("layers", ctypes.POINTER(LayerStruct)),
        ("final_norm", _ptr),
        ("head", Proj),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
    ] + [(f, _i64) for f in ("s_layer", "s_row", "s_head", "s_pos", "kv_bf16")] + [
        ("embed", _ptr), ("embed_ld", _i64), ("embed_bf16", _i64),
    ] + [(f, _i64) for f in ("rot_dim", "act", "qk_whole")] + [
        (f, ctypes.c_double) for f in ("attn_scale", "attn_cap", "embed_scale")
    ] + [(f, _ptr) for f in ("cos_local", "sin_local")] + [("lora_rank", _i64), ("n_adapters", _i64)] + [
        ("row_adapter", _ptr), ("swiglu_alpha", ctypes.c_double), ("swiglu_limit", ctypes.c_double),
        ("kv_i8", _i64), ("k_scale", _ptr), ("v_scale", _ptr),
    ]  # fmt: skip


#: The C step's activations (`ModelStruct.act`) by config.json name; 2 is gpt-oss's clamped SwiGLU
#: (a "silu" model with `swiglu_limit`).
ACTS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1}
CLAMPED_SWIGLU = 2


def fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu")


def float_cpu(t: torch.Tensor | None) -> bool:
    """fp32 or bf16 on the CPU: what the C step reads (bf16 weights in place, bf16 vectors as
    fp32 copies)."""
    return t is None or (t.dtype in (torch.float32, torch.bfloat16) and t.device.type == "cpu")


#: The kinds of a dense weight by dtype: (rows, columns) layout (quant/cpu_kernels.h).
DENSE_KINDS = {torch.float32: (32, 33), torch.bfloat16: (48, 49)}


def fp32_copy(t: torch.Tensor, keep: list[torch.Tensor], copies: list, add: float = 0.0) -> torch.Tensor:
    """`t` (+ `add`) as the C step reads it: itself (fp32, nothing added), or an fp32 copy
    remembered in `copies` with its source and `add`, so that `FusedDecode.current` notices a
    source changed in place."""
    t = t.detach()
    if t.dtype == torch.float32 and not add:
        out = t.contiguous()
    else:
        out = (t.float() + add if add else t.float()).contiguous()
        copies.append((t, out, add))
    keep.append(out)
    return out


def proj_view(module: nn.Module, keep: list[torch.Tensor], copies: list) -> Proj | None:
    """The C view of one projection (a LoRA layer's base layer), or None if the step cannot run it."""
    if is_lora(module):
        module = module.base_layer
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if bias is not None:
        if not float_cpu(bias):
            return None
        bias = fp32_copy(bias, keep, copies)
    p = Proj(n=module.out_features, k=module.in_features, bias=None if bias is None else bias.data_ptr())
    if type(module) in (Int4Linear, Int8Linear) and module.tiles is not None:  # 16-row tiles
        tiles = module.tiles
        keep.append(tiles)
        p.kind, p.q = (5, tiles.data_ptr()) if type(module) is Int4Linear else (9, tiles.data_ptr())
        p.group = getattr(module, "group_size", 0)
    elif type(module) is Int4Linear:
        fp16 = all(t.dtype == torch.float16 and t.device.type == "cpu" for t in (module.scales, module.zeros))
        if module.qweight.device.type != "cpu" or not fp16:
            return None
        codes = module.qweight.contiguous()
        scales, zeros = module.scales.contiguous(), module.zeros.contiguous()
        keep += [codes, scales, zeros]
        p.kind, p.group, p.q = 4, module.group_size, codes.data_ptr()
        p.scales, p.zeros = scales.data_ptr(), zeros.data_ptr()
    elif type(module) is Int8Linear:
        if module.qweight.device.type != "cpu" or not fp32_cpu(module.scales):
            return None
        q, scales = module.qweight.contiguous(), module.scales.contiguous()  # any alignment
        keep += [q, scales]
        p.kind, p.q, p.scales = 8, q.data_ptr(), scales.data_ptr()
    elif type(module) is GGMLLinear and module.tiles is not None:  # Q4_0 / Q4_K / Q8_0 tiles
        keep.append(module.tiles)
        bits = GGMLLinear.TILED[module.qtype][0]
        p.kind, p.q = cpu_kernels.TILE_KINDS[bits, module.qtype], module.tiles.data_ptr()
        p.group = 32 if bits == 4 else 0
    elif type(module) is GGMLLinear:
        if module.qweight.device.type != "cpu":
            return None
        blocks = module.qweight.contiguous()
        keep.append(blocks)
        p.kind, p.group, p.q = 16, module.qtype, blocks.data_ptr()  # group: the ggml type
    elif not (isinstance(module, Linear) and dense_view(p, module.weight, keep)):  # SplitLinear too
        return None
    return p


def dense_view(p: Proj, w: torch.Tensor, keep: list[torch.Tensor]) -> bool:
    """Point `p` at the fp32 or bf16 matrix `w` (n, k) on the CPU, rows or columns contiguous;
    False where the step cannot read it."""
    if not float_cpu(w):
        return False
    w = w.detach()
    rows, cols = DENSE_KINDS[w.dtype]
    if w.stride(1) == 1:
        p.kind, p.ld = rows, w.stride(0)
    elif w.stride(0) == 1:
        p.kind, p.ld = cols, w.stride(1)
    else:
        return False
    keep.append(w)
    p.q = w.data_ptr()
    return True


def is_lora(module: nn.Module) -> bool:
    """Whether `module` is a LoRALinear (weightsmith.lora, a layer above this package, which
    therefore knows it by its attributes)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "row_groups")


def row_names(layer: nn.Module, rows: int) -> tuple[str | None, ...] | None:
    """The adapter each of a step's `rows` rows takes, as every LoRA layer adds it now (`layer` is
    one of them, `row_adapters` setting all alike): the active adapter on every row, or inside
    `row_adapters` each row's; None where the C step cannot follow them (a CUDA graph's row codes,
    a batch of another size than `row_adapters` was given)."""
    if layer.row_index is not None:
        return None
    if layer.row_groups is None:
        return (layer.active_adapter,) * rows
    names = layer.row_names
    return names if names is not None and len(names) == rows else None


def dora_versions(layer: nn.Module) -> tuple:
    """A LoRA layer's DoRA adapters' A, B, magnitude and base tensors as they are now (address and
    version): the C step's DoRA scales are computed from them."""
    held = [
        t
        for name in layer.lora_magnitude_vector
        for t in (
            layer.lora_A[name].weight,
            layer.lora_B[name].weight,
            layer.lora_magnitude_vector[name].weight,
        )
    ]
    if held:
        held += [t for t in (*layer.base_layer.parameters(), *layer.base_layer.buffers()) if t is not None]
    return tuple((t.data_ptr(), t._version) for t in held)


def dropping_out(layer: nn.Module) -> set[str]:
    """The adapters of a LoRA layer whose dropout is on (training mode, p > 0): the C step has none."""
    return {
        name for name, d in layer.lora_dropout.items() if isinstance(d, nn.Dropout) and d.training and d.p > 0
    }


def lora_view(module: nn.Module, name: str, keep: list[torch.Tensor]) -> LoraView | None:
    """The C view of adapter `name` of a LoRA layer, or None where the step cannot read it (also
    where A and B do not fit the layer: the C step would read past the input, the PyTorch step
    raises)."""
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[1] != module.in_features
        or b.shape != (module.out_features, a.shape[0])
    ):
        return None
    lora = LoraView(scale=module.scaling[name])
    lora.a.n, lora.a.k = a.shape
    lora.b.n, lora.b.k = b.shape
    if name in module.lora_magnitude_vector:  # DoRA: g = m / ||W + s B A|| per output, as it is now
        g = module.dora_scale(name).to("cpu", torch.float32).contiguous()
        keep.append(g)
        lora.mag = g.data_ptr()
    return lora if dense_view(lora.a, a, keep) and dense_view(lora.b, b, keep) else None
