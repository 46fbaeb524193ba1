"""Distillation's data: `finetune`'s rows, and for `--on-policy` the prompts whose answers the
student samples itself.

Off-policy (the default) the student and teacher both read the data's own answers: finetune's
formats, rows and packing (data.py). With `--on-policy F` (GKD's lambda), a seeded draw per
micro-batch (a hash of the run's seed and the micro-batch's number: the same on every rank and
after a resume) picks a share F of the micro-batches whose answers are sampled from the student
as it is at that step (the weights being trained, LoRA active), each completion with its own
seed, ending at an end token (kept, as TRL keeps it) or after `--max-completion-len` tokens;
the teacher then scores the student's own tokens (On-Policy Distillation, Agarwal et al. 2024;
TRL's `GKDTrainer` lmbda, and with F = 1 its `DistillationTrainer`).

On-policy data is conversations (chat or instruction lines) whose last turn is the assistant's:
the prompt is every turn before it, rendered with the chat template's generation prompt; the
last turn is the answer off-policy micro-batches and validation use. With `--on-policy 1` a
prompt-only file (TRL's `{"prompt": [messages] | "text"}`, as `grpo` reads) serves too; its
validation then samples as well (seeded by the step). Every line is checked before the model
loads: text lines, a conversation ending with a user turn, or a prompt that leaves no room for
`--max-completion-len` are one-line errors naming the line.

Not here: the loss (distill_loss.py), the command (distill.py), sampling itself (engine.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from weightsmith.sampling import SamplingParams
from weightsmith.tokenizer import Tokenizer
from weightsmith.train.data import Batch, DataError, DataStats, Row, collate, read_records, tokenize_records
from weightsmith.train.grpo_data import completion_seed, generate_with, read_prompts, tokenize_prompts
from weightsmith.train.preference_data import render_messages


@dataclass
class PromptedExample:
    """A prompt the student may answer itself, and the data's own answer as a finetune row
    (None for a prompt-only line)."""

    prompt: list[int]
    row: Row | None
    source: str = ""


@dataclass
class SampledBatch(Batch):
    """A micro-batch; `sampled` 1 where the student wrote its answers (its `completion_tokens`)."""

    sampled: float = 0.0
    completion_tokens: int = 0

    def to(self, device: torch.device) -> SampledBatch:
        moved = super().to(device)
        return SampledBatch(**moved.__dict__, sampled=self.sampled, completion_tokens=self.completion_tokens)


@dataclass
class Sampler:
    """The student answering prompts: `sampler(prompts, keys)` -> completions' ids."""

    model: nn.Module
    tokenizer: Tokenizer
    max_completion_len: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        from weightsmith.engine import Engine

        self.engine = Engine(self.model, self.tokenizer, decode_layout=False)  # type: ignore[arg-type]

    def __call__(self, prompts: Sequence[list[int]], keys: Sequence[str]) -> list[list[int]]:
        params = [
            SamplingParams(max_tokens=self.max_completion_len, temperature=self.temperature,
                           seed=completion_seed(key, 0))
            for key in keys
        ]  # fmt: skip
        return [list(c.token_ids) for c in generate_with(self.engine, self.model, list(prompts), params)]


