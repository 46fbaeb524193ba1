"""Reinforcement learning from verifiable rewards: the `grpo` command (GRPO, Shao et al. 2024,
with DAPO's and Dr. GRPO's loss normalisations).

The same run as `finetune` (runs.py: methods, resume, outputs, lineage; loop.py: the one
loop) with another batch source (prompts, sampled and scored when a step asks for them:
grpo_data.py) and another loss. For each prompt the model samples a group of
`--num-generations` completions; rewards (rewards.py: a checked answer, required phrases,
valid JSON, a think block, a length penalty, or Python functions) score them; a completion's
advantage is how much better it did than its group. The loss raises the log-probability of
completions that did better and lowers the others', token by token, with PPO's clipped ratio
(pi / pi_old, clipped to [1 - epsilon, 1 + epsilon-high]) and, with `--beta` > 0, the k3
estimate of the KL divergence to the reference model, as TRL's `GRPOTrainer` computes it:

    loss_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps_high) A) + beta * r_t * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)

(the KL term times r_t, whose value is 1, makes its gradient the unbiased one of the reverse
KL: TRL's `use_bias_correction_kl`, on by default, after DeepSeek-V3.2)

Samples are drawn with the weights of the step that learns from them, so pi_old is pi itself
(detached: r_t = 1 with the gradient of pi), TRL's default of one iteration per batch. How
the token losses sum (`--loss`): `dapo` (TRL's default) the mean over every completion token
of the step; `grpo` the mean over completions of each completion's token mean; `dr_grpo` the
sum over tokens / (completions x --max-completion-len).

The reference (for `--beta` > 0) is the model before training: for LoRA and QLoRA the same
model with its adapters disabled, for full fine-tuning a frozen copy. Log-probabilities are
taken at the sampling temperature (logits / T), as TRL takes them; the LM head runs only where
a completion token is predicted, chunked (`losses.linear_log_probs`).

Not here: prompts, sampling and advantages (grpo_data.py), rewards (rewards.py), the loop.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from weightsmith.config import opt
from weightsmith.errors import ConfigError
from weightsmith.lora import adapters_disabled
from weightsmith.train.data import pad_id_for
from weightsmith.train.distributed import World
from weightsmith.train.grpo_data import (
    SCALES,
    GroupBatch,
    PromptSource,
    Rollout,
    read_prompts,
    tokenize_prompts,
)
from weightsmith.train.loop import Reporter, Trainer, TrainOptions, cut_log
from weightsmith.train.losses import head_log_probs, shared_prompt_attention
from weightsmith.train.metric_sums import Mean
from weightsmith.train.rewards import BUILTIN, Reward, RewardContext, parse_rewards
from weightsmith.train.runs import (
    RunConfig,
    begin_outputs,
    fit_and_save,
    load_model,
    load_tokenizer,
    prepare,
    read_and_tokenize,
    run_on_ranks,
    start_run,
)

__all__ = ["GrpoConfig", "GrpoObjective", "completion_log_probs", "run_grpo"]

log = logging.getLogger(__name__)

LOSSES = ("dapo", "grpo", "dr_grpo")
ROLLOUTS = "rollouts.jsonl"


@dataclass(kw_only=True)
class GrpoConfig(RunConfig):
    """Reinforce what a reward checks (GRPO): sample answers to prompts, reward them, learn from the better ones."""

    command: ClassVar[str] = "grpo"

    data: str | None = opt(
        None, "prompts: JSONL, one {'prompt': text or messages, ...fields the rewards read} a line"
    )
    reward: list[str] = opt(
        ["answer"], f"rewards, NAME or NAME:WEIGHT, summed: {', '.join(BUILTIN)}"
    )  # fmt: skip
    num_generations: int = opt(8, "completions sampled per prompt (the group its advantage is measured in)")
    max_completion_len: int = opt(256, "the most tokens a completion may have")
    temperature: float = opt(1.0, "sampling temperature (log-probs are taken at it too)")
    top_p: float = opt(1.0, "nucleus sampling")
    top_k: int = opt(0, "sample among the top k tokens only (0 = all)")
    loss: str = opt("dapo", "how token losses sum: dapo (token mean), grpo (mean of completion means), dr_grpo",
                    choices=LOSSES)  # fmt: skip
    beta: float = opt(0.0, "weight of the KL divergence to the reference model (0: no reference is run)")
    epsilon: float = opt(0.2, "clip the probability ratio below at 1 - epsilon")
    epsilon_high: float | None = opt(None, "clip it above at 1 + this (default: epsilon; DAPO uses 0.28)")
    scale_rewards: str = opt("group", "divide advantages by the group's reward deviation (group) or not (none)",
                             choices=SCALES)  # fmt: skip
    mask_truncated: bool = opt(False, "learn nothing from completions cut off at --max-completion-len")
    overlong_cache: int | None = opt(
        None, "the length reward's band: penalise the last N tokens (default L/4)"
    )
    #: reinforcement learning moves far on little data: a tenth of finetune's learning rate
    train: TrainOptions = opt(default_factory=lambda: TrainOptions(lr=2e-5))

    def __post_init__(self) -> None:
        checks = [
            ("num-generations", self.num_generations >= 2, "at least 2 (advantages compare a group)"),
            ("max-completion-len", self.max_completion_len >= 1, "at least 1"),
            ("temperature", self.temperature > 0, "above 0 (the group must differ)"),
            ("top-p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top-k", self.top_k >= 0, "0 (off) or more"),
            ("beta", self.beta >= 0, "0 or more"),
            ("epsilon", 0 < self.epsilon < 1, "in (0, 1)"),
            ("epsilon-high", self.epsilon_high is None or self.epsilon_high > 0, "above 0"),
        ]
        for flag, ok, want in checks:
            if not ok:
                raise ConfigError(f"--{flag} {getattr(self, flag.replace('-', '_'))}: must be {want}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r}: unknown; choose one of {', '.join(LOSSES)}")
        if self.scale_rewards not in SCALES:
            raise ConfigError(f"--scale-rewards {self.scale_rewards!r}: choose one of {', '.join(SCALES)}")
        if self.max_completion_len >= self.max_seq_len:
            raise ConfigError(
                f"--max-completion-len {self.max_completion_len}: must be below --max-seq-len {self.max_seq_len} "
                "(the prompt needs room)"
            )
        self.rewards()  # names and weights checked with the other flags

    def rewards(self) -> list[Reward]:
        """--reward's functions (none given: the Python API's alone, checked at the start)."""
        if not self.reward:
            return []
        return parse_rewards(self.reward, RewardContext(self.max_completion_len, self.overlong_cache))


# ----- the loss -----------------------------------------------------------------------------------


def completion_log_probs(model: nn.Module, batch: GroupBatch, temperature: float = 1.0,
                         *, checkpoint: bool = False) -> torch.Tensor:  # fmt: skip
    """(M,) log pi(token | prompt, earlier tokens) of every completion token, fp32, with the
    logits divided by `temperature`: each prompt runs once for its whole group, the LM head
    only where a completion token is predicted."""
    with shared_prompt_attention(model, batch):  # each completion sees its prompt and itself
        hidden = model.hidden_states(batch.inputs, positions=batch.positions, checkpoint=checkpoint)
    return head_log_probs(
        model, hidden.reshape(-1, hidden.shape[-1])[batch.index], batch.targets, temperature
    )


@dataclass
class GrpoObjective:
    """The loop's loss function for sampled groups: (summed token loss, its count, summed metrics)."""

    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    temperature: float = 1.0
    reference: nn.Module | None = None  # a frozen copy; None: the model with adapters disabled
    checkpoint: bool = False

    def __call__(
        self, model: nn.Module, batch: GroupBatch
    ) -> tuple[torch.Tensor, int, dict[str, torch.Tensor | Mean]]:
        ref = None
        if self.beta:  # first, so its activations are freed before the policy's are kept
            with torch.no_grad():
                ref = self._reference(model, batch)
        logp = completion_log_probs(model, batch, self.temperature, checkpoint=self.checkpoint)
        ratio = torch.exp(logp - logp.detach())  # pi / pi_old: 1, with pi's gradient
        advantage = batch.advantages[batch.seq]
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + high)
        per_token = -torch.min(ratio * advantage, clipped * advantage)
        metrics: dict[str, torch.Tensor | Mean] = {}
        if ref is not None:
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            per_token = per_token + self.beta * kl * ratio  # x ratio: the unbiased gradient (TRL's default)
            metrics["kl"] = (kl.detach() * batch.weights).sum()
        metrics.update({name: Mean(*pair) for name, pair in batch.metrics.items()})
        return (per_token * batch.weights).sum(), batch.count, metrics

    def _reference(self, model: nn.Module, batch: GroupBatch) -> torch.Tensor:
        if self.reference is not None:
            return completion_log_probs(self.reference, batch, self.temperature)
        with adapters_disabled(model):
            return completion_log_probs(model, batch, self.temperature)


