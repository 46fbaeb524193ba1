"""AdamW parameter groups and learning-rate schedules.

Norm weights and biases get no weight decay (decaying a norm's scale towards zero
changes what the layer computes, not just its magnitude; the GPT-2/nanoGPT rule is
"decay only matrices"). Schedules are plain functions of the step, so a resumed
run needs no scheduler state beyond the step number. Not here: the loop (loop.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from weightsmith.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed matrices and undecayed norms/biases/vectors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters; check the fine-tuning method and targets")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    kernel = adamw_kernel([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **{kernel: True})


def adamw_kernel(params: list[torch.Tensor]) -> str:
    """AdamW's implementation for these parameters (the same update either way): "fused" (one
    kernel for every tensor, the fast one on a GPU) where all are plain CUDA tensors, else
    "foreach" (the fast one on CPU; and FSDP's sharded DTensors)."""
    on_gpu = all(p.device.type == "cuda" and not hasattr(p, "device_mesh") for p in params)
    return "fused" if params and on_gpu else "foreach"


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float) -> float:
    return 1.0 - progress


def _constant(progress: float) -> float:
    return 1.0


#: Decay after warm-up, as a function of progress in [0, 1] through the decay phase.
SCHEDULES: dict[str, Callable[[float], float]] = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based):
    linear warm-up from 1/(warmup+1) to 1 over `warmup` steps, then the schedule's decay
    towards `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay_steps = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * SCHEDULES[schedule](progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)
