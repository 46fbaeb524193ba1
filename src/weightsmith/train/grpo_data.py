"""GRPO's data: prompts read and checked, rendered and tokenized; each training batch made by
sampling a group of completions per prompt from the model being trained, scoring them and
turning the scores into advantages.

One JSON object per line, in TRL's prompt-only formats (one format per file):

- conversational: `{"prompt": [messages ending with a user turn], ...}`, rendered with the
  checkpoint's chat template and its generation prompt;
- text: `{"prompt": "..."}`, tokenized as it is.

Every other key of a line (`answer`, `contains`, `schema`, ...) stays with the prompt and is
what the reward functions read (rewards.py), as TRL passes extra columns to its reward
functions. Every line is checked, rendered and measured before the model loads: a bad one
stops everything with `FILE:LINE: FIELD: problem (how to fix)`.

A batch (`GroupBatch`) is made on demand (`PromptSource.batch`) by the `Rollout`, with the
weights of the moment, so a step learns from its own samples (on-policy; with
`--num-iterations` the loop holds them for the steps after it too): each prompt is sampled
`num_generations` times in one batched generation, each completion with its own seed, a hash
of the run's seed, the micro-batch's number and the prompt's index (so a resumed run samples
what the uninterrupted run sampled, and N processes sample what one would); the completion
ends at an end token (kept, as TRL keeps it) or at `max_completion_len`. Rewards are weighted
and summed, and a completion's advantage is its reward minus its group's mean, over the
group's standard deviation (Bessel-corrected) + 1e-4 (`scale_rewards="group"`), over the
deviation of all the step's rewards (`"batch"`: this batch's here, the whole step's once every
micro-batch and rank has drawn, grpo.StepSource), or the difference alone (`"none"`), TRL's
`_generate_and_score_completions`. A completion every reward declined
(all None) gets advantage 0 and stays out of its group's statistics.

Not here: the rewards (rewards.py), the loss (grpo.py), the loop (loop.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.files import json_object_line
from weightsmith.sampling import SamplingParams
from weightsmith.tokenizer import Tokenizer
from weightsmith.train.data import DataError, read_jsonl
from weightsmith.train.preference_data import (
    PADDING,
    PROMPT,
    Messages,
    check_prompt,
    parse_messages,
    render_messages,
)
from weightsmith.train.rewards import Reward, check_rows, score

SCALES = ("group", "batch", "none")
FIRST = PADDING + 1  # the segment of a row's first completion; the j-th's is FIRST + j


@dataclass
class PromptRecord:
    """One checked line: its prompt and the whole object (what the rewards read)."""

    source: str  # "file:line"
    prompt: str | Messages
    row: dict[str, Any]


@dataclass
class PromptExample:
    ids: list[int]
    row: dict[str, Any]
    source: str = ""


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Every line of a JSONL file of prompts, checked; DataError names the first bad line."""
    records = read_jsonl(path, _parse_prompt, "prompts", "prompts")
    first = records[0]
    for record in records:
        if isinstance(record.prompt, str) != isinstance(first.prompt, str):
            kinds = {True: "text", False: "conversational"}
            raise DataError(
                f"{record.source}: prompt: this line is {kinds[isinstance(record.prompt, str)]} but "
                f"{first.source} is {kinds[isinstance(first.prompt, str)]} (write every line of a file in one format)"
            )
    return records


def _parse_prompt(line: str, where: str) -> PromptRecord:
    obj = json_object_line(line, where, "prompt", DataError)
    if "prompt" not in obj:
        raise DataError(
            f"{where}: prompt: missing (each line needs a 'prompt': a string or a list of messages)"
        )
    value = obj["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: prompt: empty (give the text the model should continue)")
        return PromptRecord(where, value, obj)
    messages = parse_messages(value, where, "prompt")
    check_prompt(messages, where)
    return PromptRecord(where, messages, obj)


