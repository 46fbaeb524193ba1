"""A preallocated key/value cache with one slot per sequence.

Each batch row ("slot") has its own length, so rows of different prompt lengths
share one batch without left padding, and a finished row's slot can be reset and
reused by a new sequence (the server's continuous batching relies on this). The
cache index of a token equals its position, so the attention mask is a plain
comparison of positions.

The cache is an object passed into the model, never state hidden in modules. It
does not decide what to evict: a sequence longer than `max_len` is an error the
caller prevents.
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
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        #: Tokens held per row, on the host: decides masks and slicing without a device sync.
        self.lengths = [0] * batch_size

    @classmethod
    def for_model(cls, cfg, batch_size: int, max_len: int, *, dtype, device) -> KVCache:
        return cls(
            cfg.num_hidden_layers,
            batch_size,
            max_len,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=dtype,
            device=device,
        )

    def reset(self, row: int | None = None) -> None:
        """Forget one row (to reuse its slot) or all rows. Old values are masked, not zeroed."""
        if row is None:
            self.lengths = [0] * self.batch_size
        else:
            self.lengths[row] = 0

    def rows(self, start: int, count: int) -> KVCache:
        """A cache over rows start..start+count-1 that shares this one's storage, so a
        prefill can fill new rows while the rows before them keep their state. Copy the
        view's `lengths` back with `set_lengths` after using it."""
        view = KVCache.__new__(KVCache)
        view.k = self.k[:, start : start + count]
        view.v = self.v[:, start : start + count]
        view.max_len, view.batch_size = self.max_len, count
        view.lengths = self.lengths[start : start + count]
        return view

    def set_lengths(self, start: int, lengths: list[int]) -> None:
        self.lengths[start : start + len(lengths)] = lengths

    def copy_row(self, src: int, dst: int, source: KVCache | None = None) -> None:
        """Make row `dst` hold row `src`'s tokens (a forked sequence, compacting the batch
        after a row finished, or a prompt prefilled in another cache of the same shape:
        `source`). Only the filled part is copied."""
        source = source or self
        n = source.lengths[src]
        if (source is not self or src != dst) and n:
            self.k[:, dst, :, :n] = source.k[:, src, :, :n]
            self.v[:, dst, :, :n] = source.v[:, src, :, :n]
        self.lengths[dst] = n

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
        row's positions are start..start+T-1, allows a plain slice copy."""
        b, h, t, d = k.shape
        if start is not None:
            self.k[layer, :b, :, start : start + t] = k
            self.v[layer, :b, :, start : start + t] = v
        else:
            index = positions[:, None, :, None].expand(b, h, t, d)
            self.k[layer, :b].scatter_(2, index, k)
            self.v[layer, :b].scatter_(2, index, v)
        return self.k[layer, :b, :, :kv_len], self.v[layer, :b, :, :kv_len]
