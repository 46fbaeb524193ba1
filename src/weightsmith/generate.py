"""The token-level generation loop: prefill, then decode one token at a time.

`prefill` runs all prompt tokens of a batch through the model at once, writing the
KV cache after each row's first `start` tokens (a `TokenGenerator` runs a prompt that several
rows share once, and copies its cache); `decode_one_token` feeds each row's
last token at its own position. Rows may have prompts of different lengths: they are
right-padded for prefill and each row then writes at its own cache index, so a row's
results are the same as when it runs alone. `TokenGenerator` drives the loop and
reports per-row tokens and finish reasons (each row a `RowState`, row_state.py).

The decode step is the caller's choice, made once and passed in: `decode_one_token`
(PyTorch, eager), a compiled one (compiled.py; on a CUDA device, replayed from CUDA graphs:
cuda_graphs.py) or the fused C step an `Engine` gets from its CPU decode plan
(weightsmith.cpu_decode); every step has `decode_one_token`'s signature (`DecodeFn`). A
step with a `make_cache` method supplies the cache its generation decodes in.

Not here: prompts and chat templates (engine.py), the text of a row and its stop
strings (row_state.py), choosing the step (engine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from weightsmith.compiled import compiled_decoder
from weightsmith.cuda_graphs import graph_decoder
from weightsmith.kv_cache import KVCache
from weightsmith.models import CausalLM
from weightsmith.row_state import RowState, TextStream
from weightsmith.sampling import SamplingParams, sample_batch

#: A decode step: (model, cache, one token per row, device) -> logits (B, V); advances the cache.
DecodeFn = Callable[[CausalLM, KVCache, list[int], torch.device], torch.Tensor]


@dataclass
class TokenEvent:
    """One new token for one row; `finish_reason` is set on the row's last event."""

    row: int
    token: int | None  # None when a row ends without emitting (e.g. cancelled)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    text: str = ""  # the row's new text, when it has a TextStream


@torch.inference_mode()
def prefill(
    model: CausalLM,
    cache: KVCache,
    prompts: list[list[int]],
    device: torch.device,
    *,
    start: int = 0,
    every_position: bool = False,
) -> torch.Tensor:
    """Write prompt i into cache row i after the row's first `start` tokens (already cached: a
    chunked prompt, draft tokens to verify) and set the row's length; return each row's
    next-token logits (B, V), or with `every_position` the logits after every token (B, T, V)."""
    lengths = [len(p) for p in prompts]
    t = max(lengths)
    pad = 0
    ids = torch.tensor([p + [pad] * (t - len(p)) for p in prompts], device=device)  # (B, T)
    positions = torch.arange(start, start + t, device=device).expand(len(prompts), t)  # (B, T)
    last = None if every_position else torch.tensor([n - 1 for n in lengths], device=device)  # (B,)
    aligned = len(set(lengths)) == 1
    logits = model(ids, positions=positions, cache=cache, kv_len=start + t, aligned=aligned, logits_at=last)
    cache.set_lengths(0, [start + n for n in lengths])
    return logits if every_position else logits[:, 0]


@torch.inference_mode()
def decode_one_token(
    model: CausalLM, cache: KVCache, tokens: list[int], device: torch.device
) -> torch.Tensor:
    """Feed one token per row (rows 0..B-1) at the row's next position; return logits (B, V)."""
    b = len(tokens)
    lengths = cache.lengths[:b]
    ids = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
    positions = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    kv_len = max(lengths) + 1
    aligned = len(set(lengths)) == 1
    logits = model(ids, positions=positions, cache=cache, kv_len=kv_len, aligned=aligned)
    cache.advance(b)
    return logits[:, 0]


def compiled_step(model: CausalLM, eager: DecodeFn) -> DecodeFn:
    """`--compile`'s decode step for `model`: replayed from CUDA graphs on a CUDA device
    (cuda_graphs.py), through torch.compile elsewhere (compiled.py); `eager` decodes where
    these cannot."""
    device = model.inv_freq.device
    if device.type == "cuda":
        return graph_decoder(model, eager)
    return compiled_decoder(eager, device)


