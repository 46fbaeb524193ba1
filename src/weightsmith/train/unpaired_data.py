"""Unpaired preference data for KTO: read TRL's unpaired format (or pairs, unpaired), check,
tokenize and truncate it, give each example a KL partner, and batch it.

One JSON object per line, in one format per file:

- conversational: `{"prompt": [messages], "completion": [messages], "label": true}`; the
  prompt ends with a user turn, the completion is assistant turns
- text: `{"prompt": "...", "completion": "...", "label": false}`
- any of TRL's paired formats (`preference_data`): each pair becomes two examples, its chosen
  answer desirable and its rejected one undesirable, as TRL's `unpair_preference_dataset` does

`label` is a JSON boolean: true for a completion to encourage (a thumbs-up), false for one to
discourage. Tokenizing is `preference_data.tokenize_answers`, TRL's split of prompt and
completion; truncation cuts the prompt from the left to `max_prompt_len`, then the
completion to fit `max_seq_len`.

KTO's reference point z0 is estimated from completions scored under prompts they do not
answer. TRL rotates the completions inside each batch of a fixed, unshuffled order. Here each
example gets a fixed partner, drawn once from a seeded permutation (the next example in it
whose prompt differs), so the data can be shuffled every epoch, a batch may hold one
example, a resumed run sees the same partners, and the reference's KL log-probs can be
computed once (`--precompute-ref`). The partner's completion is cut to the room the
example's prompt leaves. A batch holds the examples three ways (`KtoBatch`): for the
reference, as `PairBatch` rows of the prompt once, the completion, then the KL completion (one
forward scores both); for the policy, prompt + completion (with gradients) and prompt + KL
completion (without) apart, which costs less than one row of all three with gradients unless
the prompts are over twice as long as the KL completions.

Not here: the loss and command (kto.py), the pair layout and its attention (preference_data.py,
losses.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightsmith.files import json_object_line
from weightsmith.tokenizer import Tokenizer
from weightsmith.train.data import DataError, read_jsonl
from weightsmith.train.preference_data import (
    Messages,
    PairBatch,
    PairExample,
    check_answer,
    check_prompt,
    collate_pairs,
    fit_prompt,
    kind_of,
    parse_messages,
    parse_pair,
    tokenize_answers,
)

#: How far along the permutation a partner is looked for before one with the same prompt is taken.
PARTNER_SEARCH = 64


@dataclass
class UnpairedRecord:
    """One checked example: a prompt, a completion (both text or both messages) and its label."""

    source: str  # "file:line" (a pair's two examples share it)
    prompt: str | Messages
    completion: str | Messages
    label: bool


@dataclass
class UnpairedExample:
    prompt: list[int]
    completion: list[int]
    label: bool
    source: str = ""


@dataclass
class UnpairedStats:
    examples: int = 0
    desirable: int = 0
    undesirable: int = 0
    tokens: int = 0  # prompt + completion
    completion_tokens: int = 0
    truncated: int = 0
    longest: int = 0
    prompt_mismatch: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# ----- reading and checking -----------------------------------------------------------------------


def read_unpaired(path: str | Path) -> list[UnpairedRecord]:
    """Every example of a JSONL file, checked (a pair gives two); raises DataError naming the
    first bad line."""
    parsed = read_jsonl(path, _parse_line, "unpaired preference examples", "examples")
    (first, kind) = parsed[0][0][0], parsed[0][1]
    for records, other in parsed:
        if other != kind:
            raise DataError(
                f"{records[0].source}: this line is {other} but {first.source} is {kind} "
                "(write every line of a file in one format)"
            )
    return [record for records, _ in parsed for record in records]


def _parse_line(line: str, where: str) -> tuple[list[UnpairedRecord], str]:
    obj = json_object_line(line, where, "unpaired preference example", DataError)
    if "chosen" in obj or "rejected" in obj:
        pair, kind = parse_pair(line, where)
        chosen = UnpairedRecord(where, pair.prompt, pair.chosen, True)
        return [chosen, UnpairedRecord(where, pair.prompt, pair.rejected, False)], f"paired {kind}"
    for key in ("prompt", "completion", "label"):
        if key not in obj:
            raise DataError(
                f"{where}: {key}: missing (each line needs 'prompt', 'completion' and 'label', or "
                "'chosen' and 'rejected' for a pair)"
            )
    label = obj["label"]
    if not isinstance(label, bool):
        raise DataError(
            f"{where}: label: must be true (a completion to encourage) or false (one to discourage), "
            f"got {json.dumps(label)[:40]}"
        )
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(completion, list):
        messages = parse_messages(prompt, where, "prompt")
        check_prompt(messages, where)
        answer = parse_messages(completion, where, "completion")
        check_answer(answer, where, "completion")
        return [UnpairedRecord(where, messages, answer, label)], "conversational"
    if not isinstance(completion, str):
        raise DataError(
            f"{where}: completion: must be a string or a list of messages, got {kind_of(completion)}"
        )
    if not isinstance(prompt, str):
        raise DataError(f"{where}: prompt: must be a string, as 'completion' is; got {kind_of(prompt)}")
    if not prompt.strip():
        raise DataError(f"{where}: prompt: empty (write the text the completion continues)")
    if not completion.strip():
        raise DataError(f"{where}: completion: empty (write the completion's text)")
    return [UnpairedRecord(where, prompt, completion, label)], "text"


# ----- tokenizing ---------------------------------------------------------------------------------


def tokenize_unpaired(
    records: Sequence[UnpairedRecord],
    tokenizer: Tokenizer,
    *,
    max_seq_len: int,
    max_prompt_len: int | None = None,
) -> tuple[list[UnpairedExample], UnpairedStats]:
    """Tokenize and truncate every example; the first bad one raises DataError."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    examples, stats = [], UnpairedStats()
    for r in records:
        prompt, ids, mismatch = tokenize_answers(r.source, r.prompt, {"completion": r.completion}, tokenizer)
        completion = ids["completion"]
        stats.longest = max(stats.longest, len(prompt) + len(completion))
        cut, room = fit_prompt(prompt, r.source, max_seq_len, max_prompt_len)
        example = UnpairedExample(cut, completion[:room], r.label, r.source)
        stats.truncated += len(cut) < len(prompt) or room < len(completion)
        stats.prompt_mismatch += mismatch
        stats.examples += 1
        stats.desirable += r.label
        stats.undesirable += not r.label
        stats.completion_tokens += len(example.completion)
        stats.tokens += len(example.prompt) + len(example.completion)
        examples.append(example)
    return examples, stats


