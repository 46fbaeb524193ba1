"""`distill --precompute-teacher K`: the teacher's K likeliest tokens at every target token,
computed once before training (offline distillation, as DistillKit stores them), so the
teacher leaves memory before the student trains and no step runs it.

For each training and validation row (finetune's rows, packed or not, in the layout a batch
gives them) the teacher's logits at every target position are cut to their K largest (ids and
raw fp32 logits), with the teacher's cross-entropy on the data's own token, taken over its whole
vocabulary; all of it goes to `OUT/teacher_topk.safetensors` (rank 0; a resumed run reads it back
and checks it against its rows). Under torchrun each rank scores every size-th batch of rows
and the parts are gathered: each rank runs the teacher over 1/size of the rows. At training time the teacher's distribution is the softmax of
those K logits at the temperature (the rest of the vocabulary gets none), and the loss is the
forward KL from it, the one divergence defined on its support alone: reverse KL and JSD would
need the teacher's probability of every token the student puts mass on.

Storage: 8 bytes x K per target token (64: 512 MB for a million answer tokens).

Not here: the loss (distill_loss.py), the command (distill.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from weightsmith.files import atomic_file
from weightsmith.train import checkpoints as ckpt
from weightsmith.train.data import IGNORE, Batch, Row, collate
from weightsmith.train.distributed import World
from weightsmith.train.loop import use_bf16

log = logging.getLogger(__name__)

TOPK_FILE = "teacher_topk.safetensors"
#: The logit every token outside the top K gets: finite, so 0 x (log 0-ish) stays 0, and
#: exp() of it is 0 in fp32 at any temperature up to 100.
FILL = -1e9


@dataclass
class TaughtBatch(Batch):
    """A batch with its targets' precomputed teacher top K (row-major, as `labels != IGNORE`)."""

    teacher_ids: torch.Tensor | None = None  # (N, K) token ids
    teacher_logits: torch.Tensor | None = None  # (N, K) fp32 raw logits
    teacher_nll: torch.Tensor | None = None  # (N,) the teacher's cross-entropy on each target

    def to(self, device: torch.device) -> TaughtBatch:
        moved = Batch.to(self, device)
        table = [
            None if t is None else t.to(device)
            for t in (self.teacher_ids, self.teacher_logits, self.teacher_nll)
        ]
        return TaughtBatch(
            **moved.__dict__, teacher_ids=table[0], teacher_logits=table[1], teacher_nll=table[2]
        )

    def dense(self, start: int, stop: int, vocab: int) -> torch.Tensor:
        """(c, vocab) teacher logits of targets [start, stop): its top K, FILL elsewhere."""
        assert self.teacher_ids is not None and self.teacher_logits is not None
        ids = self.teacher_ids[start:stop].long()
        out = torch.full((len(ids), vocab), FILL, dtype=torch.float32, device=ids.device)
        return out.scatter_(1, ids, self.teacher_logits[start:stop].float())


class TaughtSource:
    """Finetune rows and, once `fill` has run, each row's teacher top K."""

    def __init__(self, rows: list[Row], pad_id: int) -> None:
        self.rows, self.pad_id = rows, pad_id
        self.table: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> list[int]:
        return [len(r.ids) for r in self.rows]

    def targets(self) -> torch.Tensor:
        """(rows + 1,) where each row's targets start in the table, and the total at the end."""
        counts = [int((collate([r], self.pad_id).labels != IGNORE).sum()) for r in self.rows]
        return torch.tensor([0, *counts], dtype=torch.long).cumsum(0)

    def batch(self, indices: Sequence[int]) -> TaughtBatch:
        batch = collate([self.rows[i] for i in indices], self.pad_id)
        at = self.table["offsets"]
        spans = [torch.arange(int(at[i]), int(at[i + 1])) for i in indices]
        pick = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        return TaughtBatch(
            **batch.__dict__, teacher_ids=self.table["ids"][pick], teacher_logits=self.table["logits"][pick],
            teacher_nll=self.table["nll"][pick],
        )  # fmt: skip


