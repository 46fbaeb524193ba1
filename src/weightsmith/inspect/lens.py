"""Reading the residual stream in vocabulary space: the logit lens and direct logit attribution.

Logit lens (nostalgebraist, 2020): the residual stream after each layer, put through the
model's final norm and LM head as if it were the last layer, gives that layer's next-token
distribution. Direct logit attribution (Elhage et al., 2021): with the final norm's scale
frozen at its value on the real residual (as TransformerLens's `apply_ln_to_stack`), the
final norm and LM head are linear, so a logit is exactly the sum of what the embedding, each
layer's attention (each head) and each MLP wrote into the stream, plus the projections' biases.

Both work on any projection the model has (quantized, adapted): they call the model's own
modules rather than reading weight matrices.

Not here: running with hooks (trace.py), reports (weightsmith.report.inspect_report).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.inspect.trace import run_hooked
from weightsmith.models.model import CausalLM


def lens_logits(model: CausalLM, resid: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head over residual-stream values (..., h) -> logits (..., V)."""
    return model.logits(resid)


def resid_names(model: CausalLM) -> list[str]:
    """The stream the lens reads: the embedding, then each layer's output."""
    return ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(len(model.model.layers))]


@dataclass
class LogitLens:
    """The lens over one prompt: for each stream point (rows) and token position (columns)."""

    layers: list[str]  # the stream points, embedding first
    tokens: list[int]
    top_ids: torch.Tensor  # (layers, T, k) the k most likely next tokens
    top_probs: torch.Tensor  # (layers, T, k)
    target_ids: torch.Tensor  # (T,) the token each column follows: the model's own prediction
    target_probs: torch.Tensor  # (layers, T) its probability at every layer
    target_ranks: torch.Tensor  # (layers, T) its rank at every layer (0 = top)


@torch.no_grad()
def logit_lens(model: CausalLM, ids: list[int], *, top_k: int = 5, target: int | None = None) -> LogitLens:
    """The logit lens over token ids; `target` (a token id) is followed at every position, by
    default each position's final prediction."""
    names = resid_names(model)
    logits, cache = run_hooked(model, torch.tensor([ids]), keep=names)
    stream = torch.stack([cache[n][0] for n in names])  # (L+1, T, h)
    probs = lens_logits(model, stream).float().softmax(-1)  # (L+1, T, V)
    if target is None:
        targets = logits[0].argmax(-1)  # (T,)
    else:
        targets = torch.full((len(ids),), target, dtype=torch.long)
    targets = targets.to(probs.device)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    target_probs = probs.gather(-1, targets.expand(len(names), -1)[..., None])[..., 0]  # (L+1, T)
    ranks = (probs > target_probs[..., None]).sum(-1)
    return LogitLens(names, list(ids), top.indices, top.values, targets, target_probs, ranks)


@dataclass
class LogitAttribution:
    """How much each component wrote along one logit (difference) at one position."""

    position: int
    target: int
    contrast: int | None
    logit: float  # the model's own logit (difference), before a final soft-cap (Gemma 2)
    embed: float
    attn: torch.Tensor  # (L,) each attention block, biases included
    mlp: torch.Tensor  # (L,) each MLP
    heads: torch.Tensor  # (L, H) each head, the output projection's bias excluded
    bias: float  # everything that is no component's: the LM head's bias

    def total(self) -> float:
        """Sum of all parts; equals `logit` (the decomposition is exact)."""
        return self.embed + float(self.attn.sum()) + float(self.mlp.sum()) + self.bias


def _through(norm: torch.nn.Module, parts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """parts (N, h) through an RMSNorm whose scale is frozen at `scale` (linear, so the parts of a
    sum give the parts of its norm); Gemma's norms multiply by (1 + w) in fp32."""
    if norm.offset:
        return ((parts.float() / scale) * (1.0 + norm.weight.float())).to(parts.dtype)
    if norm.fp32_scale:  # OLMo 2's
        return ((parts.float() / scale) * norm.weight.float()).to(parts.dtype)
    return norm.weight * (parts.float() / scale).to(parts.dtype)


def _readout(model: CausalLM, parts: torch.Tensor, scale: torch.Tensor, target: int, contrast: int | None):
    """Logit (difference) each of parts (N, h) contributes through the frozen final norm, LM head
    bias removed: (N,)."""
    head = model.lm_head
    x = _through(model.model.norm, parts, scale)
    out = head(x) - head(torch.zeros_like(x[:1]))  # (N, V)
    return out[:, target] - (out[:, contrast] if contrast is not None else 0)


@torch.no_grad()
def direct_logit_attribution(
    model: CausalLM, ids: list[int], target: int, *, contrast: int | None = None, position: int = -1
) -> LogitAttribution:
    """Split the logit of `target` (minus `contrast`'s) at `position` over the model's components.

    Each part goes through the final norm with its scale frozen at the run's; in Gemma's blocks a
    head's output goes through the attention's output norm the same way, so the heads still sum
    to their block. A final soft-cap (Gemma 2) is left out: the parts sum to the logit before it."""
    layers = model.model.layers
    n_layers = len(layers)
    gemma = hasattr(layers[0], "post_feedforward_layernorm")  # outputs normed: Gemma, OLMo 2
    names = ("hook_attn_out", "hook_mlp_out", "attn.hook_z", *(("ln1_post.hook_scale",) if gemma else ()))
    keep = ["blocks.0.hook_resid_pre", f"blocks.{n_layers - 1}.hook_resid_post", "ln_final.hook_scale"]
    keep += [f"blocks.{i}.{n}" for i in range(n_layers) for n in names]
    _, cache = run_hooked(model, torch.tensor([ids]), keep=keep)
    pos = position % len(ids)
    scale = cache["ln_final.hook_scale"][0, pos]  # (1,)
    parts = [cache["blocks.0.hook_resid_pre"][0, pos]]  # the embedding (Gemma's scaled by sqrt(hidden))
    parts += [cache[f"blocks.{i}.hook_attn_out"][0, pos] for i in range(n_layers)]
    parts += [cache[f"blocks.{i}.hook_mlp_out"][0, pos] for i in range(n_layers)]
    values = _readout(model, torch.stack(parts), scale, target, contrast)
    heads = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        z = cache[f"blocks.{i}.attn.hook_z"][0, pos]  # (H, D)
        alone = torch.diag_embed(torch.ones(attn.n_heads, device=z.device, dtype=z.dtype))  # (H, H)
        per_head = (alone[:, :, None] * z[None]).reshape(attn.n_heads, -1)  # (H, H*D): one head each
        written = attn.o_proj(per_head) - attn.o_proj(torch.zeros_like(per_head[:1]))  # (H, h)
        if gemma:
            written = _through(
                layer.post_attention_layernorm, written, cache[f"blocks.{i}.ln1_post.hook_scale"][0, pos]
            )
        heads.append(_readout(model, written, scale, target, contrast))
    uncapped = model.lm_head(model.model.norm(cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, pos]))
    final = uncapped[target] - (uncapped[contrast] if contrast is not None else 0)
    zero = model.lm_head(torch.zeros_like(parts[0])[None])[0]
    bias = zero[target] - (zero[contrast] if contrast is not None else 0)
    return LogitAttribution(
        pos, target, contrast, float(final), float(values[0]), values[1 : 1 + n_layers].cpu(),
        values[1 + n_layers :].cpu(), torch.stack(heads).cpu(), float(bias),
    )  # fmt: skip