def kl_partners(examples: Sequence[UnpairedExample], seed: int) -> list[int]:
    """Each example's KL partner: the next example along a seeded permutation whose prompt
    differs from its own (within PARTNER_SEARCH steps; else the next one)."""
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    prompts = [hash(tuple(e.prompt)) for e in examples]
    partners = [0] * n
    for at, i in enumerate(order):
        candidates = (order[(at + k) % n] for k in range(1, min(n, PARTNER_SEARCH + 1)))
        partners[i] = next((j for j in candidates if prompts[j] != prompts[i]), order[(at + 1) % n])
    return partners


# ----- batches ------------------------------------------------------------------------------------


@dataclass
class KtoBatch:
    """B examples in three layouts (`PairBatch`es, one row per example): `both`, the completion
    then the KL partner's completion after the prompt (what the reference scores, in one
    forward); `own`, the completions alone (the policy's pass with gradients); `kl`, the KL
    completions alone (the policy's pass without; None without a KL term)."""

    both: PairBatch
    own: PairBatch
    kl: PairBatch | None
    labels: torch.Tensor  # (B,) bool: desirable
    reference: torch.Tensor | None = None  # (2B,) precomputed: completions', then KL completions'
    stand_in: bool = False  # a rank's copy of another's examples (loop.mark_stand_in)

    @property
    def n_tokens(self) -> int:
        return self.own.n_tokens

    @property
    def n_targets(self) -> int:
        return len(self.labels)  # KTO's loss is a mean over examples

    def to(self, device: torch.device) -> KtoBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return KtoBatch(move(self.both), move(self.own), move(self.kl), move(self.labels), move(self.reference),
                        self.stand_in)  # fmt: skip


@dataclass
class UnpairedSource:
    """Examples by index, made into `KtoBatch`es; `partners` (None: no KL term) name each one's
    KL partner, whose completion is cut to the room its prompt leaves in `max_seq_len`;
    `reference` (n, 2) holds precomputed reference log-probs (completion, KL completion)."""

    examples: list[UnpairedExample]
    pad_id: int
    max_seq_len: int
    partners: list[int] | None = None
    reference: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.examples)

    def _kl_completion(self, i: int) -> list[int]:
        if self.partners is None:
            return []
        room = self.max_seq_len - len(self.examples[i].prompt)
        return self.examples[self.partners[i]].completion[:room]

    def lengths(self) -> list[int]:
        return [len(e.prompt) + len(e.completion) for e in self.examples]

    def batch(self, indices: Sequence[int]) -> KtoBatch:
        picked = [(self.examples[i], self._kl_completion(i)) for i in indices]
        own = collate_pairs([PairExample(e.prompt, e.completion, []) for e, _ in picked], self.pad_id)
        kl = both = None
        if self.partners is not None:
            kl = collate_pairs([PairExample(e.prompt, k, []) for e, k in picked], self.pad_id)
            both = collate_pairs([PairExample(e.prompt, e.completion, k) for e, k in picked], self.pad_id)
        labels = torch.tensor([e.label for e, _ in picked], dtype=torch.bool)
        batch = KtoBatch(both or own, own, kl, labels)
        if self.reference is not None:
            chosen = self.reference[list(indices)]  # (B, 2)
            batch.reference = torch.cat([chosen[:, 0], chosen[:, 1]])
        return batch