# ----- the rollouts' record -------------------------------------------------------------------------


class RolloutLog:
    """OUT/rollouts.jsonl: every training completion (its prompt's FILE:LINE, text, reward,
    advantage), one line each, tagged with the step that learnt from it; a resumed run first
    drops the lines after its checkpoint, as metrics.jsonl does."""

    def __init__(self, path: Path, trainer: Trainer, *, resumed: bool = False) -> None:
        self.path, self.trainer = path, trainer
        self.to_cut = resumed  # at the first batch, when the trainer knows its step

    def __call__(self, completions: list[dict[str, Any]]) -> None:
        if self.to_cut:
            cut_log(self.path, self.trainer.state.step)
            self.to_cut = False
        step = self.trainer.state.step + 1  # batches are drawn before the step they train
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **c}, ensure_ascii=False) + "\n" for c in completions)


class _LoggedSource(PromptSource):
    """The training prompts, every batch's completions written to the log by the first rank
    (gathered from every rank, in rank order: a one-process run's order)."""

    def __init__(self, source: PromptSource, log: RolloutLog, world: World) -> None:
        super().__init__(source.examples, source.rollout, source.clock)
        self.log, self.world = log, world

    def batch(self, indices: Sequence[int]) -> GroupBatch:
        batch = super().batch(indices)
        shares = self.world.gather(batch.completions)
        if self.world.is_main:
            self.log([c for share in shares for c in share])
        return batch


