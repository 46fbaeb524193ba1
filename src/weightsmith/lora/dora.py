"""DoRA: a LoRA adapter whose update is split into a direction and a learned magnitude per output.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation". With the base weight W (out, in),
the adapter's s B A and a trained magnitude m (out,), the adapted weight is

    W' = m / ||W + s B A|| * (W + s B A)        (each output row scaled; the norm over its inputs)

and, as the paper's section 4.3 and PEFT do, the norm is treated as a constant (no gradient
flows through it). For an input x the layer then gives, with g = m / ||W + s B A||,

    y = base(x) + (g - 1) * (W x) + g * s B A x  =  g * (W x + s B A x) + bias

(with dropout on the adapter's input in training, W x in the middle term is taken on the dropped
input, as PEFT does). A fresh adapter starts at m = ||W|| (B = 0), so it changes nothing.

The norm is computed without forming W + s B A (an (out, in) matrix per layer and step, which
is what PEFT builds): ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s sum_k B_ik (A W^T)_ki
+ s^2 sum_kl B_ik (A A^T)_kl B_il. ||W||^2 is computed once (the base is frozen), A W^T costs what
B A costs, and the last term is r x r. The norm is kept while A, B and the base weight are
unchanged (inference: one computation, however many tokens), recomputed after each training step.

In PEFT's files the magnitude is `<module>.lora_magnitude_vector` (in memory
`<module>.lora_magnitude_vector.<adapter>.weight`), with `use_dora: true` in the config.

Not here: the LoRA layer that calls these (layers.py), the files (files.py), the C decode step's
form of the same sum (quant/cpu_decode.c: g and the bias per output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import ConfigError
from weightsmith.models.model import SparseMoE


class Magnitude(nn.Module):
    """One adapter's magnitude vector m (out,), as PEFT holds it (`lora_magnitude_vector.<name>.weight`)."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(m)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight (out, in) as it multiplies: a float layer's parameter itself, a
    quantized layer's (NF4, int4, int8, GGUF blocks) dequantized to fp32."""
    if hasattr(base, "dequantized_weight"):  # NF4 (QLoRA)
        return base.dequantized_weight(torch.float32)
    return base.weight