class TokenGenerator:
    """Generates tokens for a batch of prompts until every row finishes.

    Rows finish by the rule in row_state.py ("stop": an end-of-sequence or stop token id, or
    a stop string when `texts` are given; "length": `max_tokens` or a full cache), or when
    `cancel(row)` is called. A finished row keeps its slot but stops advancing, so the other
    rows are unaffected.

    decode: the decode step (default `decode_one_token`, or `compiled_step` with `compile`).
    texts: one TextStream per row, to get each row's text in the events and end rows on
        stop strings.
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
        decode: DecodeFn | None = None,
        texts: Sequence[TextStream] | None = None,
        prefix: tuple[KVCache, int] | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """prefix: (a one-row cache, n) holding the first n tokens of the one prompt (a kept
        conversation, prompt_cache.py): they are copied, and only the rest is prefilled.
        kv_dtype: the cache's dtype (default: the model's; bf16 under an fp32 model halves it)."""
        assert len(prompts) == len(params) and prompts and all(prompts)
        assert prefix is None or (len(prompts) == 1 and 0 < prefix[1] < len(prompts[0]))
        self.prefix = prefix
        assert texts is None or len(texts) == len(prompts)
        self.model = model
        self.device = model.inv_freq.device
        self.prompts = prompts
        limit = model.config.max_position_embeddings
        need = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params, strict=True))
        self.max_len = min(max_len or need, need, limit)
        if compile:  # cache sizes in steps of 256: a new size means a new compiled graph
            self.max_len = min(-(-self.max_len // 256) * 256, limit)
        if decode is None and compile:
            decode = compiled_step(model, decode_one_token)
        self.decode: DecodeFn = decode or decode_one_token
        dtype = kv_dtype or model.model.embed_tokens.weight.dtype
        # A step that replays CUDA graphs decodes in its own cache (cuda_graphs.py).
        self._make_cache = getattr(self.decode, "make_cache", None) or KVCache.for_model
        self.cache = self._make_cache(
            model.config, len(prompts), self.max_len, dtype=dtype, device=self.device
        )
        vocab = model.config.vocab_size
        self.rows = [
            RowState(
                p, sp, eos=eos_token_ids, vocab=vocab, device=self.device, text=texts[i] if texts else None
            )
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]

    @property
    def generated(self) -> list[list[int]]:
        return [r.generated for r in self.rows]

    @property
    def finished(self) -> list[str | None]:
        return [r.finish_reason for r in self.rows]

    def cancel(self, row: int, reason: str = "stop") -> None:
        self.rows[row].cancel(reason)

    @property
    def done(self) -> bool:
        return all(r.done for r in self.rows)

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        logits = self._prefill()
        while True:
            events = self._sample(logits)
            if events:
                yield events
            if self.done:
                return
            held = self.cache.lengths
            logits = self.decode(self.model, self.cache, [r.last for r in self.rows], self.device)
            # Rows that finished keep re-feeding their last token at a fixed position,
            # so their slot stays in the batch without growing.
            for row, state in enumerate(self.rows):
                if state.done:
                    self.cache.set_length(row, held[row])

    def _prefill(self) -> torch.Tensor:
        """Every row's prompt into the cache; (B, V) next-token logits. Rows that share a prompt
        (n samples of one prompt, GRPO's groups) share its prefill: each distinct prompt runs
        once, in a cache of its own, and is copied into its rows."""
        if self.prefix is not None:
            held, n = self.prefix
            self.cache.copy_row(0, 0, source=held, length=n)
            return prefill(self.model, self.cache, [self.prompts[0][n:]], self.device, start=n)
        first: dict[tuple[int, ...], int] = {}
        for p in self.prompts:
            first.setdefault(tuple(p), len(first))
        if len(first) == len(self.prompts):
            return prefill(self.model, self.cache, self.prompts, self.device)
        distinct = self._make_cache(self.model.config, len(first), self.max_len, dtype=self.cache.k.dtype,
                                    device=self.device)  # fmt: skip
        logits = prefill(self.model, distinct, [list(p) for p in first], self.device)  # (U, V)
        source = [first[tuple(p)] for p in self.prompts]
        for row, u in enumerate(source):
            self.cache.copy_row(u, row, source=distinct)
        return logits.index_select(0, torch.tensor(source, device=logits.device))

    def _sample(self, logits: torch.Tensor) -> list[TokenEvent]:
        """Pick every running row's next token from (B, V) logits in one batched pass."""
        active = [row for row, state in enumerate(self.rows) if not state.done]
        if not active:
            return []
        if len(active) < len(self.rows):
            logits = logits.index_select(0, torch.tensor(active, device=logits.device))
        tokens = sample_batch([self.rows[row].sampler for row in active], logits)
        events = []
        for row, token in zip(active, tokens, strict=True):
            state = self.rows[row]
            text = state.record(token, self.cache.room(row))
            events.append(TokenEvent(row, token, state.finish_reason, text))
        return events
