"""The token-level generation loop: prefill, then decode one token at a time.

`prefill` runs all prompt tokens of a batch through the model at once, writing the
KV cache; `decode_one_token` feeds each row's last token at its own position. Rows
may have prompts of different lengths: they are right-padded for prefill and each
row then writes at its own cache index, so a row's results are the same as when
it runs alone. `TokenGenerator` drives the loop and reports per-row tokens and
finish reasons.

Not here: text (detokenizing, stop strings, chat templates) which is engine.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.kv_cache import KVCache
from weightsmith.models import CausalLM
from weightsmith.quant import cpu_decode
from weightsmith.sampling import Sampler, SamplingParams


@dataclass
class TokenEvent:
    """One new token for one row; `finish_reason` is set on the row's last event."""

    row: int
    token: int | None  # None when a row ends without emitting (e.g. cancelled)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


@torch.inference_mode()
def prefill(model: CausalLM, cache: KVCache, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
    """Write every prompt into its cache row; return each row's next-token logits (B, V)."""
    lengths = [len(p) for p in prompts]
    t = max(lengths)
    pad = 0
    ids = torch.tensor([p + [pad] * (t - len(p)) for p in prompts], device=device)  # (B, T)
    positions = torch.arange(t, device=device).expand(len(prompts), t)
    last = torch.tensor([n - 1 for n in lengths], device=device)
    aligned = len(set(lengths)) == 1
    logits = model(ids, positions=positions, cache=cache, kv_len=t, aligned=aligned, logits_at=last)
    cache.lengths = lengths + cache.lengths[len(prompts) :]
    return logits[:, 0]


@torch.inference_mode()
def decode_one_token(
    model: CausalLM, cache: KVCache, tokens: list[int], device: torch.device
) -> torch.Tensor:
    """Feed one token per row at the row's next position; return logits (B, V).

    On the CPU, models the fused C step supports (weightsmith.quant.cpu_decode) take it."""
    b = len(tokens)
    if device.type == "cpu":
        fused = cpu_decode.plan(model, cache, b)
        if fused is not None:
            return fused.step(cache, tokens)
    lengths = cache.lengths[:b]
    ids = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
    positions = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    kv_len = max(lengths) + 1
    aligned = len(set(lengths)) == 1
    logits = model(ids, positions=positions, cache=cache, kv_len=kv_len, aligned=aligned)
    cache.lengths = [n + 1 for n in lengths] + cache.lengths[b:]
    return logits[:, 0]


class TokenGenerator:
    """Generates tokens for a batch of prompts until every row finishes.

    Rows finish on an end-of-sequence or stop token id ("stop"), after `max_tokens`
    or when the cache is full ("length"), or when `cancel(row)` is called (e.g. a
    stop string was seen in the text). A finished row keeps its slot but stops
    advancing, so the other rows are unaffected.
    """

    def __init__(
        self,
        model: CausalLM,
        prompts: list[list[int]],
        params: list[SamplingParams],
        *,
        eos_token_ids: frozenset[int] | set[int],
        max_len: int | None = None,
        compile: bool = False,
    ) -> None:
        assert len(prompts) == len(params) and prompts and all(prompts)
        self.model = model
        self.device = model.inv_freq.device
        self.prompts = prompts
        self.params = params
        self.eos = frozenset(eos_token_ids)
        limit = model.config.max_position_embeddings
        need = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params, strict=True))
        self.max_len = min(max_len or need, need, limit)
        if compile:  # cache sizes in steps of 256: a new size means a new compiled graph
            self.max_len = min(-(-self.max_len // 256) * 256, limit)
        dtype = model.model.embed_tokens.weight.dtype
        self.cache = KVCache.for_model(
            model.config, len(prompts), self.max_len, dtype=dtype, device=self.device
        )
        vocab = model.config.vocab_size
        self.samplers = [Sampler(sp, p, vocab, self.device) for p, sp in zip(prompts, params, strict=True)]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finished: list[str | None] = [None] * len(prompts)
        self._last: list[int] = [p[-1] for p in prompts]
        self.decode: Any = decode_one_token
        if compile:
            from weightsmith.compiled import compiled_decoder

            self.decode = compiled_decoder(decode_one_token, self.device)

    def cancel(self, row: int, reason: str = "stop") -> None:
        if self.finished[row] is None:
            self.finished[row] = reason

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finished)

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        logits = prefill(self.model, self.cache, self.prompts, self.device)
        while True:
            events = self._sample(logits)
            if events:
                yield events
            if self.done:
                return
            logits = self.decode(self.model, self.cache, self._last, self.device)
            # Rows that finished keep re-feeding their last token at a fixed position,
            # so their slot stays in the batch without growing.
            for row, reason in enumerate(self.finished):
                if reason is not None:
                    self.cache.lengths[row] -= 1

    def _sample(self, logits: torch.Tensor) -> list[TokenEvent]:
        events = []
        for row, sampler in enumerate(self.samplers):
            if self.finished[row] is not None:
                continue
            token = sampler(logits[row])
            sp = self.params[row]
            self.generated[row].append(token)
            self._last[row] = token
            reason = None
            if (token in self.eos and not sp.ignore_eos) or token in sp.stop_token_ids:
                reason = "stop"
            elif len(self.generated[row]) >= sp.max_tokens or self.cache.lengths[row] + 1 >= self.max_len:
                reason = "length"
            self.finished[row] = reason
            events.append(TokenEvent(row, token, reason))
        return events
