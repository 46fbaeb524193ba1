"""Fine-tuning data: read and check JSONL, render it with the model's chat template,
tokenize it with a loss mask, and cut it into batches in a resumable order.

One JSON object per line, in any of three formats:

- chat (OpenAI's): `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`
- instruction: `{"instruction": ..., "input": ... (optional), "output": ...}` (one user turn and
  one assistant turn)
- text: `{"text": ...}` (raw text; every token is learned)

Chat and instruction examples are rendered with the checkpoint's own chat template
and, by default, carry loss on every assistant turn only. Every line is checked before
anything is tokenized, and a bad file stops everything with the first problem's
file:line. Not here: the loss (sft.py) and the optimisation loop (loop.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from weightsmith.errors import WeightsmithError
from weightsmith.files import json_object_line
from weightsmith.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label value that carries no loss (the convention of torch's cross_entropy)
T = TypeVar("T")


class DataError(WeightsmithError):
    """A training or validation file cannot be used as it is."""


@dataclass
class Record:
    """One checked line: a conversation, or raw text."""

    source: str  # "file:line"
    messages: list[dict[str, str]] | None = None
    text: str | None = None


@dataclass
class Example:
    """Token ids and, per token, whether the model learns to produce it."""

    ids: list[int]
    targets: list[bool]
    source: str = ""


@dataclass
class Row:
    """One training row: an example, or several packed ones (`lengths` sums to len(ids))."""

    ids: list[int]
    targets: list[bool]
    lengths: list[int]


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # no target token left after truncation
    longest: int = 0
    rows: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# ----- reading and checking -----------------------------------------------------------------------


def read_records(path: str | Path) -> list[Record]:
    """Every line of a JSONL file, checked; raises DataError naming the first bad line."""
    return read_jsonl(path, _parse_line, "training examples", "examples")


def read_jsonl(path: str | Path, parse: Callable[[str, str], T], items: str, short: str) -> list[T]:
    """`parse(line, "file:line")` of every non-blank line; all lines are read, and the first
    DataError (with how many more lines were bad) is raised. `items` and `short` name what a
    line holds ("training examples", "examples") in the messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSONL file of {items}")
    records, problems = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                records.append(parse(line, where))
            except DataError as e:
                problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 1} more bad lines)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    if not records:
        raise DataError(f"{path}: the file has no {short}; write one JSON object per line")
    return records


def _parse_line(line: str, where: str) -> Record:
    obj = json_object_line(line, where, "example", DataError)
    if "messages" in obj:
        return Record(where, messages=_check_messages(obj["messages"], where))
    if "instruction" in obj or "output" in obj:
        return Record(where, messages=_instruction_messages(obj, where))
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Record(where, text=obj["text"])
    raise DataError(
        f"{where}: unknown format (keys: {', '.join(sorted(obj)) or 'none'}); use 'messages', "
        "'instruction'/'input'/'output' or 'text'"
    )


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has unknown role {role!r}; use one of {', '.join(ROLES)}"
            )
        if role == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}] is a system message; only the first message may be one")
        out.append({"role": role, "content": _content_text(m.get("content"), f"{where}: messages[{i}]")})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    first_assistant = roles.index("assistant")
    if "user" not in roles[:first_assistant]:
        raise DataError(f"{where}: messages[{first_assistant}] answers before any user message")
    return out


def _content_text(content: Any, where: str) -> str:
    """A string, or OpenAI's list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise DataError(f"{where}: 'content' must be a string or a list of {{'type': 'text', 'text': ...}} parts")


def _instruction_messages(obj: dict, where: str) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string in the instruction format")
    extra = obj.get("input", "")
    if not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be a string")
    prompt = obj["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded random validation split of `fraction` (at least one record each side)."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {fraction}")
    if len(records) < 2:
        raise DataError(
            "need at least 2 examples to hold out a validation split; pass --valid FILE or --valid-fraction 0"
        )
    n_valid = min(len(records) - 1, max(1, round(len(records) * fraction)))
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_valid])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# ----- tokenizing -----------------------------------------------------------------------------------


def tokenize_record(record: Record, tokenizer: Tokenizer, *, train_on_prompt: bool = False) -> Example:
    """Ids and targets for one record (no truncation)."""
    if record.text is not None:
        ids = tokenizer.encode(record.text, add_special_tokens=True)
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # so the model learns where a text ends
        return Example(ids, [True] * len(ids), record.source)
    assert record.messages is not None
    if not tokenizer.chat_template:
        raise DataError(
            f"{record.source}: the model has no chat template to render conversations; "
            "use the {'text': ...} format"
        )
    try:
        text, spans = tokenizer.chat_spans(record.messages)
    except WeightsmithError as e:
        raise DataError(f"{record.source}: {e}") from None
    ids, offsets = tokenizer.encode_offsets(text)
    if train_on_prompt:
        return Example(ids, [True] * len(ids), record.source)
    return Example(ids, _in_spans(offsets, spans), record.source)


def _in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """A token is a target when it starts inside an assistant span."""
    out, k = [], 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        out.append(k < len(spans) and spans[k][0] <= start < spans[k][1] and end > start)
    return out


def tokenize_records(
    records: Iterable[Record],
    tokenizer: Tokenizer,
    *,
    max_seq_len: int,
    train_on_prompt: bool = False,
) -> tuple[list[Example], DataStats]:
    """Tokenize, truncate to `max_seq_len`, and drop examples left with nothing to learn."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    examples, stats = [], DataStats()
    for record in records:
        ex = tokenize_record(record, tokenizer, train_on_prompt=train_on_prompt)
        stats.longest = max(stats.longest, len(ex.ids))
        if len(ex.ids) > max_seq_len:
            stats.truncated += 1
            ex = Example(ex.ids[:max_seq_len], ex.targets[:max_seq_len], ex.source)
        if not any(ex.targets[1:]):
            stats.dropped += 1
            continue
        examples.append(ex)
        stats.examples += 1
        stats.tokens += len(ex.ids)
        stats.target_tokens += sum(ex.targets[1:])
    return examples, stats


