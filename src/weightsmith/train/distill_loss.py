"""Knowledge distillation losses: a student learns a teacher's next-token distributions.

At each target token the student's logits s and the teacher's t (both divided by the
temperature T) are compared by a divergence D (TRL's `GKDTrainer.generalized_jsd_loss`):

- `forward_kl`: KL(teacher || student), the classic distillation loss (Hinton et al.;
  torchtune's `ForwardKLLoss`; GKD with beta 0): the student covers every token the
  teacher thinks likely.
- `reverse_kl`: KL(student || teacher) (GKD with beta 1; MiniLLM): the student puts its mass
  where the teacher's is, mode-seeking.
- `jsd`: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024) with mixture
  m = beta q + (1 - beta) p: beta KL(teacher || m) + (1 - beta) KL(student || m).

A token's loss is `kd_ratio` x D + (1 - kd_ratio) x the student's cross-entropy on the data's
own token (torchtune's `kd_ratio`; 1 is TRL's pure divergence). Neither is scaled by T^2.

`linear_distill` fuses the student's LM head with the loss as `losses.linear_cross_entropy`
does: logits exist one chunk of rows at a time, and the gradient with respect to the student's
hidden states (and head, when it trains) is computed in the forward pass, so the (N, V) logits
of neither model are ever held in full. The teacher's logits come chunk by chunk from a
function of the row range, under no_grad.

Not here: the command (distill.py), the loop (loop.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from weightsmith.train.losses import CHUNK_ELEMENTS, scaled_gradients

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

#: The teacher's fp32 logits (c, V) of rows [start, stop) of the targets.
TeacherLogits = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class DistillSpec:
    """What a token's loss is: `divergence` (one of DIVERGENCES) at `temperature`, `beta` the
    jsd's mixture weight, `kd_ratio` the divergence's share against the cross-entropy."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    kd_ratio: float = 1.0


def divergence(student: torch.Tensor, teacher: torch.Tensor, spec: DistillSpec) -> torch.Tensor:
    """(c,) the divergence of each row of fp32 logits (c, V), tempered; differentiable in `student`."""
    s = F.log_softmax(student / spec.temperature, dim=-1)
    t = F.log_softmax(teacher / spec.temperature, dim=-1)
    if spec.divergence == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if spec.divergence == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    beta = spec.beta
    if beta == 0:  # the mixture is the student: KL(teacher || student)
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(c,) cross-entropy of each row of logits against its target."""
    return torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None]).squeeze(1)


def token_losses(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, spec: DistillSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c,) each row's loss and (3, c) its divergence, student NLL and teacher NLL (detached)."""
    d = divergence(student, teacher, spec)
    nll = _nll(student, targets)
    loss = spec.kd_ratio * d + (1 - spec.kd_ratio) * nll if spec.kd_ratio < 1 else d
    with torch.no_grad():
        stats = torch.stack([d, nll, _nll(teacher, targets)])
    return loss, stats


@dataclass(frozen=True)
class _Job:
    """What a sweep compares the student's rows with: the teacher's logits, the data's targets,
    the loss, where the per-row stats (3, N) go, and the student's soft cap (Gemma's
    final_logit_softcapping: cap * tanh(logits / cap)), if any."""

    teacher: TeacherLogits
    targets: torch.Tensor
    spec: DistillSpec
    stats: torch.Tensor
    cap: float | None = None


def _sweep(
    h: torch.Tensor, weight: torch.Tensor, job: _Job, grads: tuple[torch.Tensor | None, torch.Tensor | None]
) -> torch.Tensor:
    """The summed loss over rows of h (N, h), chunked; fills `job.stats` and, where given, the
    gradients of the sum with respect to h and the head weight."""
    grad_h, grad_w = grads
    vocab = weight.shape[0]
    rows = max(1, CHUNK_ELEMENTS // (2 * vocab))  # the autograd pass keeps a few (c, V) tensors
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], rows):
        stop = min(start + rows, h.shape[0])
        hc, targets = h[start:stop], job.targets[start:stop]
        with torch.no_grad():
            raw = (hc @ w.t()).float()
            t = job.teacher(start, stop)
        if grad_h is None and grad_w is None:
            with torch.no_grad():
                loss, job.stats[:, start:stop] = token_losses(_capped(raw, job.cap), t, targets, job.spec)
            total += loss.sum()
            continue
        with torch.enable_grad():
            raw.requires_grad_(True)
            loss, job.stats[:, start:stop] = token_losses(_capped(raw, job.cap), t, targets, job.spec)
            (g,) = torch.autograd.grad(loss.sum(), raw)
        total += loss.detach().sum()
        g = g.to(h.dtype)
        if grad_h is not None:
            grad_h[start:stop] = g @ w
        if grad_w is not None:
            grad_w.addmm_(g.t().float(), hc.float())
    return total


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


class _LinearDistill(torch.autograd.Function):
    """sum_i loss(h_i @ W^T, teacher_i, t_i); the gradient is computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, job: _Job) -> torch.Tensor:
        ctx.weight_dtype = weight.dtype
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = _sweep(h, weight, job, (grad_h, grad_w))
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return scaled_gradients(ctx, grad_out, 1)


def linear_distill(
    h: torch.Tensor,
    weight: torch.Tensor,
    teacher: TeacherLogits,
    targets: torch.Tensor,
    spec: DistillSpec,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss of the student's logits h @ weight^T (N, V; soft-capped by `cap` where
    given) against the teacher's, and (3, N) per-row divergence, student NLL and teacher NLL."""
    job = _Job(
        teacher, targets, spec, torch.empty((3, h.shape[0]), dtype=torch.float32, device=h.device), cap
    )
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return _sweep(h, weight, job, (None, None)), job.stats
    return _LinearDistill.apply(h, weight, job), job.stats
