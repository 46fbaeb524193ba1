"""Preference pairs: read and check TRL's preference formats, render them with the model's
chat template, tokenize with the prompt masked, truncate, and batch them for DPO.

One JSON object per line, in one of TRL's preference formats (one format per file):

- conversational, explicit prompt: `{"prompt": [messages], "chosen": [messages],
  "rejected": [messages]}`; the prompt ends with a user turn, each answer is assistant
  turns (what `weightsmith arena export` and red-team pairs write)
- conversational, implicit prompt: `{"chosen": [messages], "rejected": [messages]}`, two
  whole conversations; the prompt is the messages they share from the start
- text: `{"prompt": "...", "chosen": "...", "rejected": "..."}` (or implicit: the longest
  shared start of `chosen` and `rejected`, as TRL's `extract_prompt` finds it)

Other keys (`meta`, ids, scores) are ignored, as TRL ignores extra columns. Every line is
checked before anything is tokenized, and every pair is rendered and measured before a
model loads: a bad line stops everything with `FILE:LINE: FIELD: problem (how to fix)`.

Tokenizing follows TRL's `DPOTrainer`: a conversation's prompt is rendered with the
generation prompt, prompt + answer without it, and the answer is every token after the
longest token prefix the prompt shares with both renderings (so it includes the
end-of-turn token and whatever the template writes after it). Text pairs are tokenized as
plain text, with EOS appended to each answer that lacks it. Only answer tokens carry
log-probabilities. Sequences longer than `max_seq_len` lose the start of the prompt first
(down to `max_prompt_len` tokens, when that is set), then the end of the answers. A batch
holds each pair as one row, the prompt once (`PairBatch`).

Not here: the loss (losses.py, dpo.py), the loop (loop.py).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import WeightsmithError
from weightsmith.files import json_object_line
from weightsmith.tokenizer import Tokenizer
from weightsmith.train.data import ROLES, DataError, read_jsonl

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class PairRecord:
    """One checked line: a prompt and two answers, all text or all messages."""

    source: str  # "file:line"
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    margin: float = 0.0  # how much more the chosen answer is preferred (a reward model's margin)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class PairExample:
    """Token ids: the shared prompt and each answer (what gets log-probabilities)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    source: str = ""
    margin: float = 0.0


@dataclass
class PairStats:
    examples: int = 0
    tokens: int = 0  # prompt + chosen + rejected
    answer_tokens: int = 0
    truncated: int = 0
    longest: int = 0  # the longest prompt + answer before truncation
    prompt_mismatch: int = 0  # the prompt alone renders differently from its start in prompt + answer

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# ----- reading and checking -----------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[PairRecord]:
    """Every line of a JSONL file of pairs, checked; raises DataError naming the first bad line."""
    parsed = read_jsonl(path, parse_pair, "preference pairs", "pairs")
    (first, kind), records = parsed[0], [record for record, _ in parsed]
    for record, other in parsed:
        if other != kind:
            key = "prompt" if ("implicit" in other) != ("implicit" in kind) else "chosen"
            raise DataError(
                f"{record.source}: {key}: this line is {other} but {first.source} is {kind} "
                "(write every line of a file in one format)"
            )
    return records


def parse_pair(line: str, where: str) -> tuple[PairRecord, str]:
    """The record and its format ("conversational", "implicit-prompt text", ...)."""
    obj = json_object_line(line, where, "preference pair", DataError)
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(
                f"{where}: {key}: missing (each line needs 'chosen' and 'rejected', and 'prompt' unless "
                "both hold the whole conversation)"
            )
    explicit = "prompt" in obj
    if isinstance(obj["chosen"], list):
        kind = "conversational" if explicit else "implicit-prompt conversational"
        record = _conversational(obj, where) if explicit else _implicit_conversational(obj, where)
    elif isinstance(obj["chosen"], str):
        kind = "text" if explicit else "implicit-prompt text"
        record = _text(obj, where) if explicit else _implicit_text(obj, where)
    else:
        raise DataError(
            f"{where}: chosen: must be a string or a list of messages, got {kind_of(obj['chosen'])}"
        )
    if record.chosen == record.rejected:
        raise DataError(
            f"{where}: rejected: identical to chosen (a pair needs two different answers; drop it)"
        )
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(
            f"{where}: margin: must be a number (how much more the chosen answer is preferred), got "
            f"{json.dumps(margin)[:40]}"
        )
    record.margin = float(margin)
    return record, kind


def kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(obj: dict[str, Any], where: str) -> PairRecord:
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key}: must be a string, as 'chosen' is; got {kind_of(obj[key])}")
    if not obj["prompt"].strip():
        raise DataError(f"{where}: prompt: empty (write the text the answers continue)")
    for key in ("chosen", "rejected"):
        _nonempty_text(obj[key], where, key)
    return PairRecord(where, obj["prompt"], obj["chosen"], obj["rejected"])


def _nonempty_text(text: str, where: str, key: str) -> None:
    if not text.strip():
        which = "preferred" if key == "chosen" else "dispreferred"
        raise DataError(f"{where}: {key}: empty answer (write the {which} answer's text)")


def _implicit_text(obj: dict[str, Any], where: str) -> PairRecord:
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not isinstance(rejected, str):
        raise DataError(f"{where}: rejected: must be a string, as 'chosen' is; got {kind_of(rejected)}")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and n < len(chosen) and chosen[n - 1] == " ":  # the space starts the answers (TRL's rule)
        n -= 1
    if not chosen[:n].strip():
        raise DataError(
            f"{where}: prompt: chosen and rejected share no start, so there is no prompt "
            "(add a 'prompt' key, or begin both with the same prompt text)"
        )
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        _nonempty_text(text[n:], where, key)
    return PairRecord(where, chosen[:n], chosen[n:], rejected[n:])


def parse_messages(value: Any, where: str, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: {key}: must be a non-empty list of {{'role', 'content'}} messages, got {kind_of(value)}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise DataError(
                f"{where}: {key}: messages[{i}] has role {role!r} (use one of {', '.join(ROLES)})"
            )
        content = m.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content
        ):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise DataError(
                f"{where}: {key}: messages[{i}].content must be a string or a list of text parts, "
                f"got {kind_of(content)}"
            )
        out.append({"role": m["role"], "content": content})
    return out


def check_prompt(prompt: Messages, where: str) -> None:
    for i, m in enumerate(prompt):
        if m["role"] == "system" and i:
            raise DataError(f"{where}: prompt: messages[{i}] is a system message (only the first may be one)")
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"{where}: prompt: the last message is {prompt[-1]['role']!r} (end the prompt with the user turn "
            "the answers reply to)"
        )


def check_answer(answer: Messages, where: str, key: str) -> None:
    for i, m in enumerate(answer):
        if m["role"] != "assistant":
            raise DataError(
                f"{where}: {key}: messages[{i}] has role {m['role']!r} (an answer holds assistant turns only; "
                "put earlier turns in the prompt)"
            )
    _nonempty_text("".join(m["content"] for m in answer), where, key)


def _conversational(obj: dict[str, Any], where: str) -> PairRecord:
    prompt = parse_messages(obj["prompt"], where, "prompt")
    check_prompt(prompt, where)
    answers = {key: parse_messages(obj[key], where, key) for key in ("chosen", "rejected")}
    for key, answer in answers.items():
        check_answer(answer, where, key)
    return PairRecord(where, prompt, answers["chosen"], answers["rejected"])


def _implicit_conversational(obj: dict[str, Any], where: str) -> PairRecord:
    chosen, rejected = (parse_messages(obj[key], where, key) for key in ("chosen", "rejected"))
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(
            f"{where}: prompt: chosen and rejected share no first message, so there is no prompt "
            "(add a 'prompt' key, or begin both conversations with the same turns)"
        )
    prompt = chosen[:n]
    check_prompt(prompt, where)
    for key, answer in (("chosen", chosen[n:]), ("rejected", rejected[n:])):
        if not answer:
            raise DataError(
                f"{where}: {key}: empty answer (the conversation has no turn after the shared prompt)"
            )
        check_answer(answer, where, key)
    return PairRecord(where, prompt, chosen[n:], rejected[n:])


# ----- tokenizing ---------------------------------------------------------------------------------


def tokenize_pair(record: PairRecord, tokenizer: Tokenizer) -> tuple[PairExample, bool]:
    """Ids of one pair (no truncation), and whether the prompt alone tokenized differently
    from its start in prompt + answer (TRL's case: the answer then starts where they part)."""
    answers = {"chosen": record.chosen, "rejected": record.rejected}
    prompt, ids, mismatch = tokenize_answers(record.source, record.prompt, answers, tokenizer)
    example = PairExample(prompt, ids["chosen"], ids["rejected"], record.source, record.margin)
    if example.chosen == example.rejected:
        raise DataError(
            f"{record.source}: rejected: tokenizes exactly as chosen (a pair needs two different answers)"
        )
    return example, mismatch