def to_rows(examples: list[Example], max_seq_len: int, *, packing: bool) -> list[Row]:
    """One row per example, or (packing) examples laid end to end in rows of at most
    `max_seq_len` tokens, in order, never splitting an example."""
    if not packing:
        return [Row(e.ids, e.targets, [len(e.ids)]) for e in examples]
    rows: list[Row] = []
    current = Row([], [], [])
    for e in examples:
        if current.ids and len(current.ids) + len(e.ids) > max_seq_len:
            rows.append(current)
            current = Row([], [], [])
        current.ids += e.ids
        current.targets += e.targets
        current.lengths.append(len(e.ids))
    if current.ids:
        rows.append(current)
    return rows


# ----- batches ------------------------------------------------------------------------------------


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    labels: torch.Tensor  # (B, T) next token ids, IGNORE where no loss
    positions: torch.Tensor | None = None  # (B, T), restarting per packed document
    documents: torch.Tensor | None = None  # (B, T) packed document index, -1 on padding
    n_tokens: int = 0  # real (unpadded) input tokens

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.inputs), move(self.labels), move(self.positions), move(self.documents), self.n_tokens
        )


@dataclass
class RowSource:
    """SFT rows, collated right-padded with `pad_id`."""

    rows: list[Row]
    pad_id: int

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int]) -> Batch:
        return collate([self.rows[i] for i in indices], self.pad_id)

    def lengths(self) -> list[int]:
        return [len(r.ids) for r in self.rows]


def collate(rows: Sequence[Row], pad_id: int) -> Batch:
    """Right-padded inputs ids[:-1] and labels ids[1:]; a label is kept where its token is a
    target and is not the first token of a packed document."""
    t = max(len(r.ids) for r in rows) - 1
    inputs = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    packed = any(len(r.lengths) > 1 for r in rows)
    positions = torch.zeros((len(rows), t), dtype=torch.long) if packed else None
    documents = torch.full((len(rows), t), -1, dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        ids = torch.tensor(r.ids, dtype=torch.long)
        keep = torch.tensor(r.targets, dtype=torch.bool)
        starts = torch.tensor([0, *r.lengths[:-1]]).cumsum(0)
        keep[starts] = False  # nothing predicts a document's first token
        n = len(r.ids) - 1
        inputs[i, :n] = ids[:-1]
        labels[i, :n] = torch.where(keep[1:], ids[1:], IGNORE)
        if packed:
            doc = torch.repeat_interleave(torch.arange(len(r.lengths)), torch.tensor(r.lengths))
            pos = torch.cat([torch.arange(length) for length in r.lengths])
            documents[i, :n], positions[i, :n] = doc[:-1], pos[:-1]
            # Padding stays -1: a document of its own to a mask, and no document to the
            # per-document attention (models/packed.py), which then skips it.
            positions[i, n:] = torch.arange(t - n)
    return Batch(inputs, labels, positions, documents, sum(len(r.ids) - 1 for r in rows))


#: --train.group-by-length sorts each run of this many batches of the epoch's shuffle by length.
MEGABATCH = 50


@dataclass
class BatchOrder:
    """Which rows make batch `index` of epoch `epoch`: a fresh seeded shuffle per epoch, so
    the order depends only on (seed, epoch, index) and a resumed run sees the same batches.

    With `lengths` (--train.group-by-length), rows of like lengths share a batch, so little of a
    batch is padding: the shuffle is cut into runs of `MEGABATCH` batches, each run is sorted
    longest first and cut into batches, and the batches of a run are shuffled again (transformers'
    `group_by_length` keeps them longest first). Every row is still seen once an epoch."""

    n_rows: int
    batch_size: int
    seed: int
    shuffle: bool = True
    lengths: Sequence[int] | None = None
    _cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def rows(self, epoch: int, index: int) -> list[int]:
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = self._epoch_order(epoch)
        order = self._cache[epoch]
        return order[index * self.batch_size : (index + 1) * self.batch_size]

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_rows))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_rows, generator=g).tolist()
        if self.lengths is None:
            return order
        b, run = self.batch_size, self.batch_size * MEGABATCH
        grouped = []
        for start in range(0, self.n_rows, run):
            part = sorted(order[start : start + run], key=lambda i: -self.lengths[i])
            batches = [part[k : k + b] for k in range(0, len(part), b)]
            # A short batch (the epoch's last rows) stays last: each batch index keeps b rows.
            full = [batches[k] for k in torch.randperm(len(batches) - (len(batches[-1]) < b), generator=g)]
            grouped += [i for batch in full + batches[len(full) :] for i in batch]
        return grouped


def pad_id_for(tokenizer: Tokenizer) -> int:
    """Padding never carries loss or reaches a real token's attention; any valid id will do."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0
