"""Learning from thumbs up and down: the `kto` command (KTO, Ethayarajh et al. 2024).

Where DPO needs two answers to one prompt, KTO learns from single completions labelled
desirable or not, the shape product feedback comes in. Its loss, per example, with the
log-ratio r = log pi(y|x) - log pi_ref(y|x) summed over the completion's tokens:

- desirable: lambda_D x (1 - sigmoid(beta x (r - z0)))
- undesirable: lambda_U x (1 - sigmoid(beta x (z0 - r)))

z0, the reference point, is the policy's KL divergence from the reference, estimated from
completions scored under prompts they do not answer (each example's KL partner,
unpaired_data.kl_partners): the mean of their log-ratios over the micro-batch on every rank,
clamped at 0 and detached, as TRL's `KTOTrainer` computes it. TRL averages each rank's mean;
here the ranks' sums are pooled (the same with equal micro-batches). `--loss
apo_zero_unpaired` (APO-zero on unpaired data, D'Oosterlinck et al. 2024) drops z0: desirable
1 - sigmoid(beta r), undesirable sigmoid(beta r), and runs no KL pass. A step's loss is the
mean over its examples. `--desirable-weight` and `--undesirable-weight` (lambda_D, lambda_U)
balance uneven data; the paper advises lambda_D n_D / (lambda_U n_U) within [1, 4/3], and
a run whose weights are outside that says which values would be.

A step runs the reference once over prompt + completion + KL completion (`KtoBatch.both`:
adapters off for LoRA and QLoRA, a frozen copy for full training, or the log-probs precomputed
with `--precompute-ref`), the policy once without gradients over prompt + KL completion, and
once with over prompt + completion. The rest (methods, resume, outputs, lineage, the LM head
only where a completion token is predicted) is `dpo`'s (dpo.fit_preferences).

Metrics per step and on validation (`val_...`), as TRL logs them: the loss, `kl` (z0),
`reward_chosen` and `reward_rejected` (beta x r, means over the desirable and the undesirable
examples), `logps_chosen` and `logps_rejected` (the policy's summed log-probabilities, likewise).

Not here: reading examples and KL partners (unpaired_data.py), the shared preference run
(dpo.py), the loop (loop.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.config import opt
from weightsmith.errors import ConfigError
from weightsmith.train.data import pad_id_for
from weightsmith.train.distributed import World
from weightsmith.train.dpo import check_prompt_len, fit_preferences, reference_log_probs
from weightsmith.train.loop import Reporter
from weightsmith.train.losses import pair_log_probs
from weightsmith.train.metric_sums import Mean
from weightsmith.train.runs import RunConfig, read_and_tokenize, run_on_ranks, warn_truncated
from weightsmith.train.unpaired_data import (
    KtoBatch,
    UnpairedSource,
    UnpairedStats,
    kl_partners,
    read_unpaired,
    tokenize_unpaired,
)

__all__ = ["KTO_LOSSES", "KtoConfig", "KtoObjective", "load_examples", "run_kto"]

log = logging.getLogger(__name__)

#: --loss NAME -> whether it estimates z0 (runs the KL pass).
KTO_LOSSES = {"kto": True, "apo_zero_unpaired": False}


@dataclass(kw_only=True)
class KtoConfig(RunConfig):
    """Learn from completions labelled good or bad (KTO): no pairs needed, near the start model."""

    command: ClassVar[str] = "kto"

    data: str | None = opt(
        None, "labelled completions: JSONL of prompt/completion/label (TRL's unpaired format), or pairs"
    )
    loss: str = opt(
        "kto", "kto, or apo_zero_unpaired (APO-zero on unpaired data: no KL term)", choices=tuple(KTO_LOSSES)
    )
    beta: float = opt(0.1, "how far the model may move from the reference")
    desirable_weight: float = opt(1.0, "weight of the desirable examples' loss (lambda_D)")
    undesirable_weight: float = opt(1.0, "weight of the undesirable examples' loss (lambda_U)")
    precompute_ref: bool = opt(False, "compute the reference log-probs once before training")
    max_prompt_len: int | None = opt(None, "cut prompts longer than this from the left")

    def __post_init__(self) -> None:
        if self.loss not in KTO_LOSSES:
            raise ConfigError(f"--loss {self.loss!r}: unknown; choose one of {', '.join(KTO_LOSSES)}")
        if not self.beta > 0:
            raise ConfigError(f"--beta {self.beta}: must be greater than 0")
        for name in ("desirable_weight", "undesirable_weight"):
            if not 0 < getattr(self, name) <= 100:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {getattr(self, name)}: must be above 0 and at most 100")
        check_prompt_len(self.max_prompt_len, self.max_seq_len)


# ----- the loss -----------------------------------------------------------------------------------


@dataclass
class KtoObjective:
    """The loop's loss function for labelled completions: (summed loss, examples, metrics)."""

    loss: str
    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: nn.Module | None = None  # a frozen copy; None: the model with adapters disabled
    checkpoint: bool = False
    world: World | None = None  # z0 pools every rank's KL log-ratios

    def __call__(self, model: nn.Module, batch: KtoBatch) -> tuple[torch.Tensor, int, dict[str, Any]]:
        ref = batch.reference
        if ref is None:  # first, so its activations are freed before the policy's
            ref = reference_log_probs(model, batch.both, self.reference)  # (2B,)
        n = len(batch.labels)
        z0 = self.reference_point(model, batch, ref[n:])
        policy = pair_log_probs(model, batch.own, checkpoint=self.checkpoint)[:n]
        ratio = policy - ref[:n]
        good = batch.labels
        if self.loss == "kto":
            desirable = 1 - F.sigmoid(self.beta * (ratio - z0))
            undesirable = 1 - F.sigmoid(self.beta * (z0 - ratio))
        else:  # apo_zero_unpaired
            desirable, undesirable = 1 - F.sigmoid(self.beta * ratio), F.sigmoid(self.beta * ratio)
        losses = torch.where(good, self.desirable_weight * desirable, self.undesirable_weight * undesirable)
        rewards, logps = self.beta * ratio.detach(), policy.detach()
        n_good = float(good.sum())
        metrics = {
            "kl": Mean(float(z0) * n, n),  # weighted by examples: the same on any number of ranks
            "reward_chosen": Mean(rewards[good].sum(), n_good),
            "reward_rejected": Mean(rewards[~good].sum(), n - n_good),
            "logps_chosen": Mean(logps[good].sum(), n_good),
            "logps_rejected": Mean(logps[~good].sum(), n - n_good),
        }
        return losses.sum(), n, metrics

    def reference_point(self, model: nn.Module, batch: KtoBatch, ref_kl: torch.Tensor) -> torch.Tensor:
        """z0: the mean KL log-ratio of the micro-batch's KL completions on every rank (a
        stand-in adds none), at least 0; 0 without a KL term."""
        if batch.kl is None:
            return torch.zeros((), device=ref_kl.device)
        n = len(batch.labels)
        with torch.no_grad():
            kl = pair_log_probs(model, batch.kl)[:n] - ref_kl
        total, count = (0.0, 0) if batch.stand_in else (float(kl.sum()), n)
        if self.world is not None:
            total, count = self.world.all_sum([total, count])
        return torch.tensor(max(total / max(count, 1), 0.0), device=ref_kl.device)


