"""`--compile`: the decode step through torch.compile, with static shapes.

Eager decoding attends over `max(row lengths) + 1` cache entries, a shape that changes
every step. The compiled step always attends over the whole preallocated cache
(`cache.max_len` entries) with a mask from each row's position, and writes each row's
new key/value at its position with a scatter, so every step has the same shapes and the
compiler builds its kernels once per (batch, cache size). Masked entries add nothing, so
the logits equal the eager step's up to float rounding.

When the compiler cannot run here (no C++ compiler for inductor on CPU, an unsupported
backend, a failing graph), the first step logs one warning and decoding continues with
the step it was given to fall back on (the eager step, or the CPU's fused C step):
`--compile` never turns a working command into a failing one.

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

    def __init__(self, eager: Callable[..., torch.Tensor] | None, *, mode: str | None = None) -> None:
        self.eager = eager
        self.mode = mode
        self.failed: str | None = None
        self._fn: Any = None

    def _compiled(self) -> Any:
        if self._fn is None:
            self._fn = torch.compile(_static_step, dynamic=False, mode=self.mode)
        return self._fn

    @torch.inference_mode()
    def __call__(
        self,
        model: Any,
        cache: KVCache,
        tokens: list[int],
        device: torch.device,
        fallback: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One token per row (rows 0..B-1), like the eager step; `fallback` (default `eager`)
        decodes when the compiler cannot."""
        fallback = fallback or self.eager
        assert fallback is not None, "a shared CompiledDecode is called with its caller's fallback"
        if self.failed is not None:
            return fallback(model, cache, tokens, device)
        b = len(tokens)
        lengths = cache.lengths[:b]
        ids = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
        positions = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
        view = cache if b == cache.batch_size else cache.rows(0, b)
        try:
            logits = self._compiled()(model, view, ids, positions)
        except Exception as e:  # any compiler failure means "run eagerly"
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("--compile: torch.compile failed here (%s); decoding eagerly", self.failed)
            return fallback(model, cache, tokens, device)
        cache.advance(b)
        return logits


class CompiledStep:
    """A device's shared `CompiledDecode`, with this caller's step to fall back on."""

    def __init__(self, shared: CompiledDecode, fallback: Callable[..., torch.Tensor]) -> None:
        self.shared, self.fallback = shared, fallback

    @property
    def failed(self) -> str | None:
        return self.shared.failed

    def __call__(self, model: Any, cache: KVCache, tokens: list[int], device: torch.device) -> torch.Tensor:
        return self.shared(model, cache, tokens, device, self.fallback)


#: One compiled decoder per device type, so compiled graphs (and a failure) are shared.
_DECODERS: dict[str, CompiledDecode] = {}


def compiled_decoder(eager: Callable[..., torch.Tensor], device: torch.device) -> CompiledStep:
    """The compiled decode step for `device` (graphs shared in the process), falling back
    on `eager` where the compiler cannot run."""
    key = device.type
    if key not in _DECODERS:
        _DECODERS[key] = CompiledDecode(None)
    return CompiledStep(_DECODERS[key], eager)
