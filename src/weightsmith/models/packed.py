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
padding (document -1) is in no batch: no real token attends to it, and its own outputs (read
from slot 0) only reach positions that carry no loss.

Not here: where the document ids come from (train/data.py `collate`), the mask path for
sliding-window layers whose documents are longer than the window (model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: The shortest batch length: documents up to this many tokens share one batch.
MIN_BUCKET = 64


@dataclass
class PackedDocuments:
    """Where each document of a packed (B, T) batch sits, for `attend_documents`."""

    #: Per batch of documents: (n, L) indices into the B * T flattened tokens, row by row.
    groups: list[torch.Tensor]
    #: (B * T,) each token's slot in the groups' (n * L) slots laid end to end.
    back: torch.Tensor
    #: The longest document's length.
    longest: int


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
    starts, lengths = starts[real], lengths[real]
    if len(starts) == 0:
        return None
    buckets = torch.ceil(torch.log2(lengths.clamp(min=MIN_BUCKET).double())).long()
    back = torch.zeros(b * t, dtype=torch.long)
    groups, offset = [], 0
    for bucket in buckets.unique().tolist():
        s, n = starts[buckets == bucket], lengths[buckets == bucket]
        width = int(n.max())
        j = torch.arange(width)
        index = s[:, None] + torch.minimum(j[None, :], n[:, None] - 1)  # (docs, width); pads repeat the last
        real_slot = j[None, :] < n[:, None]
        slots = offset + torch.arange(index.numel()).view(index.shape)
        back[index[real_slot]] = slots[real_slot]
        groups.append(index.to(documents.device, non_blocking=True))
        offset += index.numel()
    return PackedDocuments(groups, back.to(documents.device, non_blocking=True), int(lengths.max()))


def attend_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: PackedDocuments, scale: float | None
) -> torch.Tensor:
    """Causal attention within each document: q (B, H, T, D), k and v (B, Hkv, T, D) ->
    (B, H, T, D), equal to SDPA with the block-diagonal causal mask."""
    b, h, t, d = q.shape

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, Hx, T, D) -> (B * T, Hx, D)
        return x.transpose(1, 2).reshape(b * t, x.shape[1], d)

    qf, kf, vf = tokens(q), tokens(k), tokens(v)
    outs = []
    for index in docs.groups:
        n, width = index.shape
        qg, kg, vg = (x[index].transpose(1, 2) for x in (qf, kf, vf))  # (n, Hx, width, D)
        o = F.scaled_dot_product_attention(
            qg, kg, vg, is_causal=True, scale=scale, enable_gqa=k.shape[1] != h
        )  # (n, H, width, D)
        outs.append(o.transpose(1, 2).reshape(n * width, h, d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out[docs.back].view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
