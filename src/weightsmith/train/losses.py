"""Training losses over a model's hidden states.

`sft_loss` is next-token cross-entropy at target positions only: prompt and padding
positions never reach the LM head. `linear_cross_entropy` fuses the LM head matmul
with the cross-entropy and computes the gradient during the forward pass, chunk by
chunk, so the (N, vocab) logits are never held in full and are swept over fewer times
(log-softmax, its saved output and its backward are one in-place softmax here). The
same trick as "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al.
2024), written plainly in torch.

Not here: the loop that calls them (loop.py), DPO's loss (a later issue).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.train.data import IGNORE, Batch

#: Logit elements per chunk (64 MiB in fp32, ~340 rows of a 49k vocabulary). Smaller
#: chunks re-read the (V, h) head weight more often: 85-row chunks made the fused
#: head + loss ~20% slower on the default model than 340-row ones.
CHUNK_ELEMENTS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i); the gradient is computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = h.shape[0], weight.shape[0]
        ctx.weight_dtype = weight.dtype
        rows = max(1, CHUNK_ELEMENTS // vocab)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)  # e.g. bf16 activations (autocast)
        buffer = torch.empty((min(rows, n), vocab), dtype=h.dtype, device=h.device)  # reused per chunk
        for start in range(0, n, rows):
            hc, tc = h[start : start + rows], targets[start : start + rows]
            logits = torch.mm(hc, w.t(), out=buffer[: len(hc)]).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(tc), device=h.device), tc] -= 1.0  # dCE/dlogits
            g = probs.to(h.dtype)
            if grad_h is not None:
                grad_h[start : start + rows] = g @ w  # (c, h)
            if grad_w is not None:
                grad_w.addmm_(g.t().float(), hc.float())  # (V, h)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits h @ weight^T (N, V) against targets (N,)."""
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return F.cross_entropy((h @ weight.t()).float(), targets, reduction="sum")
    return _LinearCrossEntropy.apply(h, weight, targets)


def sft_loss(model: nn.Module, batch: Batch, *, checkpoint: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target positions, and their count."""
    hidden = model.hidden_states(
        batch.inputs, positions=batch.positions, documents=batch.documents, checkpoint=checkpoint
    )  # (B, T, h)
    keep = batch.labels != IGNORE  # (B, T)
    targets = batch.labels[keep]
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        logits = model.logits(hidden[keep]).float()  # an adapted or quantized head: the plain way
        return F.cross_entropy(logits, targets, reduction="sum"), int(keep.sum())
    normed = model.model.norm(hidden[keep])  # (N, h): only where a loss is taken
    return linear_cross_entropy(normed, head.weight, targets), len(targets)