def tokenize_answers(
    source: str, prompt: str | Messages, answers: dict[str, str | Messages], tokenizer: Tokenizer
) -> tuple[list[int], dict[str, list[int]], bool]:
    """The prompt's ids and each answer's (named by its field), as TRL splits them: a conversation
    rendered with the chat template (the prompt with the generation prompt, prompt + answer
    without), text as it is with EOS after the answer; the answer is what follows the longest
    start the prompt shares with every prompt + answer. Also whether that start is shorter than
    the prompt alone (it rendered differently)."""
    if isinstance(prompt, list):
        if not tokenizer.chat_template:
            raise DataError(
                f"{source}: prompt: the model has no chat template to render conversations "
                "(write the data as plain strings)"
            )
        rendered = render_messages(tokenizer, list(prompt), source, "prompt", generation_prompt=True)
        full = {
            key: render_messages(tokenizer, list(prompt) + list(answer), source, key, generation_prompt=False)
            for key, answer in answers.items()
        }
    else:
        eos = tokenizer.eos_token or ""
        rendered = tokenizer.encode(prompt)
        full = {}
        for key, answer in answers.items():
            text = str(answer) if str(answer).endswith(eos) else str(answer) + eos
            full[key] = tokenizer.encode(prompt + text)
    shared = min(_common_prefix(rendered, ids) for ids in full.values())
    if shared == 0:
        raise DataError(
            f"{source}: prompt: the prompt and the prompt followed by an answer tokenize with no "
            "shared start, so the answer cannot be located (check the chat template)"
        )
    for key, ids in full.items():
        if len(ids) == shared:
            raise DataError(f"{source}: {key}: renders to no answer tokens (check the chat template)")
    first = next(iter(full.values()))
    return first[:shared], {key: ids[shared:] for key, ids in full.items()}, shared < len(rendered)


def render_messages(
    tokenizer: Tokenizer, messages: Any, where: str, key: str, *, generation_prompt: bool
) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except WeightsmithError as e:
        raise DataError(f"{where}: {key}: {e}") from None
    return tokenizer.encode(str(text), add_special_tokens=False)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fit_prompt(
    prompt: list[int], source: str, max_seq_len: int, max_prompt_len: int | None
) -> tuple[list[int], int]:
    """The prompt cut from the left to `max_prompt_len`, and the room it leaves an answer within
    `max_seq_len`; DataError where it leaves none."""
    if max_prompt_len is not None and len(prompt) > max_prompt_len:
        prompt = prompt[len(prompt) - max_prompt_len :]
    room = max_seq_len - len(prompt)
    if room < 1:
        cut = "" if max_prompt_len is None else f" after cutting it to --max-prompt-len {max_prompt_len}"
        raise DataError(
            f"{source}: prompt: {len(prompt)} tokens{cut} leave no room for an answer within "
            f"--max-seq-len {max_seq_len} (raise --max-seq-len, or cut prompts from the left with "
            "a smaller --max-prompt-len)"
        )
    return prompt, room


def truncate_pair(example: PairExample, max_seq_len: int, max_prompt_len: int | None) -> PairExample:
    """Cut the prompt from the left to `max_prompt_len`, then the answers from the right so that
    prompt + answer fits `max_seq_len`; DataError where the prompt leaves no room for an answer."""
    prompt, room = fit_prompt(example.prompt, example.source, max_seq_len, max_prompt_len)
    cut_pair = PairExample(
        prompt, example.chosen[:room], example.rejected[:room], example.source, example.margin
    )
    if cut_pair.chosen == cut_pair.rejected:
        raise DataError(
            f"{example.source}: rejected: the same as chosen in the first {room} answer tokens that fit "
            f"--max-seq-len {max_seq_len} (raise --max-seq-len or --max-prompt-len's cut)"
        )
    return cut_pair