# ----- the command --------------------------------------------------------------------------------


def load_examples(cfg: KtoConfig, tokenizer: Any) -> tuple[UnpairedSource, UnpairedSource, dict[str, Any]]:
    """Read, check, render and measure every example, and pick KL partners; nothing loads or
    trains if one is bad."""
    kwargs = {"max_seq_len": cfg.max_seq_len, "max_prompt_len": cfg.max_prompt_len}
    (train, train_stats), (valid, valid_stats) = read_and_tokenize(
        cfg,
        read_unpaired,
        lambda part: tokenize_unpaired(part, tokenizer, **kwargs),
        lambda name, stats, max_seq_len: _warn_about(name, stats, max_seq_len, cfg.max_prompt_len),
    )
    _check_balance(cfg, train_stats)
    pad, kl = pad_id_for(tokenizer), KTO_LOSSES[cfg.loss]
    sources = [
        UnpairedSource(ex, pad, cfg.max_seq_len, kl_partners(ex, cfg.train.seed + k) if kl else None)
        for k, ex in enumerate((train, valid))
    ]
    stats = {"train": train_stats.to_dict(), "valid": valid_stats.to_dict()}
    return sources[0], sources[1], stats


def _warn_about(name: str, stats: UnpairedStats, max_seq_len: int, max_prompt_len: int | None) -> None:
    warn_truncated(name, "examples", stats.truncated, max_seq_len, stats.longest, max_prompt_len)
    if stats.prompt_mismatch:
        log.warning(
            "%d %s examples: the prompt alone tokenizes differently from its start in prompt + completion; "
            "the completion starts where they part (as in TRL)", stats.prompt_mismatch, name,
        )  # fmt: skip


def _check_balance(cfg: KtoConfig, stats: UnpairedStats) -> None:
    """Warn where lambda_D n_D / (lambda_U n_U) is outside the paper's [1, 4/3] (its eq. 8)."""
    n_d, n_u = stats.desirable, stats.undesirable
    if not n_d or not n_u:
        which = "desirable" if not n_d else "undesirable"
        log.warning("the training data has no %s examples (label %s)", which, str(not n_d).lower())
        return
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    if not 1 <= ratio <= 4 / 3:
        d_low, u_high = cfg.undesirable_weight * n_u / n_d, cfg.desirable_weight * n_d / n_u
        log.warning(
            "%d desirable and %d undesirable examples weighted %g and %g: the KTO paper keeps "
            "desirable_weight x %d / (undesirable_weight x %d) within [1, 4/3]; set --desirable-weight "
            "within [%.3g, %.3g] or --undesirable-weight within [%.3g, %.3g]",
            n_d, n_u, cfg.desirable_weight, cfg.undesirable_weight, n_d, n_u, d_low, d_low * 4 / 3,
            u_high * 3 / 4, u_high,
        )  # fmt: skip


def run_kto(cfg: KtoConfig, *, reporter: Reporter | None = None) -> dict[str, Any]:
    """Train on labelled completions as `cfg` says (here or on --nproc-per-node processes); the
    result has `run_dpo`'s shape, plus the examples' weights."""
    return run_on_ranks(cfg, "kto", lambda c, world: _kto(c, world, reporter))


def _kto(cfg: KtoConfig, world: World, reporter: Reporter | None) -> dict[str, Any]:
    def objective(reference: nn.Module | None) -> KtoObjective:
        return KtoObjective(
            cfg.loss,
            cfg.beta,
            cfg.desirable_weight,
            cfg.undesirable_weight,
            reference,
            cfg.train.gradient_checkpointing,
            world,
        )

    weights = f"desirable x {cfg.desirable_weight:g}, undesirable x {cfg.undesirable_weight:g}"
    return fit_preferences(
        cfg, world, reporter, load_examples, objective, f"{cfg.loss} loss, beta {cfg.beta:g}, {weights}",
        desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
    )  # fmt: skip
