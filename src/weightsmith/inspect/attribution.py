"""Input attribution by integrated gradients over token embeddings, and attention patterns.

Integrated gradients (Sundararajan et al., 2017): the attribution of input i is
(x_i - x'_i) times the average gradient of the output along the straight path from the
baseline x' to the input x. Their sum equals f(x) - f(x') (completeness) once the path
integral is computed accurately; we integrate with Gauss-Legendre quadrature, which for
these smooth paths reaches a given accuracy with far fewer steps than the Riemann sums of
the paper. Here x is the prompt's embedding (the `hook_embed` value), x' is by default the
mean token embedding at every position, and f is one logit (or logit difference) at one
position; a token's attribution is the sum over its embedding dimensions. Not the zero
embedding: RMSNorm is scale-invariant, so along a path from zero nearly all the change
happens in a sliver next to zero (within sqrt(eps) of it), which no quadrature resolves.

Not here: hook points (hooks.py), the logit lens and direct logit attribution (lens.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from weightsmith.inspect.hooks import InspectError
from weightsmith.inspect.trace import run_hooked
from weightsmith.models.model import CausalLM


@dataclass
class Attribution:
    """Integrated-gradients attributions of one output to each prompt token."""

    tokens: list[int]
    target: int
    contrast: int | None
    position: int
    steps: int
    scores: torch.Tensor  # (T,) one per token
    output: float  # f(input)
    baseline_output: float  # f(baseline)

    @property
    def completeness_error(self) -> float:
        """|sum of attributions - (f(input) - f(baseline))|: how accurate the integral is."""
        return abs(float(self.scores.sum()) - (self.output - self.baseline_output))


def _output(target: int, contrast: int | None, position: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: (
        logits[:, position, target] - (logits[:, position, contrast] if contrast is not None else 0)
    )


def integrated_gradients(
    model: CausalLM,
    ids: list[int],
    target: int,
    *,
    contrast: int | None = None,
    position: int = -1,
    steps: int = 32,
    baseline: torch.Tensor | None = None,
    batch: int = 16,
) -> Attribution:
    """Attribute logit[target] (minus logit[contrast]) at `position` to each token of `ids`.

    baseline: (h,) or (T, h) embeddings to start the path from (default: the mean embedding)."""
    if not ids:
        raise InspectError("the prompt is empty; give at least one token of text")
    if steps < 1:
        raise InspectError(f"steps must be at least 1, got {steps}")
    f = _output(target, contrast, position)
    tokens = torch.tensor([ids])
    _, cache = run_hooked(model, tokens, keep=["hook_embed"])
    x = cache["hook_embed"].float()  # (1, T, h)
    if baseline is None:
        baseline = model.model.embed_tokens.weight.detach().float().mean(0)  # (h,) the mean token
    base = baseline.to(x.device).float().expand_as(x)
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32, device=x.device)
    w = torch.tensor(weights / 2, dtype=torch.float32, device=x.device)
    total = torch.zeros_like(x[0])
    for start in range(0, steps, batch):
        a = alphas[start : start + batch]
        path = (base + a[:, None, None] * (x - base)).requires_grad_(True)  # (n, T, h)
        logits, _ = run_hooked(
            model, tokens.expand(len(a), -1), edits={"hook_embed": _replace_with(path)}, grad=True
        )
        (grad,) = torch.autograd.grad(f(logits).sum(), path)
        total += (grad.float() * w[start : start + batch, None, None]).sum(0)
    scores = ((x - base)[0] * total).sum(-1).cpu()  # (T,)
    ends = torch.cat([x, base])
    with torch.no_grad():
        logits, _ = run_hooked(model, tokens.expand(2, -1), edits={"hook_embed": _replace_with(ends)})
        out = f(logits.float())
    return Attribution(
        list(ids), target, contrast, position % len(ids), steps, scores.detach(), float(out[0]), float(out[1])
    )


def _replace_with(value: torch.Tensor):
    return lambda x, name: value.to(x.dtype)


@torch.no_grad()
def attention_patterns(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Every layer's attention pattern over the prompt: (L, H, T, T), rows are queries."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(len(model.model.layers))]
    _, cache = run_hooked(model, torch.tensor([ids]), keep=names)
    return torch.stack([cache[n][0] for n in names]).float().cpu()
