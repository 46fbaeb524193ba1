"""Prompt prefixes shared with running rows: copied from the KV cache instead of prefilled again.

Requests to a chat server mostly begin alike (the chat template's system prompt, a shared
instruction), and a prefill costs as much per token whoever else is decoding, while a decode step
of many rows costs little more than one. So before newcomers are prefilled, each looks for the
running row whose cached tokens share the longest prefix with its prompt (same adapter, neither
steered: their keys and values would differ); when every newcomer of the batch shares at least
`MIN_SHARED` tokens with some row, the first `skip` of them (the shortest such prefix, and at least
one prompt token left to run) are copied from those rows into the newcomers' rows, and the prefill
runs the rest at positions `skip`.... A cached entry depends only on the tokens up to it and their
positions, so a newcomer's cache is what its own prefill would write, up to float summation order.

Not here: which rows run (scheduler.py), the cache's storage (kv_cache.py), prefixes of finished
rows (their slots are reused at once) or of long prompts prefilled in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from weightsmith.kv_cache import KVCache

#: Fewer shared tokens than this are prefilled anyway (the copy and the bookkeeping cost more).
MIN_SHARED = 16


class Row(Protocol):
    prompt: list[int]
    generated: list[int]
    request: Any  # .adapter, .steer


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reuse_prefixes(cache: KVCache, running: Sequence[Row], newcomers: Sequence[Row], first_row: int) -> int:
    """Copy a shared prefix into rows first_row.. (one per newcomer) from running rows
    0..len(running)-1; return how many leading prompt tokens every newcomer now holds (0: none)."""
    if not running or not newcomers:
        return 0
    held = [
        (r, (row.prompt + row.generated)[: cache.length(r)])
        for r, row in enumerate(running)
        if row.request.steer is None
    ]
    sources: list[tuple[int, int]] = []  # (running row, tokens shared) per newcomer
    for new in newcomers:
        if new.request.steer is not None:
            return 0
        best = max(
            (
                (r, _shared(new.prompt, tokens))
                for r, tokens in held
                if running[r].request.adapter == new.request.adapter
            ),
            key=lambda found: found[1],
            default=(0, 0),
        )
        if best[1] < MIN_SHARED:
            return 0
        sources.append(best)
    skip = min(min(n for _, n in sources), *(len(new.prompt) - 1 for new in newcomers))
    if skip < MIN_SHARED:
        return 0
    for i, (r, _) in enumerate(sources):
        cache.copy_row(r, first_row + i, length=skip)
    return skip
