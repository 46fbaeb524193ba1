"""Rotary position embeddings (RoPE) and the context-extension scalings found in configs.

Computes inverse frequencies for the plain RoFormer rotation and its `linear`
(position interpolation), `llama3` (Meta's frequency-band rescaling), `yarn`
(Peng et al. 2023, arXiv:2309.00071) and `longrope` (Phi-3's per-frequency factors, a short
set and a long one) variants, over the first `rotary_dim` of each head's dimensions (all of
them but where a partial_rotary_factor says), and applies the rotation in the "rotate half"
layout HF checkpoints are trained with. Not here: deciding which variant a model uses (that
is `ModelConfig.rope_scaling`), or when LongRoPE's long set applies (model.py).
"""

from __future__ import annotations

import math

import torch

from weightsmith.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return `(inv_freq (D/2,), attention_scaling)` for the config's RoPE variant.

    On the CPU whatever the default device (the caller moves it): on the meta device torch
    would run these ops through its Python reference ops, whose import costs ~2 s."""
    dim = cfg.rotary_dim
    base = cfg.rope_theta
    inv_freq = plain_inverse_frequencies(dim, base)
    scaling = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind == "longrope":
        short = torch.tensor(scaling["short_factor"], dtype=torch.float32, device="cpu")
        return inv_freq / short, longrope_attention_factor(cfg)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return llama3_scaled(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(dim, base, scaling, cfg.max_position_embeddings)
    raise AssertionError(f"unvalidated rope type {kind}")


def longrope_long_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """LongRoPE's inverse frequencies past the original context (its `long_factor` set)."""
    factors = torch.tensor((cfg.rope_scaling or {})["long_factor"], dtype=torch.float32, device="cpu")
    return plain_inverse_frequencies(cfg.rotary_dim, cfg.rope_theta) / factors


def longrope_attention_factor(cfg: ModelConfig) -> float:
    """LongRoPE's cos/sin factor, given or sqrt(1 + ln(factor) / ln(original context)), the
    factor being the context's extension (both sets take it, as transformers does)."""
    s = cfg.rope_scaling or {}
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    original = float(s["original_max_position_embeddings"])
    factor = float(s.get("factor") or cfg.max_position_embeddings / original)
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def plain_inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    """RoFormer's inverse frequencies base^(-2i/dim), i < dim/2 (no scaling)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band in between interpolated smoothly."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(in_band, blended, scaled)


def _yarn(dim: int, base: float, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp linearly between
    the dimensions that complete `beta_slow` and `beta_fast` rotations in the original
    context; scale attention by 0.1 ln(factor) + 1 (the paper's `mscale`)."""
    old_ctx = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / old_ctx
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolate = 1 - ramp  # 1 where the original frequency is kept
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions (B, T) -> two (B, 1, T, D) tensors.

    Computed in fp32 then cast, as the reference implementation does, so bf16 models
    do not lose position precision."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position: x*cos + rotate_half(x)*sin, halves layout. Tables of fewer
    dimensions than D (a partial_rotary_factor) turn the first ones and pass the rest."""
    d = cos.shape[-1]
    if d < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    half = d // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The x that `apply_rope(x, cos, sin)` turned into this one. apply_rope multiplies by s*R(theta),
    s the tables' attention factor: undone by R(-theta) / s^2."""
    d = cos.shape[-1]
    if d < x.shape[-1]:
        return torch.cat((undo_rope(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    return apply_rope(x, cos, -sin) / (cos * cos + sin * sin)
