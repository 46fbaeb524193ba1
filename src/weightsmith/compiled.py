"""`--compile`: the decode step through torch.compile, with static shapes.

Eager decoding attends over `max(row lengths) + 1` cache entries, a shape that changes
every step. The compiled step always attends over the whole preallocated cache
(`cache.max_len` entries) with a mask from each row's position, and writes each row's
new key/value at its position with a scatter, so every step has the same shapes and the
compiler builds its kernels once per (batch, cache size). Masked entries add nothing, so
the logits equal the eager step's up to float rounding.

When the compiler cannot run here (no C++ compiler for inductor on CPU, an unsupported
backend, a failing graph), the first step logs one warning and decoding continues
eagerly: `--compile` never turns a working command into a failing one.

Not here: the generation loop (generate.py) and sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from weightsmith.kv_cache import KVCache

log = logging.getLogger(__name__)


def _static_step(model: Any, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    logits = model(ids, positions=positions, cache=cache, kv_len=cache.max_len, aligned=False)
    return logits[:, 0]


class CompiledDecode:
    """One token per row, through torch.compile; falls back to `eager` on failure."""

    def __init__(self, eager: Callable[..., torch.Tensor], *, mode: str | None = None) -> None:
        self.eager = eager
        self.mode = mode
        self.failed: str | None = None
        self._fn: Any = None

    def _compiled(self) -> Any:
        if self._fn is None:
            self._fn = torch.compile(_static_step, dynamic=False, mode=self.mode)
        return self._fn

    @torch.inference_mode()
    def __call__(self, model: Any, cache: KVCache, tokens: list[int], device: torch.device) -> torch.Tensor:
        if self.failed is not None:
            return self.eager(model, cache, tokens, device)
        b = len(tokens)
        lengths = cache.lengths[:b]
        ids = torch.tensor(tokens, device=device)[:, None]
        positions = torch.tensor(lengths, device=device)[:, None]
        view = cache if b == cache.batch_size else cache.rows(0, b)
        try:
            logits = self._compiled()(model, view, ids, positions)
        except Exception as e:  # any compiler failure means "run eagerly"
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("--compile: torch.compile failed here (%s); decoding eagerly", self.failed)
            return self.eager(model, cache, tokens, device)
        cache.lengths = [n + 1 for n in lengths] + cache.lengths[b:]
        return logits


_DECODERS: dict[str, CompiledDecode] = {}


def compiled_decoder(eager: Callable[..., torch.Tensor], device: torch.device) -> CompiledDecode:
    """The process's compiled decoder for a device type (compiled graphs are reused)."""
    key = device.type
    if key not in _DECODERS:
        _DECODERS[key] = CompiledDecode(eager)
    return _DECODERS[key]
