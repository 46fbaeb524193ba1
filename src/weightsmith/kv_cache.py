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

An int8 cache (`dtype=torch.int8`, `--kv-cache-dtype int8`) holds each entry (one head's
head_dim keys or values at one position) as int8 codes and an fp32 scale, its absmax / 127, in
`k_scale`/`v_scale` (L, B, H_kv, S): a quarter of an fp32 cache's bytes and a little more
(4 bytes a head_dim). `write` returns the entries dequantized; the C decode step reads the codes
and scales in place (quant/cpu_decode.c quantizes what it writes the same way).

Not here: deciding what to evict (a sequence longer than `max_len` is an error the caller
prevents), which rows are running (generate.py, serve/scheduler.py), paged caches.
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
        self.quantized = dtype == torch.int8
        if self.quantized:  # one fp32 scale an entry, laid out as the entries
            self._ks_all = torch.zeros(shape[:4], dtype=torch.float32, device=device)
            self._vs_all = torch.zeros(shape[:4], dtype=torch.float32, device=device)
            self.k_scale, self.v_scale = self._ks_all[..., :max_len], self._vs_all[..., :max_len]
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
        view.quantized = self.quantized
        for name in self._tensor_names():
            setattr(view, name, getattr(self, name)[:, start : start + count])
        view.max_len, view.batch_size = self.max_len, count
        view._lengths, view._first = self._lengths, self._first + start
        return view

    def select(self, rows: list[int]) -> KVCache:
        """A new cache holding copies of `rows` (repeats allowed), in that order, with their lengths."""
        index = torch.tensor(rows, device=self.k.device)
        copy = KVCache.__new__(KVCache)
        copy.quantized = self.quantized
        copy.k, copy.v = self.k[:, index], self.v[:, index]  # (L, R, H, S, D) copies
        copy._k_all, copy._v_all = copy.k, copy.v
        if self.quantized:
            copy.k_scale, copy.v_scale = self.k_scale[:, index], self.v_scale[:, index]
            copy._ks_all, copy._vs_all = copy.k_scale, copy.v_scale
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
        if source.quantized != self.quantized:
            raise ValueError("a row copies between caches of the same kind (int8 or not)")
        if (source is not self or src != dst) and n:
            self.k[:, dst, :, :n] = source.k[:, src, :, :n]
            self.v[:, dst, :, :n] = source.v[:, src, :, :n]
            if self.quantized:
                self.k_scale[:, dst, :, :n] = source.k_scale[:, src, :, :n]
                self.v_scale[:, dst, :, :n] = source.v_scale[:, src, :, :n]
        self.set_length(dst, n)

    def _tensor_names(self) -> tuple[str, ...]:
        names = ("k", "v", "_k_all", "_v_all")
        return names + ("k_scale", "v_scale", "_ks_all", "_vs_all") if self.quantized else names

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in one row, every layer's keys and values (and int8 scales)."""
        n = 2 * self.k.shape[0] * self.k.shape[2]  # L x H entries of head_dim, keys and values
        return n * (self.k.shape[4] * self.k.element_size() + (4 if self.quantized else 0))

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
        if self.quantized:
            return self._write_int8(layer, positions, k, v, kv_len, start)
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

    def _write_int8(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: int,
        start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`write` for an int8 cache: codes and scales stored, the attended entries dequantized."""
        if torch.compiler.is_compiling():
            raise RuntimeError("an int8 KV cache runs the eager decode step, not a compiled one")
        dtype = k.dtype
        b, h, t, d = k.shape
        for x, codes, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, sc = quantize_entries(x)
            if start is not None:
                codes[layer, :b, :, start : start + t] = q
                scales[layer, :b, :, start : start + t] = sc
            else:
                codes[layer, :b].scatter_(2, positions[:, None, :, None].expand(b, h, t, d), q)
                scales[layer, :b].scatter_(2, positions[:, None, :].expand(b, h, t), sc)
        keys = dequantize_entries(self._k_all[layer, :b, :, :kv_len], self._ks_all[layer, :b, :, :kv_len])
        values = dequantize_entries(self._v_all[layer, :b, :, :kv_len], self._vs_all[layer, :b, :, :kv_len])
        return keys.to(dtype), values.to(dtype)


def quantize_entries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 scales of cache entries (..., D): each entry's scale is its absmax / 127,
    its codes x / scale rounded half to even (what the C step's kv_store computes)."""
    x = x.float()
    scale = x.abs().amax(-1) / 127.0
    positive = scale > 0
    codes = torch.where(positive[..., None], x / torch.where(positive, scale, 1.0)[..., None], 0.0)
    return codes.round().clamp(-127, 127).to(torch.int8), scale


def dequantize_entries(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[..., None]