def tokenize_prompts(
    records: Sequence[PromptRecord], tokenizer: Tokenizer, room: int, rewards: Sequence[Reward]
) -> tuple[list[PromptExample], dict[str, int]]:
    """Ids of every prompt (each at most `room` tokens, else a DataError naming its line),
    after the rewards have checked every row's fields; and counts for run.json."""
    check_rows(rewards, [r.row for r in records], [r.source for r in records])
    examples = []
    for record in records:
        if isinstance(record.prompt, str):
            ids = tokenizer.encode(record.prompt)
        else:
            if not tokenizer.chat_template:
                raise DataError(
                    f"{record.source}: prompt: the model has no chat template to render conversations "
                    "(write the prompts as plain strings)"
                )
            ids = render_messages(
                tokenizer, list(record.prompt), record.source, "prompt", generation_prompt=True
            )
        if not ids:
            raise DataError(f"{record.source}: prompt: tokenizes to nothing (give some text)")
        if len(ids) > room:
            raise DataError(
                f"{record.source}: prompt: {len(ids)} tokens leave no room for a completion of "
                f"--max-completion-len tokens within --max-seq-len (at most {room}); shorten it or raise --max-seq-len"
            )
        examples.append(PromptExample(ids, record.row, record.source))
    lengths = [len(e.ids) for e in examples]
    stats = {"examples": len(examples), "tokens": sum(lengths), "longest": max(lengths, default=0)}
    return examples, stats


# ----- a batch: sampled, scored, ready for the loss ---------------------------------------------------


@dataclass
class GroupBatch:
    """The completions of one micro-batch of prompts, a row per prompt: the prompt once, then
    each of its completions (`segments` keeps them apart: each attends to the prompt and
    itself, positions restarting after the prompt, as `losses.shared_prompt_attention` does for
    DPO's pairs), right-padded; with where each completion token is predicted and each
    completion's advantage. `weights` turns a per-token loss into the loss type's sum."""

    inputs: torch.Tensor  # (B, T) prompt, then its completions, padded
    positions: torch.Tensor  # (B, T)
    segments: torch.Tensor  # (B, T) PROMPT, FIRST + j for completion j, PADDING
    index: torch.Tensor  # (M,) flat positions in `inputs` that predict a completion token
    targets: torch.Tensor  # (M,) those tokens
    seq: torch.Tensor  # (M,) the completion each belongs to (prompt i's j-th: i * G + j)
    advantages: torch.Tensor  # (N,) N = B * G
    weights: torch.Tensor  # (M,) each token's weight in the summed loss
    n_tokens: int
    count: int  # what the summed loss is divided by: tokens (dapo), completions, or 1 (bnpo)
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # (sum, count) over its completions
    completions: list[dict[str, Any]] = field(default_factory=list)  # for rollouts.jsonl
    completion_ids: list[list[int]] = field(default_factory=list)  # each completion's sampled tokens
    rewards: torch.Tensor | None = None  # (N,) each completion's weighted reward, NaN where declined
    centred: torch.Tensor | None = (
        None  # (N,) reward minus group mean (0 where declined): --scale-rewards batch
    )
    # (M,) the log-probabilities under the weights that sampled the batch, and under the reference,
    # kept by the loss at its first pass when the batch serves several steps (--num-iterations)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    stand_in: bool = False  # a rank's copy of another's prompts, run so that every rank runs alike

    @property
    def n_targets(self) -> int:
        return self.count

    def to(self, device: torch.device) -> GroupBatch:
        tensors = ("inputs", "positions", "segments", "index", "targets", "seq", "advantages", "weights")
        kept = ("rewards", "centred", "old_logp", "ref_logp")
        moved = {k: getattr(self, k).to(device) for k in tensors}
        moved |= {k: None if getattr(self, k) is None else getattr(self, k).to(device) for k in kept}
        return GroupBatch(**moved, n_tokens=self.n_tokens, count=self.count, metrics=self.metrics,
                          completions=self.completions, completion_ids=self.completion_ids,
                          stand_in=self.stand_in)  # fmt: skip


