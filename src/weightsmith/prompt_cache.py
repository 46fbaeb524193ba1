"""Finished rows' keys and values, kept so the next turn of a conversation is not prefilled again.

A chat client sends the whole conversation each turn: turn k+1's prompt is turn k's prompt, its
answer, and the new message. Without a cache the server prefills all of it again, so the time
to the first token grows with the conversation. When a row finishes, its cached tokens (prompt
and answer, as the cache holds them) are copied out of the batch's KV cache into an entry of
their own, exactly as long as they are; a newcomer whose prompt begins with an entry's tokens
(same adapter, not steered) copies that prefix back instead of prefilling it
(serve/prefix.py). An entry depends only on its tokens and their positions, so what is copied
back is what the newcomer's own prefill would write, up to float summation order. `chat` keeps
one for its conversation the same way (Engine.prompt_cache).

Entries are bounded by bytes (`serve --prompt-cache-mib`) and evicted least recently used. An
entry that is a prefix of a newer one is dropped (the newer one serves it), and a row whose
tokens an entry already begins with adds nothing. This is llama.cpp's host-memory prompt cache
and vLLM's automatic prefix caching in their simplest form: whole rows rather than blocks.

Not here: which prefix a batch of newcomers copies and when (serve/prefix.py, serve/scheduler.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from weightsmith.kv_cache import KVCache

#: Fewer shared tokens than this are prefilled anyway (the copy and the bookkeeping cost more).
MIN_SHARED = 16

#: Bytes of keys and values an interactive chat (`chat`, the UI's chat) keeps of its conversations.
CHAT_BUDGET = 1 << 30


@dataclass
class Entry:
    """One kept row: its tokens, their keys and values (a one-row cache as long as they are)."""

    tokens: tuple[int, ...]
    adapter: str | None
    cache: KVCache
    nbytes: int
    used: int = 0  # the clock of its last use, for LRU eviction


@dataclass
class PromptCache:
    """Kept rows within `budget` bytes."""

    budget: int
    entries: list[Entry] = field(default_factory=list)
    _clock: itertools.count = field(default_factory=itertools.count)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def keep(
        self, cache: KVCache, row: int, tokens: Sequence[int], adapter: str | None, min_tokens: int
    ) -> None:
        """Copy row `row` of `cache` (holding `tokens`) into an entry, unless it is shorter than
        `min_tokens`, an entry already begins with it, or it does not fit the budget at all."""
        tokens = tuple(tokens[: cache.length(row)])
        if len(tokens) < min_tokens:
            return
        for e in self.entries:
            if e.adapter == adapter and e.tokens[: len(tokens)] == tokens:
                e.used = next(self._clock)  # already held (a longer entry begins with these tokens)
                return
        per_token = cache.bytes_per_token
        nbytes = per_token * len(tokens)
        if nbytes > self.budget:
            return
        self.entries = [
            e for e in self.entries if not (e.adapter == adapter and tokens[: len(e.tokens)] == e.tokens)
        ]
        while self.entries and self.nbytes + nbytes > self.budget:
            self.entries.remove(min(self.entries, key=lambda e: e.used))
        k = cache.k
        held = KVCache(k.shape[0], 1, len(tokens), k.shape[2], k.shape[4], dtype=k.dtype, device=k.device)
        held.copy_row(row, 0, source=cache)
        self.entries.append(Entry(tokens, adapter, held, nbytes, next(self._clock)))

    def longest(self, prompt: Sequence[int], adapter: str | None = None) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `prompt` (same adapter), and its length."""
        return max(
            ((e, shared(prompt, e.tokens)) for e in self.entries if e.adapter == adapter),
            key=lambda found: found[1],
            default=(None, 0),
        )

    def touch(self, entry: Entry) -> None:
        entry.used = next(self._clock)

    def clear(self) -> None:
        self.entries = []


def shared(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
