"""Attention over packed training rows, one document at a time.

A packed row lays several examples end to end, and a token may attend only to earlier tokens
of its own document. A (B, 1, T, T) mask says that, but the kernel then scores every pair of
tokens in the row, across documents too, and the fused causal kernels (flash, which skips
the blocks above the diagonal) cannot be used. Here the documents are gathered out of the
rows into batches of documents of similar length, attended with the causal kernel
(`is_causal`), and the outputs gathered back into row order: the attention costs the sum of
each document's square instead of the row's.

A document shorter than its batch's length is padded by repeating its last token. The pad
slots come after every real token of the document, so under the causal mask no real query
sees them, and their outputs are never read back. Documents are batched by length in powers
of two (from `MIN_BUCKET`), so one long document does not pad a hundred short ones. A row's
padding (document -1) is in no batch: no real token attends to it, and its outputs are zero.
A sequence may also start with a prefix shared with an earlier one (`layout`'s `read_from`: a
DPO pair's prompt, before each answer): the prefix's outputs are read from the first.
The gathers in and out are their own autograd functions, whose backward passes gather as well.

Not here: where the document ids come from (train/data.py `collate`), the mask path for
sliding-window layers whose documents are longer than the window (model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.models.attention import attend

#: The shortest batch length: documents up to this many tokens share one batch.
MIN_BUCKET = 64


@dataclass
class PackedDocuments:
    """Where each attention sequence of a (B, T) batch sits, for `attend_documents`. Slots are
    the sequences' padded places, batch after batch, S in all."""

    #: (n, width) of each batch of sequences, in slot order.
    shapes: list[tuple[int, int]]
    #: (S,) the flat token (row * T + column) each slot holds; a pad slot repeats its sequence's last.
    index: torch.Tensor
    #: (B * T,) the slot each token's output comes from (any slot where it has none), and the
    #: tokens that have none (padding): their outputs are zero.
    back: torch.Tensor
    unread: torch.Tensor
    #: (S,) the token each slot's output goes to (any token where it goes nowhere), and the slots
    #: whose outputs go nowhere (pads, shared prefixes).
    owner: torch.Tensor
    unowned: torch.Tensor
    #: (m,) real slots whose output goes nowhere (a prefix shared with an earlier sequence), and
    #: their tokens: their keys and values are attended, so their gradients are added back.
    shared_slots: torch.Tensor
    shared_tokens: torch.Tensor
    #: The longest sequence's length.
    longest: int

    def usable_for(self, layer_type: str, window: int | None) -> bool:
        """Whether a layer of `layer_type` can attend as these sequences: a full-attention layer
        always, a sliding-window one where its window holds the longest sequence (else a mask)."""
        return layer_type != "sliding_attention" or not window or self.longest <= window


def pack_documents(documents: torch.Tensor) -> PackedDocuments | None:
    """The layout of `documents` (B, T): each row's runs of one id are its documents, in
    order; id -1 is padding. None if there is no document at all."""
    ids = documents.detach().cpu()
    b, t = ids.shape
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = first.flatten().nonzero().squeeze(1)  # every row starts a run, so runs end at row ends
    lengths = torch.diff(starts, append=torch.tensor([b * t]))
    real = ids.flatten()[starts] >= 0
    runs = [
        torch.arange(s, s + n) for s, n in zip(starts[real].tolist(), lengths[real].tolist(), strict=True)
    ]
    return layout(runs, [0] * len(runs), b * t, documents.device)