@dataclass
class Rollout:
    """Samples, scores and batches: `rollout(examples)` -> GroupBatch."""

    model: nn.Module
    tokenizer: Tokenizer
    rewards: Sequence[Reward]
    num_generations: int
    max_completion_len: int
    loss: str = "dapo"  # decides each token's weight in the summed loss
    scale_rewards: str = "group"
    mask_truncated: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    pad_id: int = 0
    ignore_eos: bool = False  # every completion max_completion_len tokens long (benchmarks)

    def __post_init__(self) -> None:
        from weightsmith.engine import Engine

        # the C step where it applies (LoRA unmerged, quantized bases), reading the weights
        # being trained in place: no layout change under the optimizer
        self.engine = Engine(self.model, self.tokenizer, decode_layout=False)  # type: ignore[arg-type]

    def __call__(self, examples: Sequence[PromptExample], keys: Sequence[str]) -> GroupBatch:
        """Sample, score and batch `examples`; `keys[i]` names example i's draw (the run's seed,
        the micro-batch and the prompt's index), from which each completion's seed is made."""
        g = self.num_generations
        prompts = [e.ids for e in examples for _ in range(g)]
        rows = [e.row for e in examples for _ in range(g)]
        seeds = [completion_seed(key, j) for key in keys for j in range(g)]
        params = [
            SamplingParams(max_tokens=self.max_completion_len, temperature=self.temperature,
                           top_p=self.top_p, top_k=self.top_k, seed=s, ignore_eos=self.ignore_eos)
            for s in seeds
        ]  # fmt: skip
        done = generate_with(self.engine, self.model, prompts, params)
        texts = [c.text for c in done]
        ids = [list(c.token_ids) for c in done]
        table = score(self.rewards, texts, rows, [len(x) for x in ids], ids)  # (N, K), NaN: declined
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        declined = table.isnan().all(dim=1)
        total = (table * weights).nansum(dim=1)
        total[declined] = math.nan
        advantages = group_advantages(total, g, self.scale_rewards)
        truncated = [c.finish_reason == "length" for c in done]
        batch = self._collate(prompts, ids, advantages, truncated)
        batch.completion_ids, batch.rewards = ids, total
        if self.scale_rewards == "batch":  # scaled here by this batch's deviation; a step's by its own
            batch.centred = group_advantages(total, g, "none")
        batch.metrics = _metrics(self.rewards, table, total, g, ids, truncated)
        batch.completions = [
            {"prompt": e.source, "completion": t, "reward": None if math.isnan(r) else round(float(r), 6),
             "advantage": round(float(a), 6), "finish_reason": c.finish_reason}
            for e, t, r, a, c in zip([e for e in examples for _ in range(g)], texts, total.tolist(),
                                     advantages.tolist(), done, strict=True)
        ]  # fmt: skip
        return batch

    def _collate(
        self, prompts: list[list[int]], ids: list[list[int]], advantages: torch.Tensor, truncated: list[bool]
    ) -> GroupBatch:
        g = self.num_generations
        learnt = [
            bool(c) and not (cut and self.mask_truncated) for c, cut in zip(ids, truncated, strict=True)
        ]
        # a completion nothing is learnt from (TRL masks truncated ones whole) is left out of the rows
        rows = [
            prompts[k] + [t for j in range(k, k + g) if learnt[j] for t in ids[j]]
            for k in range(0, len(ids), g)
        ]
        t = max(len(r) for r in rows)
        inputs = torch.tensor([r + [self.pad_id] * (t - len(r)) for r in rows], dtype=torch.long)
        positions = torch.arange(t).repeat(len(rows), 1)
        segments = torch.full((len(rows), t), PADDING, dtype=torch.long)
        index, targets, seq, weights = [], [], [], []
        for row, k in enumerate(range(0, len(ids), g)):
            n_p = len(prompts[k])
            segments[row, :n_p] = PROMPT
            at = n_p  # where the next completion starts in the row
            for j in range(g):
                c = ids[k + j]
                if not learnt[k + j]:
                    continue
                positions[row, at : at + len(c)] = torch.arange(n_p, n_p + len(c))
                segments[row, at : at + len(c)] = FIRST + j
                # the prompt's last token predicts the first; each token after it the next
                index += [row * t + n_p - 1, *range(row * t + at, row * t + at + len(c) - 1)]
                targets += c
                seq += [k + j] * len(c)
                weights += [token_weight(self.loss, len(c), self.max_completion_len)] * len(c)
                at += len(c)
        count = len(targets) if self.loss in ("dapo", "cispo") else len(ids)
        if self.loss == "bnpo":  # this micro-batch's token mean, one of the step's micro-batch means
            weights, count = [w / len(targets) for w in weights], 1
        as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return GroupBatch(
            inputs, positions, segments, as_long(index), as_long(targets), as_long(seq), advantages,
            torch.tensor(weights, dtype=torch.float32), n_tokens=sum(map(len, rows)), count=count,
        )  # fmt: skip


