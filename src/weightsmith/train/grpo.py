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

Samples are drawn with the weights of the step that learns from them, so at its first pass
pi_old is pi itself (detached: r_t = 1 with the gradient of pi). With `--num-iterations` mu > 1
(GRPO's mu, TRL's `num_iterations`) a step's completions serve mu optimizer steps: the first
pass keeps its log-probabilities as pi_old (and the reference's, which do not change), and
the later passes, with weights that have moved, are clipped against them. The ratio is per
token, or (`--importance-sampling sequence`, GSPO, Zheng et al. 2025) per completion: the
exponential of the mean of its tokens' log-ratios, given to each of its tokens. `--delta` caps
the unclipped ratio too (two-sided clipping, INTELLECT-2). How the token losses sum (`--loss`):
`dapo` (TRL's default) the mean over every completion token of the step; `grpo` the mean over
completions of each completion's token mean; `dr_grpo` the sum over tokens / (completions x
--max-completion-len); `bnpo` each micro-batch's token mean,
averaged over the step's micro-batches, as TRL's `bnpo` divides by the accumulation steps
(one rank only: a rank's share of a micro-batch would be its own unit, and the loop's steps are
the same on any number of ranks).

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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from weightsmith.config import opt
from weightsmith.errors import ConfigError
from weightsmith.lora import adapters_disabled
from weightsmith.train.checkpoints import cut_log
from weightsmith.train.data import pad_id_for
from weightsmith.train.distributed import World
from weightsmith.train.grpo_data import (
    SCALES,
    GroupBatch,
    PromptSource,
    Rollout,
    nan_std,
    read_prompts,
    tokenize_prompts,
)
from weightsmith.train.loop import Reporter, Trainer, TrainOptions
from weightsmith.train.losses import head_log_probs, shared_prompt_attention
from weightsmith.train.metric_sums import Mean
from weightsmith.train.reward_files import file_spec
from weightsmith.train.reward_model import SharedBase
from weightsmith.train.rewards import BUILTIN, Reward, RewardContext, parse_rewards
from weightsmith.train.runs import (
    RunConfig,
    begin_outputs,
    fit_and_save,
    load_data_and_model,
    make_trainer,
    prepare,
    read_and_tokenize,
    run_on_ranks,
    start_run,
)

__all__ = ["GrpoConfig", "GrpoObjective", "completion_log_probs", "run_grpo"]

log = logging.getLogger(__name__)

LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")
LEVELS = ("token", "sequence")
ROLLOUTS = "rollouts.jsonl"


@dataclass(kw_only=True)
class GrpoConfig(RunConfig):
    """Reinforce what a reward checks (GRPO): sample answers to prompts, reward them, learn from the better ones."""

    command: ClassVar[str] = "grpo"

    data: str | None = opt(
        None, "prompts: JSONL, one {'prompt': text or messages, ...fields the rewards read} a line"
    )
    reward: list[str] = opt(
        ["answer"], f"rewards, NAME or NAME:WEIGHT, summed: {', '.join(BUILTIN)}; or a function in your own "
                    "file, PATH.py:FUNCTION[:WEIGHT] (ours: fn(completions, rows, lengths); TRL's: with **kwargs); "
                    "or a reward model trained by weightsmith reward, model:DIR[:WEIGHT]"
    )  # fmt: skip
    num_generations: int = opt(8, "completions sampled per prompt (the group its advantage is measured in)")
    max_completion_len: int = opt(256, "the most tokens a completion may have")
    temperature: float = opt(1.0, "sampling temperature (log-probs are taken at it too)")
    top_p: float = opt(1.0, "nucleus sampling")
    top_k: int = opt(0, "sample among the top k tokens only (0 = all)")
    loss: str = opt("dapo", "how token losses sum: dapo (token mean), grpo (mean of completion means), dr_grpo, "
                            "bnpo (each micro-batch's token mean, averaged); "
                            "or cispo (MiniMax-M1, summed as dapo), sapo (soft gate, summed as grpo)",
                    choices=LOSSES)  # fmt: skip
    sapo_temperature_pos: float = opt(1.0, "SAPO's gate temperature for tokens of positive advantage")
    sapo_temperature_neg: float = opt(1.05, "SAPO's gate temperature for the others")
    beta: float = opt(0.0, "weight of the KL divergence to the reference model (0: no reference is run)")
    epsilon: float = opt(0.2, "clip the probability ratio below at 1 - epsilon")
    epsilon_high: float | None = opt(
        None, "clip it above at 1 + this (default: epsilon; DAPO uses 0.28); with --loss cispo, the cap on the "
        "ratio itself (default 5, ScaleRL's)"
    )  # fmt: skip
    delta: float | None = opt(
        None, "also cap the unclipped ratio at this (two-sided clipping; above 1 + epsilon-high)"
    )
    num_iterations: int = opt(1, "optimizer steps each batch of completions serves (GRPO's mu): past the "
                                 "first, pi / pi_old and its clipping act")  # fmt: skip
    importance_sampling: str = opt("token", "the ratio pi / pi_old per token, or per completion: the geometric "
                                            "mean of its tokens' (sequence: GSPO)", choices=LEVELS)  # fmt: skip
    scale_rewards: str = opt("group", "divide advantages by the group's reward deviation (group), the whole "
                                      "step's (batch) or not (none)", choices=SCALES)  # fmt: skip
    mask_truncated: bool = opt(False, "learn nothing from completions cut off at --max-completion-len")
    top_entropy_quantile: float = opt(
        1.0, "learn only from the completion tokens whose policy entropy is in this top share of the micro-batch's "
        "(Wang et al. 2025 use 0.2; 1 = every token)"
    )  # fmt: skip
    overlong_cache: int | None = opt(
        None, "the length reward's band: penalise the last N tokens (default L/4)"
    )
    #: reinforcement learning moves far on little data: a tenth of finetune's learning rate
    train: TrainOptions = opt(default_factory=lambda: TrainOptions(lr=2e-5))

    def __post_init__(self) -> None:
        if self.loss == "cispo" and self.epsilon_high is None:
            self.epsilon_high = 5.0
        checks = [
            ("num-generations", self.num_generations >= 2, "at least 2 (advantages compare a group)"),
            ("max-completion-len", self.max_completion_len >= 1, "at least 1"),
            ("temperature", self.temperature > 0, "above 0 (the group must differ)"),
            ("top-p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top-k", self.top_k >= 0, "0 (off) or more"),
            ("beta", self.beta >= 0, "0 or more"),
            ("epsilon", 0 < self.epsilon < 1, "in (0, 1)"),
            ("epsilon-high", self.epsilon_high is None or self.epsilon_high > 0, "above 0"),
            ("num-iterations", self.num_iterations >= 1, "1 or more"),
            ("top-entropy-quantile", 0 < self.top_entropy_quantile <= 1, "in (0, 1]"),
            ("sapo-temperature-pos", self.sapo_temperature_pos > 0, "above 0"),
            ("sapo-temperature-neg", self.sapo_temperature_neg > 0, "above 0"),
            (
                "delta",
                self.delta is None or self.delta > 1 + (self.epsilon_high or self.epsilon),
                "above 1 + epsilon-high (else it clips what the clipped ratio keeps)",
            ),
        ]
        for flag, ok, want in checks:
            if not ok:
                raise ConfigError(f"--{flag} {getattr(self, flag.replace('-', '_'))}: must be {want}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r}: unknown; choose one of {', '.join(LOSSES)}")
        check_bnpo(self.loss, self.dist.nproc_per_node or 1)
        if self.importance_sampling not in LEVELS:
            raise ConfigError(
                f"--importance-sampling {self.importance_sampling!r}: choose one of {', '.join(LEVELS)}"
            )
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


def completion_log_probs(model: nn.Module, batch: GroupBatch, temperature: float = 1.0, *,
                         checkpoint: bool = False, entropy: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(M,) log pi(token | prompt, earlier tokens) of every completion token, fp32, with the
    logits divided by `temperature`: each prompt runs once for its whole group, the LM head
    only where a completion token is predicted. `entropy` (M,), if given, is filled with the
    entropy of each of those distributions."""
    with shared_prompt_attention(model, batch):  # each completion sees its prompt and itself
        hidden = model.hidden_states(batch.inputs, positions=batch.positions, checkpoint=checkpoint)
    return head_log_probs(
        model, hidden.reshape(-1, hidden.shape[-1])[batch.index], batch.targets, temperature, entropy
    )


@dataclass
class GrpoObjective:
    """The loop's loss function for sampled groups: (summed token loss, its count, summed metrics).
    With `keep` (a batch that serves several steps), its first pass keeps on the batch the
    log-probabilities it was sampled with (pi_old) and the reference's, for the later passes."""

    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    temperature: float = 1.0
    reference: nn.Module | None = None  # a frozen copy; None: the model with adapters disabled
    checkpoint: bool = False
    importance: str = "token"  # the ratio per token, or per completion ("sequence": GSPO)
    delta: float | None = None  # a cap on the unclipped ratio (two-sided clipping)
    keep: bool = False
    top_entropy_quantile: float = 1.0  # learn from this top share of tokens by entropy (1: all)
    world: World | None = None  # ranks whose micro-batches share the entropy threshold
    loss: str = "dapo"  # cispo and sapo change each token's term (the others only how terms sum)
    sapo_temperatures: tuple[float, float] = (1.0, 1.05)  # (positive advantage, other)

    def __call__(
        self, model: nn.Module, batch: GroupBatch
    ) -> tuple[torch.Tensor, int, dict[str, torch.Tensor | Mean]]:
        ref = batch.ref_logp
        if self.beta and ref is None:  # first, so its activations are freed before the policy's are kept
            with torch.no_grad():
                ref = self._reference(model, batch)
            batch.ref_logp = ref if self.keep else None
        entropy = torch.empty(len(batch.targets), dtype=torch.float32, device=batch.targets.device)
        logp = completion_log_probs(
            model, batch, self.temperature, checkpoint=self.checkpoint, entropy=entropy
        )
        old = batch.old_logp
        if old is None:  # sampled by these very weights: pi_old is pi, the ratio 1 with pi's gradient
            old = logp.detach()
            batch.old_logp = old if self.keep else None
        ratio = torch.exp(self._log_ratio(logp - old, batch))
        advantage = batch.advantages[batch.seq]
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        per_token = self._policy_term(ratio, logp, advantage, high)
        if (
            self.top_entropy_quantile < 1
        ):  # the policy term of the low-entropy tokens is dropped (not the KL's)
            per_token = per_token * (entropy >= self._entropy_threshold(entropy, batch))
        metrics: dict[str, torch.Tensor | Mean] = {"entropy": Mean(float(entropy.sum()), float(len(entropy)))}
        if ref is not None:
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            per_token = per_token + self.beta * kl * ratio  # x ratio: the unbiased gradient (TRL's default)
            metrics["kl"] = (kl.detach() * batch.weights).sum()
        if self.keep and self.loss != "sapo":  # the share of tokens (completions) whose ratio the clip held
            low = (
                torch.zeros_like(ratio, dtype=torch.bool)
                if self.loss == "cispo"
                else ratio < 1 - self.epsilon
            )
            metrics["clip_low"] = self._share(low & (advantage < 0), batch)
            metrics["clip_high"] = self._share((ratio > (high if self.loss == "cispo" else 1 + high)) & (advantage > 0),
                                               batch)  # fmt: skip
        metrics.update({name: Mean(*pair) for name, pair in batch.metrics.items()})
        return (per_token * batch.weights).sum(), batch.count, metrics

    def _policy_term(
        self, ratio: torch.Tensor, logp: torch.Tensor, advantage: torch.Tensor, high: float
    ) -> torch.Tensor:
        """Each token's policy loss: PPO's clipped objective (`delta` caps the unclipped ratio);
        CISPO's (MiniMax-M1) REINFORCE term weighted by the ratio, capped at `high` and detached;
        SAPO's soft gate, sigmoid(tau (r - 1)) x 4 / tau."""
        if self.loss == "cispo":
            return -torch.clamp(ratio, max=high).detach() * advantage * logp
        if self.loss == "sapo":
            pos, neg = self.sapo_temperatures
            tau = torch.where(advantage > 0, pos, neg)
            return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantage
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + high)
        capped = ratio if self.delta is None else torch.clamp(ratio, max=self.delta)
        return -torch.min(capped * advantage, clipped * advantage)

    def _entropy_threshold(self, entropy: torch.Tensor, batch: GroupBatch) -> torch.Tensor:
        """The entropy at the (1 - top_entropy_quantile) quantile of the micro-batch's tokens on
        every rank (a stand-in batch adds none), as TRL gathers them."""
        values = entropy.detach()
        if self.world is not None and self.world.size > 1:
            shares = self.world.gather([] if batch.stand_in else values.tolist())
            values = torch.tensor([e for share in shares for e in share], dtype=torch.float32)
        if not len(values):
            return torch.tensor(math.inf)
        return torch.quantile(values.cpu(), 1 - self.top_entropy_quantile).to(entropy.device)

    def _share(self, flags: torch.Tensor, batch: GroupBatch) -> Mean:
        """Of the tokens learnt from (at sequence level: of the completions), how many are flagged."""
        if self.importance == "token":
            return Mean(float(flags.sum()), float(len(flags)))
        n = len(batch.advantages)
        flagged = torch.zeros(n, device=flags.device).index_add(0, batch.seq, flags.float()) > 0
        return Mean(float(flagged.sum()), float(len(batch.seq.unique())))

    def _log_ratio(self, log_ratio: torch.Tensor, batch: GroupBatch) -> torch.Tensor:
        """(M,) log pi / pi_old of each token, or (sequence) the mean of its completion's."""
        if self.importance == "token":
            return log_ratio
        n = len(batch.advantages)
        sums = torch.zeros(n, dtype=log_ratio.dtype, device=log_ratio.device).index_add(
            0, batch.seq, log_ratio
        )
        counts = torch.bincount(batch.seq, minlength=n).clamp(min=1)
        return (sums / counts)[batch.seq]

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


class StepSource(PromptSource):
    """The training prompts. Once a step's micro-batches are drawn (`whole_step`), with
    --scale-rewards batch their advantages are divided by the deviation of all the step's
    rewards (every rank's), and the first rank writes their completions to the log (gathered
    from every rank, in the order one process would have drawn them; stand-ins left out)."""

    def __init__(self, source: PromptSource, log: RolloutLog, world: World, *, batch_scale: bool) -> None:
        super().__init__(source.examples, source.rollout, source.clock)
        self.log, self.world, self.batch_scale = log, world, batch_scale

    def whole_step(self, batches: list[tuple[GroupBatch, bool]]) -> None:
        real = [b for b, counts in batches if counts]
        if self.batch_scale:
            shares = self.world.gather([r for b in real for r in b.rewards.tolist()])  # type: ignore[union-attr]
            std = nan_std(torch.tensor([r for share in shares for r in share], dtype=torch.float64), 0)
            for b, _ in batches:
                assert b.centred is not None
                b.advantages = (b.centred / (std.to(b.centred) + 1e-4)).nan_to_num(0.0).to(b.advantages)
                for c, a in zip(b.completions, b.advantages.tolist(), strict=True):
                    c["advantage"] = round(a, 6)
        shares = self.world.gather([b.completions if counts else None for b, counts in batches])
        if self.world.is_main:  # micro-batch by micro-batch, each rank's slice in rank order
            self.log([c for k in range(len(batches)) for share in shares if share[k] for c in share[k]])


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


def check_bnpo(loss: str, ranks: int) -> None:
    if loss == "bnpo" and ranks > 1:
        raise ConfigError(
            "--loss bnpo normalises each micro-batch by a rank's own tokens, so a step would depend on the "
            "number of ranks; on several ranks use --loss dapo (the step's token mean)"
        )


def _grpo(cfg: GrpoConfig, world: World, reporter: Reporter | None, extra: list[Reward]) -> dict[str, Any]:
    cfg, out, resume_from = start_run(cfg, "grpo")
    check_bnpo(cfg.loss, world.size)  # a resumed run's rank count is given anew
    rewards = cfg.rewards() + extra
    if not rewards:
        raise ConfigError(f"give at least one --reward (one of: {', '.join(BUILTIN)})")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ConfigError(f"rewards {names}: two share a name; give each function its own")
    path, loaded, device, (train, valid, data_stats) = load_data_and_model(cfg, load_prompts)
    # a reward model (--reward model:DIR) beside the policy; a LoRA one over the policy's own
    # checkpoint runs on the policy's frozen base weights (LoRA training leaves them as loaded)
    shared = (
        SharedBase(path, loaded.model, loaded.tokenizer)
        if cfg.method == "lora" and not world.sharded
        else None
    )
    for reward in rewards:
        if hasattr(reward.fn, "load"):
            reward.fn.load(device, path, shared)
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
        cfg.epsilon, cfg.epsilon_high, cfg.beta, cfg.temperature, reference, cfg.train.gradient_checkpointing,
        importance=cfg.importance_sampling, delta=cfg.delta, keep=cfg.num_iterations > 1,
        top_entropy_quantile=cfg.top_entropy_quantile, world=world, loss=cfg.loss,
        sapo_temperatures=(cfg.sapo_temperature_pos, cfg.sapo_temperature_neg),
    )  # fmt: skip
    trainer = make_trainer(
        cfg, model, objective, (train, valid), out, prepared, device, reporter, world, perplexity=False,
        iterations=cfg.num_iterations,
    )  # fmt: skip
    seed = cfg.train.seed  # the loop counts a micro-batch before it draws it
    train.clock = lambda: f"{seed}/train/{trainer.state.cursor}"
    valid.clock = lambda: f"{seed}/valid/{trainer.state.step}"
    if world.is_main and resume_from is None:
        (out / ROLLOUTS).unlink(missing_ok=True)
    log_file = RolloutLog(out / ROLLOUTS, trainer, resumed=resume_from is not None)
    trainer.train = StepSource(train, log_file, world, batch_scale=cfg.scale_rewards == "batch")
    log.info(
        "%s loss, %d completions a prompt, rewards %s, beta %g", cfg.loss, cfg.num_generations,
        ", ".join(f"{r.name} x{r.weight:g}" for r in rewards), cfg.beta,
    )  # fmt: skip
    return fit_and_save(
        cfg, trainer, loaded, prepared, model_path=path, resume_from=resume_from, data_stats=data_stats,
        inputs={"reward": [file_spec(r.source)["path"] for r in rewards if r.source],  # type: ignore[index]
                "reward_model": [r.fn.path for r in rewards if hasattr(r.fn, "path")]},
        loss=cfg.loss, beta=cfg.beta, rewards={r.name: r.weight for r in rewards},
        num_generations=cfg.num_generations,
    )  # fmt: skip