def layout(
    sequences: list[torch.Tensor], read_from: list[int], n_tokens: int, device: torch.device
) -> PackedDocuments | None:
    """The layout of attention sequences over n_tokens flat tokens: sequence i attends causally
    over the tokens `sequences[i]` (flat indices, in attention order), and the tokens from
    `read_from[i]` on take their outputs from it (a shared prefix is read from one sequence
    only). None if there is no sequence."""
    if not sequences:
        return None
    lengths = torch.tensor([len(s) for s in sequences])
    buckets = torch.ceil(torch.log2(lengths.clamp(min=MIN_BUCKET).double())).long()
    shapes, index, owned, real = [], [], [], []
    for bucket in buckets.unique().tolist():
        chosen = (buckets == bucket).nonzero().squeeze(1).tolist()
        n = lengths[chosen]
        width = int(n.max())
        pad = [sequences[i][-1:].expand(width - len(sequences[i])) for i in chosen]
        index.append(torch.cat([x for i, p in zip(chosen, pad, strict=True) for x in (sequences[i], p)]))
        j = torch.arange(width)[None, :]
        real.append((j < n[:, None]).flatten())
        owned.append(
            (real[-1].view(len(chosen), width) & (j >= torch.tensor(read_from)[chosen][:, None])).flatten()
        )
        shapes.append((len(chosen), width))
    index, owned, real = torch.cat(index), torch.cat(owned), torch.cat(real)
    slots = torch.arange(len(index))
    back = torch.full((n_tokens,), -1, dtype=torch.long)
    back[index[owned]] = slots[owned]
    owner = torch.where(owned, index, -1)
    shared = real & ~owned
    move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    return PackedDocuments(
        shapes,
        move(index),
        move(back.clamp(min=0)),
        move((back < 0).nonzero().squeeze(1)),
        move(owner.clamp(min=0)),
        move((owner < 0).nonzero().squeeze(1)),
        move(slots[shared]),
        move(index[shared]),
        int(lengths.max()),
    )


def _gather(x: torch.Tensor, index: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x's rows at `index`, with the rows at `zero` zeroed."""
    out = x.index_select(0, index)
    return out.index_fill_(0, zero, 0) if len(zero) else out


class _ToSlots(torch.autograd.Function):
    """Tokens (B * T, ...) -> slots (S, ...). The backward gathers too (a scatter-add was half
    the per-document attention's backward on a CPU): each token takes its own slot's gradient,
    plus those of its shared-prefix copies. A pad slot's gradient is dropped: it is zero, as
    only pad queries, whose outputs nobody reads, attend to it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, docs: PackedDocuments) -> torch.Tensor:  # noqa: ANN001
        ctx.docs = docs
        return x.index_select(0, docs.index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        docs = ctx.docs
        out = _gather(grad, docs.back, docs.unread)
        if len(docs.shared_slots):
            out.index_add_(0, docs.shared_tokens, grad.index_select(0, docs.shared_slots))
        return out, None


class _ToTokens(torch.autograd.Function):
    """Slots (S, ...) -> tokens (B * T, ...): each token its own slot's output, zero where it has none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, docs: PackedDocuments) -> torch.Tensor:  # noqa: ANN001
        ctx.docs = docs
        return _gather(x, docs.back, docs.unread)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return _gather(grad, ctx.docs.owner, ctx.docs.unowned), None


def attend_documents(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: PackedDocuments,
    scale: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence: q (B, H, T, D), k and v (B, Hkv, T, D) ->
    (B, H, T, D), equal to `attend` with the block-diagonal causal mask (zero for padding)."""
    b, h, t, d = q.shape

    def slots(x: torch.Tensor) -> list[torch.Tensor]:  # (B, Hx, T, D) -> per batch (n, Hx, width, D)
        flat = _ToSlots.apply(x.transpose(1, 2).reshape(b * t, x.shape[1], d), docs)  # (S, Hx, D)
        parts = flat.split([n * width for n, width in docs.shapes])
        return [
            p.view(n, width, x.shape[1], d).transpose(1, 2)
            for p, (n, width) in zip(parts, docs.shapes, strict=True)
        ]

    outs = []
    for qg, kg, vg in zip(slots(q), slots(k), slots(v), strict=True):
        o = attend(qg, kg, vg, is_causal=True, scale=scale, softcap=softcap, sinks=sinks)
        outs.append(o.transpose(1, 2).reshape(-1, h, d))  # (n * width, H, D)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return _ToTokens.apply(out, docs).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