def _top_k(
    teacher: nn.Module,
    source: TaughtSource,
    k: int,
    vocab: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
    world: World,
) -> dict[str, torch.Tensor]:
    """The teacher's top K ids and logits and its NLL at every target of `source`, in order:
    each rank scores every size-th batch, and the ranks' parts are gathered into one table."""
    parts: dict[int, tuple[torch.Tensor, ...]] = {}
    for start in world.share_of(len(source), batch_size):
        batch = collate(source.rows[start : start + batch_size], source.pad_id).to(device)
        parts[start] = _score(teacher, batch, k, vocab, device, bf16)
    ordered = world.gather_shares(parts)
    cat = lambda i, shape: torch.cat([p[i] for p in ordered]) if ordered else torch.zeros(shape)  # noqa: E731
    return {"ids": cat(0, (0, k)).to(torch.int32), "logits": cat(1, (0, k)), "nll": cat(2, (0,))}


def _score(
    teacher: nn.Module, batch: Batch, k: int, vocab: int, device: torch.device, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's top K ids (int32) and fp32 logits and the teacher's NLL at its targets."""
    ids, logits, nll = [], [], []
    keep = batch.labels != IGNORE
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = teacher.hidden_states(batch.inputs, positions=batch.positions, documents=batch.documents)[
            keep
        ]
        targets = batch.labels[keep]
        for at in range(0, len(hidden), 256):
            z = teacher.logits(hidden[at : at + 256])[:, :vocab].float()
            top = z.topk(k, dim=-1)
            ids.append(top.indices.to(torch.int32).cpu())
            logits.append(top.values.cpu())
            t = targets[at : at + 256]
            nll.append((torch.logsumexp(z, -1) - z.gather(1, t[:, None]).squeeze(1)).cpu())
    if not ids:
        return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), torch.zeros(0)
    return torch.cat(ids), torch.cat(logits), torch.cat(nll)


def fill_top_k(
    teacher: nn.Module | None,
    sources: dict[str, TaughtSource],
    out: Path,
    resume_from: Path | None,
    *,
    k: int,
    vocab: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    world: World,
) -> None:
    """Each source's table: computed now by `teacher` on a fresh run (rank 0 writes the file),
    read back from OUT on resume (checked against the rows)."""
    path = out / TOPK_FILE
    offsets = {name: s.targets() for name, s in sources.items()}
    if resume_from is not None:
        if not path.is_file():
            raise ckpt.ResumeError(f"{path}: missing; the run used --precompute-teacher, start it again")
        for name, source in sources.items():
            source.table = {
                **_read_table(path, name, int(offsets[name][-1]), k, vocab),
                "offsets": offsets[name],
            }
        return
    assert teacher is not None
    started = time.perf_counter()
    for name, source in sources.items():
        table = _top_k(teacher, source, k, vocab, batch_size, device, use_bf16(precision, device), world)
        source.table = {**table, "offsets": offsets[name]}
    if world.is_main:  # every rank holds the whole table
        with atomic_file(path) as tmp:
            tensors = {
                f"{n}.{key}": s.table[key].contiguous()
                for n, s in sources.items()
                for key in ("ids", "logits", "nll")
            }
            save_file(tensors, str(tmp), metadata={"k": str(k), "vocab": str(vocab)})
    log.info(
        "the teacher's top %d at %d target tokens in %.1fs", k, sum(int(o[-1]) for o in offsets.values()),
        time.perf_counter() - started,
    )  # fmt: skip


def _read_table(path: Path, name: str, n: int, k: int, vocab: int) -> dict[str, torch.Tensor]:
    """`name`'s ids, logits and NLL from a table file, each checked against the rows (n targets,
    k a target, ids below `vocab`): a damaged or foreign file is a one-line ResumeError."""
    want = {
        "ids": ((n, k), (torch.int32,)),
        "logits": ((n, k), (torch.float32,)),
        "nll": ((n,), (torch.float32,)),
    }
    table = {}
    try:
        with safe_open(str(path), "pt") as f:
            for key, (shape, dtypes) in want.items():
                t = f.get_tensor(f"{name}.{key}")
                if tuple(t.shape) != shape or t.dtype not in dtypes:
                    raise ValueError(f"{name}.{key} is {t.dtype} {tuple(t.shape)}, not {dtypes[0]} {shape}")
                table[key] = t
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ckpt.ResumeError(f"{path}: does not match the data ({e}); start the run again") from None
    ids = table["ids"]
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ckpt.ResumeError(
            f"{path}: {name}.ids has token ids outside 0..{vocab - 1}; start the run again"
        )
    return table


def stored_vocab(out: Path) -> int | None:
    """The shared vocabulary a resumed run's table was computed over (None: no table, or none
    readable in it)."""
    path = out / TOPK_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            vocab = int((f.metadata() or {}).get("vocab", "0"))
    except (OSError, ValueError, SafetensorError):
        return None
    return vocab if vocab > 0 else None
