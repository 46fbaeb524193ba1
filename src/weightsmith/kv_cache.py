"""A preallocated key/value cache with one slot per sequence, and the lengths of its rows.

Each batch row ("slot") has its own length, so rows of different prompt lengths
share one batch without left padding, and a finished row's slot can be reset and
reused by a new sequence (the server's continuous batching relies on this). The
cache index of a token equals its position, so the attention mask is a plain
comparison of positions.

The cache owns its lengths: code that fills it says so through `set_lengths` (a
prefill), `advance` (a decode step), `set_length` (a rollback) or `reset`; `lengths`
is read-only. A `rows` view shares both the storage and the lengths of the rows it
covers.

The cache is an object passed into the model, never state hidden in modules.

Not here: deciding what to evict (a sequence longer than `max_len` is an error the caller
prevents), which rows are running (generate.py, serve/scheduler.py), paged or quantized
caches.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for every layer: two (L, B, H_kv, S, D) tensors and per-row lengths."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        spare: int = 0,
    ) -> None:
        # `spare` positions past max_len are allocated and never used: then no row's first n
        # entries are one contiguous block across heads, whatever n is, and torch.compile
        # needs one kernel variant for every attended length (cuda_graphs.py asks for one).
        shape = (n_layers, batch_size, n_kv_heads, max_len + spare, head_dim)
        self._k_all = torch.zeros(shape, dtype=dtype, device=device)
        self._v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k = self._k_all[:, :, :, :max_len]
        self.v = self._v_all[:, :, :, :max_len]
        self.max_len = max_len
        self.batch_size = batch_size
        # Tokens held per row, on the host: decides masks and slicing without a device sync.
        # A `rows` view shares this list and starts at `_first`.
        self._lengths = [0] * batch_size
        self._first = 0

    @classmethod
    def for_model(cls, cfg, batch_size: int, max_len: int, *, dtype, device, spare: int = 0) -> KVCache:
        return cls(
            cfg.num_hidden_layers,
            batch_size,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=dtype,
            device=device,
            spare=spare,
        )

    # ---- lengths ------------------------------------------------------------------------

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens held by each row (read-only: change them through the methods below)."""
        return tuple(self._lengths[self._first : self._first + self.batch_size])

    def length(self, row: int) -> int:
        return self._lengths[self._first + row]

    def room(self, row: int) -> int:
        """How many more tokens row `row` can take."""
        return self.max_len - self._lengths[self._first + row]

    def set_length(self, row: int, n: int) -> None:
        """Row `row` holds its first `n` tokens (rolling back drafts, or holding a finished row
        at a fixed position). Entries past `n` are never attended and get overwritten."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"a KV cache row holds 0..{self.max_len} tokens, not {n}")
        self._lengths[self._first + row] = n

    def set_lengths(self, start: int, lengths: list[int] | tuple[int, ...]) -> None:
        """Rows start, start+1, ... hold `lengths` tokens (after a prefill wrote them)."""
        for i, n in enumerate(lengths):
            self.set_length(start + i, n)

    def advance(self, rows: int, by: int = 1) -> None:
        """Rows 0..rows-1 each took `by` more tokens (a decode step writes one per row)."""
        first = self._first
        for i in range(first, first + rows):
            if self._lengths[i] + by > self.max_len:
                raise ValueError(f"the KV cache is full ({self.max_len} tokens); a row cannot take more")
            self._lengths[i] += by

    def reset(self, row: int | None = None) -> None:
        """Forget one row (to reuse its slot) or all rows. Old values are masked, not zeroed."""
        for i in range(self.batch_size) if row is None else (row,):
            self._lengths[self._first + i] = 0

    @property
    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value tensors with their spare positions (what compiled steps write)."""
        return self._k_all, self._v_all

    # ---- views and copies ---------------------------------------------------------------

    def rows(self, start: int, count: int) -> KVCache:
        """A cache over rows start..start+count-1 that shares this one's storage and lengths,
        so a prefill can fill new rows while the rows before them keep their state."""
        view = KVCache.__new__(KVCache)
        view.k = self.k[:, start : start + count]
        view.v = self.v[:, start : start + count]
        view._k_all = self._k_all[:, start : start + count]
        view._v_all = self._v_all[:, start : start + count]
        view.max_len, view.batch_size = self.max_len, count
        view._lengths, view._first = self._lengths, self._first + start
        return view

    def select(self, rows: list[int]) -> KVCache:
        """A new cache holding copies of `rows` (repeats allowed), in that order, with their lengths."""
        index = torch.tensor(rows, device=self.k.device)
        copy = KVCache.__new__(KVCache)
        copy.k, copy.v = self.k[:, index], self.v[:, index]  # (L, R, H, S, D) copies
        copy._k_all, copy._v_all = copy.k, copy.v
        copy.max_len, copy.batch_size = self.max_len, len(rows)
        copy._lengths, copy._first = [self.length(r) for r in rows], 0
        return copy

    def copy_row(self, src: int, dst: int, source: KVCache | None = None, length: int | None = None) -> None:
        """Make row `dst` hold row `src`'s tokens (a forked sequence, compacting the batch
        after a row finished, or a prompt prefilled in another cache of the same shape:
        `source`), or only its first `length` (a shared prefix). Only the filled part is copied."""
        source = source or self
        n = source.length(src) if length is None else length
        if not 0 <= n <= source.length(src):
            raise ValueError(f"row {src} holds {source.length(src)} tokens, not {n}")
        if (source is not self or src != dst) and n:
            self.k[:, dst, :, :n] = source.k[:, src, :, :n]
            self.v[:, dst, :, :n] = source.v[:, src, :, :n]
        self.set_length(dst, n)

    # ---- the model's writes -------------------------------------------------------------

    def write(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: int,
        start: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys/values at `positions` (B, T); return the first
        `kv_len` cached entries of every row, (B, H, kv_len, D). `start`, when every
        row's positions are start..start+T-1, allows a plain slice copy. Lengths are
        the caller's to update (the model does not know which rows count). A cache of
        another dtype than the keys' (a bf16 cache under an fp32 model) stores them rounded
        to its dtype and returns its entries in the keys' dtype."""
        dtype = k.dtype
        if dtype != self.k.dtype:
            k, v = k.to(self.k.dtype), v.to(self.k.dtype)
        b, h, t, d = k.shape
        if start is not None:
            self.k[layer, :b, :, start : start + t] = k
            self.v[layer, :b, :, start : start + t] = v
        elif torch.compiler.is_compiling():
            # Under torch.compile a write into a view of the cache (`self.k[layer]`) becomes
            # "compute the whole view, copy it back": a copy of the layer's cache every step.
            # Indexing the cache tensor itself keeps it one in-place store of the new entries.
            at = (
                torch.tensor(layer, device=k.device),
                torch.arange(b, device=k.device)[:, None, None],
                torch.arange(h, device=k.device)[None, :, None],
                positions[:, None, :],
            )  # broadcast to (B, H, T): the (layer, row, head, position) of each new entry
            self._k_all.index_put_(at, k)
            self._v_all.index_put_(at, v)
        else:
            index = positions[:, None, :, None].expand(b, h, t, d)
            self.k[layer, :b].scatter_(2, index, k)
            self.v[layer, :b].scatter_(2, index, v)
        # Sliced from the storage with the spare positions: never the whole tensor, so never a
        # different case for the compiler when kv_len is the cache's length.
        keys, values = self._k_all[layer, :b, :, :kv_len], self._v_all[layer, :b, :, :kv_len]
        if dtype != self.k.dtype:
            return keys.to(dtype), values.to(dtype)
        return keys, values