def on_policy_draw(key: str) -> float:
    """A uniform number in [0, 1) from a micro-batch's key: whether the student answers it."""
    digest = hashlib.blake2b(f"{key}/on-policy".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class DistillSource:
    """A batch source over `PromptedExample`s: the data's answers, or, for a share `on_policy`
    of the micro-batches (every one, for prompt-only data), the student's own; `clock()` names
    the micro-batch (set with `sampler` by the command)."""

    def __init__(self, examples: list[PromptedExample], pad_id: int, on_policy: float) -> None:
        self.examples, self.pad_id, self.on_policy = examples, pad_id, on_policy
        self.sampler: Sampler | None = None
        self.clock: Callable[[], str] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> list[int]:
        return [len(e.row.ids) if e.row is not None else len(e.prompt) for e in self.examples]

    def batch(self, indices: Sequence[int]) -> SampledBatch:
        chosen = [self.examples[i] for i in indices]
        key = self.clock() if self.clock is not None else ""
        if any(e.row is None for e in chosen) or (self.on_policy and on_policy_draw(key) < self.on_policy):
            assert self.sampler is not None, "set the sampler and clock first"
            answers = self.sampler([e.prompt for e in chosen], [f"{key}/{i}" for i in indices])
            rows = [_answered(e.prompt, a) for e, a in zip(chosen, answers, strict=True)]
            batch = collate(rows, self.pad_id)
            return SampledBatch(**batch.__dict__, sampled=1.0, completion_tokens=sum(map(len, answers)))
        batch = collate([e.row for e in chosen if e.row is not None], self.pad_id)
        return SampledBatch(**batch.__dict__)


def _answered(prompt: list[int], answer: list[int]) -> Row:
    """A row of a prompt and a sampled answer, learnt on the answer only (an empty answer: its
    prompt's last token predicts nothing, so the row carries no loss)."""
    ids = prompt + answer
    return Row(ids, [False] * len(prompt) + [True] * len(answer), [len(ids)])


# ----- reading ------------------------------------------------------------------------------------


def _prompt_only(path: str) -> bool:
    """Whether a file's first line is TRL's prompt-only format (a 'prompt' and no answer)."""
    import json

    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    return False  # the reader names the line
                return isinstance(obj, dict) and "prompt" in obj and not {"messages", "completion"} & set(obj)
    return False


def read_prompted(path: str, on_policy: float) -> list:
    """Every line of an on-policy file, checked: finetune's records, or prompt records."""
    if _prompt_only(path):
        if on_policy < 1:
            raise DataError(
                f"{path}:1: prompt: a prompt-only line has no answer for the off-policy micro-batches; give "
                "--on-policy 1, or write conversations that end with the assistant's answer"
            )
        return read_prompts(path)
    records = read_records(path)
    for r in records:
        if r.messages is None:
            raise DataError(
                f"{r.source}: a text line has no prompt for the student to answer; --on-policy needs "
                "conversations (messages or instruction lines)"
            )
        if r.messages[-1]["role"] != "assistant":
            raise DataError(
                f"{r.source}: the conversation ends with a {r.messages[-1]['role']} turn; --on-policy samples "
                "the last assistant turn, so end each conversation with one"
            )
    return records


def tokenize_prompted(
    records: list, tokenizer: Tokenizer, *, max_seq_len: int, max_completion_len: int, train_on_prompt: bool
) -> tuple[list[PromptedExample], DataStats]:
    """Each record's prompt (at most `max_seq_len - max_completion_len` tokens, else a
    DataError naming its line) and finetune row."""
    room = max_seq_len - max_completion_len
    if records and not hasattr(records[0], "messages"):  # prompt-only lines
        prompts, counts = tokenize_prompts(records, tokenizer, room, ())
        stats = DataStats(examples=len(prompts), tokens=counts["tokens"], longest=counts["longest"])
        return [PromptedExample(p.ids, None, p.source) for p in prompts], stats
    examples, stats = tokenize_records(
        records, tokenizer, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt
    )
    by_source = {e.source: e for e in examples}
    out = []
    for record in records:
        prompt = render_messages(
            tokenizer, record.messages[:-1], record.source, "messages", generation_prompt=True
        )
        if len(prompt) > room:
            raise DataError(
                f"{record.source}: messages: the prompt's {len(prompt)} tokens leave no room for an answer of "
                f"--max-completion-len {max_completion_len} within --max-seq-len {max_seq_len} (at most {room}); "
                "shorten it or raise --max-seq-len"
            )
        example = by_source.get(record.source)
        if example is None:  # no answer token left after truncation (counted as dropped)
            continue
        out.append(
            PromptedExample(prompt, Row(example.ids, example.targets, [len(example.ids)]), record.source)
        )
    return out, stats