def generate_with(
    engine: Any, model: nn.Module, prompts: list[list[int]], params: list[SamplingParams]
) -> list:
    """`engine.generate(prompts, params)` from the model being trained, in eval mode (no
    dropout) for the while."""
    was_training = model.training
    model.eval()
    try:
        return engine.generate(prompts, params)
    finally:
        model.train(was_training)


def completion_seed(key: str, j: int) -> int:
    """The sampling seed of completion `j` of a draw: a hash of the draw's key, so it depends
    on neither the process that samples it (ranks) nor what was sampled before (resume)."""
    digest = hashlib.blake2b(f"{key}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def token_weight(loss: str, length: int, max_completion_len: int) -> float:
    """A completion token's weight in the summed loss: 1 (dapo, cispo: the step's token mean;
    bnpo: divided by the micro-batch's tokens later),
    1/length (grpo, sapo: each completion's token mean), 1/max_completion_len (dr_grpo: Dr.
    GRPO's constant), as TRL sums each loss type."""
    mean_of_means = 1.0 / max(length, 1)
    return {"dapo": 1.0, "cispo": 1.0, "bnpo": 1.0, "grpo": mean_of_means, "sapo": mean_of_means,
            "dr_grpo": 1.0 / max_completion_len}[loss]  # fmt: skip


def group_advantages(rewards: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    """(N,) advantages of rewards in consecutive groups of `group`: each minus its group's mean,
    divided by the group's deviation + 1e-4 ("group"), by all of `rewards`' ("batch") or not
    ("none"); NaN rewards (declined) are left out of means and deviations and get advantage 0."""
    grouped = rewards.view(-1, group)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (nan_std(grouped, dim=1) + 1e-4)
    elif scale == "batch":
        centred = centred / (nan_std(rewards.reshape(1, -1), dim=1) + 1e-4)
    return torch.nan_to_num(centred.reshape(-1), nan=0.0)


def nan_std(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The Bessel-corrected standard deviation along `dim` of the non-NaN values (kept as a
    size-1 dim); NaN where fewer than two."""
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    centred = x - torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean(centred**2, dim=dim, keepdim=True) * count / (count - 1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))


def _metrics(
    rewards: Sequence[Reward], table: torch.Tensor, total: torch.Tensor, group: int,
    ids: list[list[int]], truncated: list[bool],
) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Each metric as (sum, count) over the batch's completions (a reward's over those it scored;
    `reward_zero_std` over groups), so that the loop's means over a step equal TRL's over all
    its completions however the step is split into micro-batches and ranks."""
    grouped = total.view(-1, group)
    scored = ~grouped.isnan()
    # the spread of each group's scored rewards (declined ones left out, as in its advantages)
    top = grouped.masked_fill(~scored, -math.inf).max(dim=1).values
    bottom = grouped.masked_fill(~scored, math.inf).min(dim=1).values
    spread = torch.where(scored.sum(dim=1) > 1, top - bottom, torch.zeros_like(top))
    n = float(len(ids))
    out = {
        "reward": _nansum(total),
        "reward_zero_std": (float((spread == 0).sum()), float(len(spread))),
        "completion_len": (float(sum(map(len, ids))), n),
        "truncated": (float(sum(truncated)), n),
    }
    for k, reward in enumerate(rewards):
        out[f"reward_{reward.name}"] = _nansum(table[:, k])
    return out


def _nansum(x: torch.Tensor) -> tuple[float, float]:
    kept = x[~x.isnan()]
    return float(kept.sum()), float(len(kept))


class PromptSource:
    """A BatchSource over prompts: each batch is sampled by `rollout` when asked for, its seeds
    from `clock()` (which micro-batch or evaluation this is: the same on every rank and after a
    resume) and each prompt's index."""

    def __init__(
        self,
        examples: list[PromptExample],
        rollout: Rollout | None = None,
        clock: Callable[[], str] | None = None,
    ) -> None:
        self.examples = examples
        self.rollout = rollout
        self.clock = clock

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> list[int]:
        return [len(e.ids) for e in self.examples]

    def batch(self, indices: Sequence[int]) -> GroupBatch:
        assert self.rollout is not None and self.clock is not None, "set the rollout and clock first"
        draw = self.clock()
        return self.rollout([self.examples[i] for i in indices], [f"{draw}/{i}" for i in indices])
