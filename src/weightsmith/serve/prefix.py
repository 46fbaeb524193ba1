"""Prompt prefixes already in a KV cache: copied instead of prefilled again.

Requests to a chat server mostly begin alike (the chat template's system prompt, a shared
instruction), and a conversation's next turn begins with the whole of the last one. A prefill
costs as much per token whoever else is decoding, while a copy of cached keys and values costs
little. So before newcomers are prefilled, each looks for the held row whose tokens share the
longest prefix with its prompt: a running row of the batch, or a finished row kept in the
prompt cache (prompt_cache.py); same adapter, neither steered (their keys and values would
differ). When every newcomer of the batch shares at least `MIN_SHARED` tokens with some row,
the first `skip` of them (the shortest such prefix, and at least one prompt token left to run)
are copied from those rows into the newcomers' rows, and the prefill runs the rest at positions
`skip`.... A long prompt prefilled in chunks starts its first chunk after the prefix it
copies the same way. A cached entry depends only on the tokens up to it and their positions,
so a newcomer's cache is what its own prefill would write, up to float summation order.

Not here: which rows run (scheduler.py), the cache's storage (kv_cache.py), keeping finished
rows (prompt_cache.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from weightsmith.kv_cache import KVCache
from weightsmith.prompt_cache import MIN_SHARED, PromptCache, shared

__all__ = ["MIN_SHARED", "Held", "held_rows", "longest", "reuse_for_chunks", "reuse_prefixes"]


class Row(Protocol):
    prompt: list[int]
    generated: list[int]
    request: Any  # .adapter, .steer


@dataclass(frozen=True)
class Held:
    """Tokens whose keys and values some cache row holds."""

    cache: KVCache
    row: int
    tokens: Sequence[int]
    adapter: str | None
    used: Callable[[], None] | None = None  # tell the prompt cache its entry was used


def held_rows(cache: KVCache, running: Sequence[Row], kept: PromptCache | None) -> list[Held]:
    """The running rows of `cache` (not steered) and the prompt cache's entries."""
    held = [
        Held(cache, r, (row.prompt + row.generated)[: cache.length(r)], row.request.adapter)
        for r, row in enumerate(running)
        if row.request.steer is None
    ]
    for e in kept.entries if kept is not None else ():
        held.append(Held(e.cache, 0, e.tokens, e.adapter, lambda e=e: kept.touch(e)))  # type: ignore[union-attr]
    return held


def longest(held: Sequence[Held], prompt: Sequence[int], adapter: str | None) -> tuple[Held | None, int]:
    """The held row sharing the longest prefix with `prompt` (same adapter), and its length."""
    return max(
        ((h, shared(prompt, h.tokens)) for h in held if h.adapter == adapter),
        key=lambda found: found[1],
        default=(None, 0),
    )


def reuse_prefixes(cache: KVCache, held: Sequence[Held], newcomers: Sequence[Row], first_row: int) -> int:
    """Copy a shared prefix into rows first_row.. (one per newcomer) from `held` rows; return
    how many leading prompt tokens every newcomer now holds (0: none)."""
    if not held or not newcomers:
        return 0
    sources: list[tuple[Held, int]] = []  # (held row, tokens shared) per newcomer
    for new in newcomers:
        if new.request.steer is not None:
            return 0
        best, n = longest(held, new.prompt, new.request.adapter)
        if best is None or n < MIN_SHARED:
            return 0
        sources.append((best, n))
    skip = min(min(n for _, n in sources), *(len(new.prompt) - 1 for new in newcomers))
    if skip < MIN_SHARED:
        return 0
    for i, (h, _) in enumerate(sources):
        cache.copy_row(h.row, first_row + i, source=h.cache, length=skip)
        if h.used is not None:
            h.used()
    return skip


def reuse_for_chunks(staging: KVCache, held: Sequence[Held], row: Row) -> int:
    """Copy the longest held prefix of a long prompt into row 0 of its staging cache; return
    its length (0: none), where the first chunk starts."""
    if row.request.steer is not None:
        return 0
    best, n = longest(held, row.prompt, row.request.adapter)
    skip = min(n, len(row.prompt) - 1)
    if best is None or skip < MIN_SHARED:
        return 0
    staging.copy_row(best.row, 0, source=best.cache, length=skip)
    if best.used is not None:
        best.used()
    return skip