def _version(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t._version


class Norms:
    """A layer's ||W_i||^2 (computed once) and, per adapter, ||W + s B A|| while its inputs last."""

    def __init__(self) -> None:
        self.base_key: tuple | None = None
        self.base_sq: torch.Tensor | None = None  # (out,) fp32
        self.norms: dict[str, tuple[tuple, torch.Tensor]] = {}

    def _base(self, base: nn.Module, w: torch.Tensor) -> torch.Tensor:
        held = [t for t in (*base.parameters(), *base.buffers()) if t is not None]
        key = tuple(_version(t) for t in held)
        if self.base_sq is None or key != self.base_key:
            self.base_sq = w.detach().float().pow(2).sum(1)
            self.base_key = key
        return self.base_sq

    @torch.compiler.disable  # a cache lookup by tensor versions: eager, outside a compiled layer's graph
    @torch.no_grad()
    def norm(self, layer: nn.Module, name: str) -> torch.Tensor:
        """||W + s B A|| per output row (out,), fp32, detached."""
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        base = layer.base_layer
        key = (
            _version(a), _version(b), layer.scaling[name], torch.is_inference_mode_enabled(),
            tuple(_version(t) for t in (*base.parameters(), *base.buffers()) if t is not None),
        )  # fmt: skip
        hit = self.norms.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        w = dense_weight(base)
        with torch.autocast(w.device.type, enabled=False):  # fp32 sums under a bf16 training step too
            base_sq = self._base(base, w)
            a32, b32 = a.detach().float(), b.detach().float()
            if w.dtype == torch.float32:
                aw = F.linear(a32, w.detach())  # (r, out) = A W^T
            else:  # a half-precision weight multiplies in its dtype, the sum taken in fp32
                aw = F.linear(a32.to(w.dtype), w.detach()).float()
            s = layer.scaling[name]
            cross = (b32 * aw.t()).sum(1)  # sum_k B_ik (A W^T)_ki
            quad = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
            norm = (base_sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()
        self.norms[name] = (key, norm)
        return norm

    def forget(self, name: str) -> None:
        self.norms.pop(name, None)


def initial_magnitude(layer: nn.Module, name: str) -> torch.Tensor:
    """m for a new adapter: ||W + s B A|| (B = 0 for a fresh one: the base rows' norms), fp32."""
    return layer.dora_norms.norm(layer, name).clone()


def scale(layer: nn.Module, name: str) -> torch.Tensor:
    """g = m / ||W + s B A|| (out,): gradient to m only."""
    return layer.lora_magnitude_vector[name].weight / layer.dora_norms.norm(layer, name)


def add(
    layer: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, row_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """y (base_layer(x)) plus the adapter's DoRA delta (g - 1) * (W x) + g * s B A x; with
    `row_mask` ((B, 1, ...): 1 on the rows that take the adapter, 0 elsewhere), only on those rows."""
    a, b = layer.lora_A[name].weight.to(x.dtype), layer.lora_B[name].weight.to(x.dtype)
    dropout, base = layer.lora_dropout[name], layer.base_layer
    dropping = layer.training and not isinstance(dropout, nn.Identity)
    xd = dropout(x) if dropping else x
    h = F.linear(xd, a)  # (..., r)
    g = scale(layer, name).to(y.dtype)  # (out,)
    bias = getattr(base, "bias", None)
    wx = base(xd) if dropping else y  # W x (+ bias), on the dropped input while dropping out
    if bias is not None:
        wx = wx - bias.to(wx.dtype)
    # (g - 1) * Wx + g * s * h B^T = g * (Wx + s * h B^T) - Wx: one addmm, one scale.
    t = torch.addmm(
        wx.reshape(-1, wx.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=layer.scaling[name]
    )
    delta = t.view(y.shape) * g - wx
    return y + (delta if row_mask is None else delta * row_mask)


def refuse_in_moe(model: nn.Module, names: list[str]) -> None:
    """DoRA on a mixture of experts' experts or router is refused (PEFT refuses DoRA on them too)."""
    moe = [n + "." for n, m in model.named_modules() if isinstance(m, SparseMoE)]
    inside = [n for n in names if any(n.startswith(prefix) for prefix in moe)]
    if inside:
        raise ConfigError(
            f"DoRA cannot adapt {inside[0]}, inside a mixture of experts (PEFT refuses DoRA on experts and "
            "routers too); target the attention only, e.g. target_modules q_proj,k_proj,v_proj,o_proj"
        )


def refuse_mix(layer: nn.Module, name: str) -> None:
    """A DoRA adapter's norm is taken over the base weight alone: nothing else may be merged with it."""
    others = [n for n in layer.merged if n != name]
    doras = layer.lora_magnitude_vector
    if others and (name in doras or any(n in doras for n in others)):
        raise ConfigError(
            f"adapter {name!r} and the merged {others[0]!r} cannot both be in the weights when one is DoRA "
            "(its norm is over the base weight alone); unmerge the other first"
        )


def _merged(layer: nn.Module, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g * (W + s B A) in fp32, the norm g divides by) for the base weight `weight` (W)."""
    norm = layer.dora_norms.norm(layer, name)
    g = (layer.lora_magnitude_vector[name].weight.detach().float() / norm)[:, None]
    return g * (weight.float() + layer.delta_lora(name).to(weight.device)), norm


def delta(layer: nn.Module, name: str) -> torch.Tensor:
    """g * (W + s B A) - W in fp32: what the adapter adds to the base weight."""
    refuse_mix(layer, name)
    w = dense_weight(layer.base_layer).detach()
    return _merged(layer, name, w)[0] - w.float()


def merge(layer: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The merged weight g * (W + s B A) in fp32; the norm is kept to unmerge (the merged weight's
    own norm is another)."""
    merged, layer.merged_norms[name] = _merged(layer, name, weight)
    return merged


def unmerge(layer: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """W again from the merged W' = g * (W + s B A), with the norm used at the merge, in fp32."""
    g = (layer.lora_magnitude_vector[name].weight.detach().float() / layer.merged_norms.pop(name))[:, None]
    return weight.float() / g - layer.delta_lora(name).to(weight.device)
