"""`--compile` on a CUDA device: decode steps replayed from captured CUDA graphs.

An eager decode step launches a few dozen kernels per layer, and on a GPU launching
them costs more host time than the kernels take: a small model decodes at the speed
of Python. A CUDA graph records one step's kernels once and replays them with a single
launch. What a graph replays is fixed, so everything the step reads or writes has a
fixed address and shape:

- the KV cache is this decoder's own, allocated once (`make_cache` hands a generation
  its first rows; it grows, dropping the old graphs, when a generation needs more rows
  or positions than it has);
- token ids and positions live in static device buffers, refreshed by one small copy
  per step; the attention mask is computed inside the step from the positions;
- a step attends over `kv` cache entries, the smallest bucket (128, 256, 512, ...)
  above the longest row, and runs `batch` rows, the smallest of 2, 4, 8, ... at
  least the live rows; padding rows feed token 0 at position 0 into cache rows no
  sequence uses. One graph per (batch, kv) pair, captured on first use.

The step is the model's own forward, through torch.compile first (element-wise work
fused; the batch and cache length dynamic, so one compilation serves every graph)
unless `compile=False`; a compiler that fails here is logged once and the graphs hold
the eager step instead. With `capture=False` the same static-shape steps run without
graph capture: that is how CPU tests check this code computes what the eager step does.

Rows may use different LoRA adapters (inside `lora.row_adapters`, as the server's
continuous batching does). Its per-group indexing is host work a graph cannot hold, so
these steps run another graph per (batch, kv): each row's adapter is a code in one more
static buffer, and every LoRA layer adds each of its adapters' deltas on the rows whose
code is that adapter's (`LoRALinear.row_index`).

The plain step (the caller's fallback) decodes instead when the cache is not this
decoder's (another generation holds it), or once a capture has failed. Graphs hold
weight addresses: a model whose modules or parameter storage changed since the last
`make_cache` has its graphs dropped there.

Not here: the eager and compiled steps themselves (generate.py, compiled.py), sampling
(sampling.py, one batched pass and one device sync per step).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from weightsmith.kv_cache import KVCache

log = logging.getLogger(__name__)

#: Batch sizes graphs are captured for; a step of n rows runs the smallest one >= n. A single
#: row runs as two (memory-bound, it costs the same): one compilation then serves every size.
BATCH_BUCKETS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
#: The smallest cache length a step attends over (then doubling up to the cache size).
MIN_KV = 128
#: Cache sizes are rounded up to a multiple of this, so nearby generations share a cache.
CACHE_STEP = 256


def _limit() -> str:
    """torch._dynamo's setting for the compilations of one function (renamed in torch 2.6); read
    when compiling, as importing torch._dynamo costs a second at every start."""
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def batch_bucket(n: int) -> int:
    return next((b for b in BATCH_BUCKETS if b >= n), n)


def kv_bucket(n: int, cap: int) -> int:
    """The cache length a step attends over when its longest row holds `n` entries."""
    kv = MIN_KV
    while kv < n:
        kv *= 2
    return min(kv, cap)


def _step(
    model: Any, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, span: torch.Tensor
) -> torch.Tensor:
    """One token per row at its position, attending over the first `len(span)` cache entries
    (a length given as a tensor's size, which the compiler can leave symbolic from the start)."""
    return model(ids, positions=positions, cache=cache, kv_len=span.shape[0], aligned=False)[:, 0]


class _Replay:
    """One (batch, kv) step: a captured graph and its output buffer, or (without capture)
    the step run directly on the same static inputs."""

    def __init__(self, run: Callable[[], torch.Tensor], graph: Any = None, out: torch.Tensor | None = None):
        self.run, self.graph, self.out = run, graph, out

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.run()
        self.graph.replay()
        assert self.out is not None
        return self.out


class GraphDecode:
    """A model's decode step replayed from CUDA graphs (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        fallback: Callable[..., torch.Tensor],
        *,
        compile: bool = True,
        capture: bool | None = None,
    ) -> None:
        self.model = model
        self.fallback = fallback
        self.device = model.inv_freq.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.compile = compile
        #: Why capture or compilation was given up here (None while it works).
        self.failed: str | None = None
        self.compile_failed: str | None = None
        self.cache: KVCache | None = None
        self._lease: weakref.ref | None = None
        self._ids: torch.Tensor | None = None  # (rows, 1) token ids, static
        self._positions: torch.Tensor | None = None  # (rows, 1) positions, static
        self._span: torch.Tensor | None = None  # (cache length,): sliced to say a step's kv length
        self._adapters: torch.Tensor | None = None  # (rows,) each row's adapter code, static
        #: Each LoRA adapter name's code in `_adapters` (0: no adapter).
        self._codes: dict[str, int] = {}
        #: (batch, kv, whether rows carry adapter codes) -> its step.
        self._replays: dict[tuple[int, int, bool], _Replay] = {}
        self._pool: Any = None
        self._compiled: Any = None
        self._fingerprint: tuple | None = None
        self._lora: list = []

    # ---- the cache a generation decodes in ----------------------------------------------

    def make_cache(self, cfg: Any, batch: int, max_len: int, *, dtype: torch.dtype, device: Any) -> KVCache:
        """The first `batch` rows of this decoder's cache, emptied, for a generation of up to
        `max_len` tokens a row; a plain cache while another generation still holds them."""
        if self._lease is not None and self._lease() is not None:
            return KVCache.for_model(cfg, batch, max_len, dtype=dtype, device=device)
        self._check_model()
        cache = self.cache
        if cache is None or cache.batch_size < batch or cache.max_len < max_len or cache.k.dtype != dtype:
            self._drop_graphs()
            self.cache = None
            rows = batch_bucket(max(batch, cache.batch_size if cache is not None else 0))
            length = -(-max(max_len, cache.max_len if cache is not None else 0) // CACHE_STEP) * CACHE_STEP
            self.cache = KVCache.for_model(cfg, rows, length, dtype=dtype, device=device, spare=1)
            # Two buffers, not views of one: the compiler would tie their offsets to the batch size.
            self._ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
            self._positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
            self._span = torch.zeros(length, dtype=torch.int8, device=device)
            self._adapters = torch.zeros(rows, dtype=torch.long, device=device)
            # Symbolic sizes for the compiler: one compilation serves every cache size too.
            for t in self.cache.storage:
                torch._dynamo.maybe_mark_dynamic(t, 1)
                torch._dynamo.maybe_mark_dynamic(t, 3)
        assert self.cache is not None
        self.cache.reset()
        view = self.cache.rows(0, batch)
        self._lease = weakref.ref(view)
        return view

    def _check_model(self) -> None:
        """Drop the graphs if the model's modules or weight storage changed since they were captured."""
        # LoRA layers, found by what they have (this module sits below weightsmith.lora).
        self._lora = [m for m in self.model.modules() if hasattr(m, "row_groups")]
        fingerprint = (
            tuple(id(m) for m in self.model.modules()),
            tuple(p.data_ptr() for p in self.model.parameters()),
            tuple((m.active_adapter, tuple(sorted(m.merged))) for m in self._lora),
        )
        if fingerprint != self._fingerprint:
            self._drop_graphs()
            self._fingerprint = fingerprint
        names = sorted({name for m in self._lora for name in m.lora_A})
        self._codes = {name: i + 1 for i, name in enumerate(names)}

    def _drop_graphs(self) -> None:
        self._replays.clear()
        self._pool = None

    # ---- one step -------------------------------------------------------------------------

    def owns(self, cache: KVCache) -> bool:
        """Whether `cache` is rows 0.. of this decoder's cache (the rows graphs can read)."""
        return self.cache is not None and cache.k.data_ptr() == self.cache.k.data_ptr()

    @torch.inference_mode()
    def __call__(self, model: Any, cache: KVCache, tokens: list[int], device: torch.device) -> torch.Tensor:
        """One token per row (rows 0..B-1), like the eager step."""
        b = len(tokens)
        names = self._row_names()
        if (
            self.failed is not None
            or model is not self.model
            or not self.owns(cache)
            # The plain step names a wrong row count; an adapter added since `make_cache` has no code.
            or (names is not None and (len(names) != b or not self._codes.keys() >= set(names) - {None}))
        ):
            return self.fallback(model, cache, tokens, device)
        assert self.cache is not None and self._ids is not None and self._positions is not None
        lengths = cache.lengths[:b]
        rows = batch_bucket(b)
        kv = kv_bucket(max(lengths) + 1, self.cache.max_len)
        pad = rows - b
        self._ids[:rows, 0].copy_(torch.tensor(list(tokens) + [0] * pad))
        self._positions[:rows, 0].copy_(torch.tensor(list(lengths) + [0] * pad))
        if names is not None:
            assert self._adapters is not None
            codes = [0 if n is None else self._codes[n] for n in names]
            self._adapters[:rows].copy_(torch.tensor(codes + [0] * pad))
        key, out = (rows, kv, names is not None), None
        with self._indexed(key[2]):
            try:
                replay = self._replays.get(key) or self._capture(*key)
            except Exception as e:  # a capture that fails here must not fail the generation
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            else:
                out = replay()  # outside the try: an error of the step itself is the caller's
        if out is None:
            log.warning(
                "--compile: CUDA graph capture failed here (%s); decoding without graphs", self.failed
            )
            self._drop_graphs()
            return self.fallback(model, cache, tokens, device)
        logits = out[:b].clone()  # the graph's output buffer is rewritten by the next replay
        cache.advance(b)
        return logits

    def _row_names(self) -> tuple[str | None, ...] | None:
        """Each row's adapter inside `lora.row_adapters` (None outside it)."""
        return next((m.row_names for m in self._lora if m.row_groups is not None), None)

    @contextlib.contextmanager
    def _indexed(self, on: bool) -> Iterator[None]:
        """Inside (when `on`), LoRA layers add each row's adapter by its code in `_adapters`."""
        if not on:
            yield
            return
        for m in self._lora:
            m.row_index = (self._adapters, self._codes)
        try:
            yield
        finally:
            for m in self._lora:
                m.row_index = None

    def _step_fn(self) -> Callable[..., torch.Tensor]:
        if not self.compile or self.compile_failed is not None:
            return _step
        if self._compiled is None:
            self._compiled = torch.compile(_step, dynamic=None)
        return self._compiled

    def _run(self, rows: int, kv: int) -> Callable[[], torch.Tensor]:
        assert self._ids is not None and self._positions is not None and self._span is not None
        ids, positions = self._ids[:rows], self._positions[:rows]  # (rows, 1) each
        span = self._span[:kv]
        torch._dynamo.maybe_mark_dynamic(span, 0)

        def run() -> torch.Tensor:
            fn = self._step_fn()
            if fn is _step:
                return fn(self.model, self.cache, ids, positions, span)
            torch._dynamo.maybe_mark_dynamic(ids, 0)
            torch._dynamo.maybe_mark_dynamic(positions, 0)
            try:
                # Sizes are symbolic, so one compilation is expected; leave room for a few more
                # (a new dtype or model shape) without falling back to eager.
                with torch._dynamo.config.patch(**{_limit(): 32}):
                    return fn(self.model, self.cache, ids, positions, span)
            except Exception as e:  # the compiler cannot run here: graphs of the eager step
                self.compile_failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning(
                    "--compile: torch.compile failed here (%s); capturing the eager step", self.compile_failed
                )
                return _step(self.model, self.cache, ids, positions, span)

        return run

    def _capture(self, rows: int, kv: int, indexed: bool) -> _Replay:
        run = self._run(rows, kv)
        if not self.capture:
            replay = _Replay(run)
        else:
            # Warm up outside the graph (compiles, autotunes, allocates); the inputs are this
            # step's own, so the cache entries these runs write are the ones the replay writes.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = run()
            self._pool = self._pool or graph.pool()
            replay = _Replay(run, graph, out)
        self._replays[(rows, kv, indexed)] = replay
        return replay


#: One graph decoder per model (weakly held), so graphs and the cache live as long as the model.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graph_decoder(model: Any, fallback: Callable[..., torch.Tensor], *, compile: bool = True) -> GraphDecode:
    """The model's CUDA-graph decoder (shared by every generation of the model), falling back
    on `fallback` where graphs cannot serve a step."""
    decoder = _DECODERS.get(model)
    if decoder is None or decoder.compile != compile:
        decoder = _DECODERS[model] = GraphDecode(model, fallback, compile=compile)
    decoder.fallback = fallback
    return decoder