# ----- the command --------------------------------------------------------------------------------


def load_prompts(cfg: GrpoConfig, tokenizer: Any) -> tuple[PromptSource, PromptSource, dict[str, Any]]:
    """Read, check, render and measure every prompt; nothing loads or trains if one is bad."""
    rewards = cfg.rewards()
    room = cfg.max_seq_len - cfg.max_completion_len
    (train, train_stats), (valid, valid_stats) = read_and_tokenize(
        cfg, read_prompts, lambda part: tokenize_prompts(part, tokenizer, room, rewards), lambda *a: None
    )
    return PromptSource(train), PromptSource(valid), {"train": train_stats, "valid": valid_stats}


def run_grpo(
    cfg: GrpoConfig, *, reporter: Reporter | None = None, rewards: Sequence[Reward] = ()
) -> dict[str, Any]:
    """Train on prompts and rewards as `cfg` says (here or on --nproc-per-node processes).
    `rewards` (the Python API) adds functions to --reward's: each `Reward(name, fn, weight)`
    with fn(completions, rows, lengths) -> a float (or None) per completion."""
    return run_on_ranks(cfg, "grpo", lambda c, world: _grpo(c, world, reporter, list(rewards)))


def _grpo(cfg: GrpoConfig, world: World, reporter: Reporter | None, extra: list[Reward]) -> dict[str, Any]:
    from weightsmith.checkpoint.pull import resolve

    cfg, out, resume_from = start_run(cfg, "grpo")
    rewards = cfg.rewards() + extra
    if not rewards:
        raise ConfigError(f"give at least one --reward (one of: {', '.join(BUILTIN)})")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ConfigError(f"rewards {names}: two share a name; give each function its own")
    path = resolve(str(cfg.model))
    tokenizer = load_tokenizer(path)
    if tokenizer is not None:  # every prompt checked before the weights load
        train, valid, data_stats = load_prompts(cfg, tokenizer)
    loaded, device = load_model(cfg, path)
    if tokenizer is None:
        train, valid, data_stats = load_prompts(cfg, loaded.tokenizer)
    begin_outputs(cfg, out, resume_from, world)
    model = loaded.model
    reference = None
    if cfg.beta and cfg.method == "full":
        reference = copy.deepcopy(model).requires_grad_(False).eval()  # before any trained weight loads
    prepared = prepare(model, cfg, resume_from, world, device)
    rollout = Rollout(
        model, loaded.tokenizer, rewards, cfg.num_generations, cfg.max_completion_len, loss=cfg.loss,
        scale_rewards=cfg.scale_rewards, mask_truncated=cfg.mask_truncated, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, pad_id=pad_id_for(loaded.tokenizer),
    )  # fmt: skip
    train.rollout = valid.rollout = rollout
    objective = GrpoObjective(
        cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.temperature, reference, cfg.train.gradient_checkpointing
    )
    trainer = Trainer(
        model, objective, train, valid, cfg.train, out, save_weights=prepared.save_weights, device=device,
        reporter=reporter, command="grpo", perplexity=False, world=world,
    )  # fmt: skip
    seed = cfg.train.seed  # the loop counts a micro-batch before it draws it
    train.clock = lambda: f"{seed}/train/{trainer.state.cursor}"
    valid.clock = lambda: f"{seed}/valid/{trainer.state.step}"
    if world.is_main and resume_from is None:
        (out / ROLLOUTS).unlink(missing_ok=True)
    log_file = RolloutLog(out / ROLLOUTS, trainer, resumed=resume_from is not None)
    trainer.train = _LoggedSource(train, log_file, world)
    log.info(
        "%s loss, %d completions a prompt, rewards %s, beta %g", cfg.loss, cfg.num_generations,
        ", ".join(f"{r.name} x{r.weight:g}" for r in rewards), cfg.beta,
    )  # fmt: skip
    return fit_and_save(
        cfg, trainer, loaded, prepared, model_path=path, resume_from=resume_from, data_stats=data_stats,
        loss=cfg.loss, beta=cfg.beta, rewards={r.name: r.weight for r in rewards},
        num_generations=cfg.num_generations,
    )  # fmt: skip
