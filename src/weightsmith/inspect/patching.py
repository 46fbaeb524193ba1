"""Activation patching (causal tracing): which activations carry the difference between a clean
and a corrupted prompt.

Run the corrupted prompt, but put back one activation from the clean run: one layer's stream
at one token position, or one attention head's output (`hook_z`) at every position. The
metric (by default the logit difference between the clean and the corrupted answer at the
last position) says how much of the clean behaviour that one activation restores: 1 = all
of it, 0 = none. Meng et al. (2022) "Locating and editing factual associations in GPT";
Wang et al. (2023) "Interpretability in the wild" (path and head patching); the metric and
normalisation follow Heimersheim & Nanda (2024) "How to use and interpret activation patching".

Each layer's patches run as one batch (one row per position or head); a result equals running
the corrupted prompt alone with that one activation replaced (tests check this).

Not here: hook points (hooks.py), reports (weightsmith.report.inspect_report).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from weightsmith.inspect.hooks import InspectError
from weightsmith.inspect.trace import run_hooked
from weightsmith.models.model import CausalLM

#: Stream points a layer x position patch can replace.
STREAMS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits (B, T, V) -> (B,)


def logit_difference(answer: int, wrong: int, position: int = -1) -> Metric:
    """logit[answer] - logit[wrong] at `position`, per row."""
    return lambda logits: logits[:, position, answer] - logits[:, position, wrong]


@dataclass
class PatchResult:
    """Metric after each patch, raw and normalised to (patched - corrupt) / (clean - corrupt)."""

    by: str  # "position" or "head"
    hook: str  # the hook point patched, with {layer} for the layer
    clean_metric: float
    corrupt_metric: float
    values: torch.Tensor  # (L, T) or (L, H)

    @property
    def normalized(self) -> torch.Tensor:
        gap = self.clean_metric - self.corrupt_metric
        return (self.values - self.corrupt_metric) / (gap if abs(gap) > 1e-12 else float("nan"))


def _check(clean: list[int], corrupt: list[int]) -> None:
    if not clean or not corrupt:
        raise InspectError("the clean and corrupted prompts must both have text")
    if len(clean) != len(corrupt):
        raise InspectError(
            f"the clean prompt has {len(clean)} tokens and the corrupted one {len(corrupt)}; patching "
            "pairs positions, so reword them to the same token count"
        )


def _per_row(clean: torch.Tensor, rows: torch.Tensor, axis: int) -> Callable:
    """An edit putting `clean` (1, ...) back, row r at index rows[r] of `axis`."""

    def edit(x: torch.Tensor, name: str) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[0], shape[axis] = x.shape[0], x.shape[axis]
        index = torch.arange(x.shape[axis], device=x.device)
        mask = (index[None, :] == rows[:, None].to(x.device)).view(shape)  # (B, ..., N, ...)
        return torch.where(mask, clean.to(x.dtype).expand_as(x), x)

    return edit


@torch.no_grad()
def patch(
    model: CausalLM,
    clean: list[int],
    corrupt: list[int],
    metric: Metric,
    *,
    by: str = "position",
    stream: str = "resid_pre",
    progress: Callable[[int, int], None] | None = None,
) -> PatchResult:
    """Patch every layer x position of `stream` (by="position") or every layer x head's `hook_z`
    (by="head") from the clean run into the corrupted one; see the module doc."""
    _check(clean, corrupt)
    if by not in ("position", "head"):
        raise InspectError(f"patch by {by!r}: choose 'position' or 'head'")
    if stream not in STREAMS:
        raise InspectError(f"unknown stream {stream!r}; choose one of {', '.join(STREAMS)}")
    n_layers = len(model.model.layers)
    hook = "blocks.{layer}.attn.hook_z" if by == "head" else f"blocks.{{layer}}.hook_{stream}"
    names = [hook.format(layer=i) for i in range(n_layers)]
    clean_logits, cache = run_hooked(model, torch.tensor([clean]), keep=names)
    corrupt_logits, _ = run_hooked(model, torch.tensor([corrupt]))
    width = model.config.num_attention_heads if by == "head" else len(clean)
    rows = torch.arange(width)
    batch = torch.tensor([corrupt]).expand(width, -1)
    values = []
    for i, name in enumerate(names):
        edit = _per_row(cache[name], rows, axis=2 if by == "head" else 1)
        logits, _ = run_hooked(model, batch, edits={name: edit})
        values.append(metric(logits).float().cpu())
        if progress is not None:
            progress(i + 1, n_layers)
    return PatchResult(
        by, hook, float(metric(clean_logits)[0]), float(metric(corrupt_logits)[0]), torch.stack(values)
    )