def tokenize_pairs(
    records: Sequence[PairRecord],
    tokenizer: Tokenizer,
    *,
    max_seq_len: int,
    max_prompt_len: int | None = None,
) -> tuple[list[PairExample], PairStats]:
    """Tokenize and truncate every pair; the first bad one raises DataError."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    examples, stats = [], PairStats()
    for record in records:
        full, mismatch = tokenize_pair(record, tokenizer)
        stats.prompt_mismatch += mismatch
        longest = len(full.prompt) + max(len(full.chosen), len(full.rejected))
        stats.longest = max(stats.longest, longest)
        ex = truncate_pair(full, max_seq_len, max_prompt_len)
        stats.truncated += ex != full
        examples.append(ex)
        stats.examples += 1
        stats.answer_tokens += len(ex.chosen) + len(ex.rejected)
        stats.tokens += len(ex.prompt) + len(ex.chosen) + len(ex.rejected)
    return examples, stats


# ----- batches ------------------------------------------------------------------------------------


#: `PairBatch.segments` values.
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3


@dataclass
class PairBatch:
    """B pairs, one row each: the prompt once, then the chosen answer, then the rejected one.

    The rejected answer's positions restart where the prompt ends and, by the attention mask
    `losses.shared_prompt_mask` builds from `segments`, each answer sees only the prompt and
    itself: the same attention as two rows prompt + chosen and prompt + rejected, with the
    prompt's tokens computed once. Answer i of the batch (pair i's chosen answer for i < B,
    pair i - B's rejected one after) is scored at `index` (flat into (B, T)) against `targets`."""

    inputs: torch.Tensor  # (B, T) token ids
    positions: torch.Tensor  # (B, T) position ids
    segments: torch.Tensor  # (B, T) PROMPT, CHOSEN, REJECTED or PADDING
    index: torch.Tensor  # (N,) where in (B * T) the hidden state predicting each answer token is
    targets: torch.Tensor  # (N,) answer token ids
    answer: torch.Tensor  # (N,) which of the 2B answers each target belongs to
    lengths: torch.Tensor  # (2B,) answer tokens, chosen answers first
    n_tokens: int = 0  # real (unpadded) input tokens
    reference: torch.Tensor | None = None  # (2B,) precomputed reference log-probs, same order
    causal: bool = False  # no row has a second answer: plain causal attention serves

    @property
    def n_pairs(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_targets(self) -> int:
        return self.n_pairs  # DPO's loss is a mean over pairs

    def to(self, device: torch.device) -> PairBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        tensors = (
            self.inputs,
            self.positions,
            self.segments,
            self.index,
            self.targets,
            self.answer,
            self.lengths,
        )
        return PairBatch(*(move(t) for t in tensors), self.n_tokens, move(self.reference), self.causal)


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> PairBatch:
    """Right-padded rows of prompt + chosen + rejected (see `PairBatch`)."""
    b = len(pairs)
    t = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    inputs = torch.full((b, t), pad_id, dtype=torch.long)
    positions = torch.arange(t).repeat(b, 1)
    segments = torch.full((b, t), PADDING, dtype=torch.long)
    index, targets, answer = [], [], []
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt), len(p.chosen), len(p.rejected)
        inputs[i, : n_p + n_c + n_r] = torch.tensor(p.prompt + p.chosen + p.rejected)
        positions[i, n_p + n_c : n_p + n_c + n_r] = torch.arange(n_p, n_p + n_r)
        segments[i, :n_p], segments[i, n_p : n_p + n_c] = PROMPT, CHOSEN
        segments[i, n_p + n_c : n_p + n_c + n_r] = REJECTED
        last_prompt = i * t + n_p - 1  # predicts the first token of both answers
        chosen_at = torch.arange(i * t + n_p, i * t + n_p + n_c - 1)
        rejected_at = torch.arange(i * t + n_p + n_c, i * t + n_p + n_c + max(n_r - 1, 0))
        for k, (at, ids) in enumerate(((chosen_at, p.chosen), (rejected_at, p.rejected))):
            if not ids:  # an answer left out (KTO without its KL term): no targets, log-prob 0
                continue
            index.append(torch.cat([torch.tensor([last_prompt]), at]))
            targets.append(torch.tensor(ids))
            answer.append(torch.full((len(ids),), i + k * b))
    lengths = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs])
    n_tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    return PairBatch(
        inputs,
        positions,
        segments,
        torch.cat(index),
        torch.cat(targets),
        torch.cat(answer),
        lengths,
        n_tokens,
        causal=not any(p.rejected for p in pairs),
    )


@dataclass
class PairSource:
    """Pairs by index, made into `PairBatch`es; `reference` (n, 2) holds precomputed reference
    log-probs (chosen, rejected) once they are known."""

    pairs: list[PairExample]
    pad_id: int
    reference: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def lengths(self) -> list[int]:
        return [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs]

    def batch(self, indices: Sequence[int]) -> PairBatch:
        batch = collate_pairs([self.pairs[i] for i in indices], self.pad_id)
        if self.reference is not None:
            picked = self.reference[list(indices)]  # (B, 2)
            batch.reference = torch.cat([picked[:, 0], picked[:, 1]])
        return batch
