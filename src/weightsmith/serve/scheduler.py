"""Continuous batching: many requests share one running decode batch.

One thread owns the model. Each iteration it (1) drops cancelled sequences, (2)
admits waiting requests into free batch rows and prefills them (newcomers' prefill
is interleaved with everyone else's decoding, one prefill per iteration at most),
then (3) runs one decode step for every running row. A prompt longer than
`prefill_chunk` tokens is prefilled a chunk per iteration in a one-row staging cache,
so the running rows keep getting a token every step meanwhile, and joins the batch
(its rows copied in) when its last chunk is done. A row that finishes leaves at
once, and the last row moves into its slot so the running rows stay 0..B-1 of the
KV cache (kv_cache.py); its slot is free for the next newcomer the same iteration. Its
tokens' keys and values are first kept in the prompt cache, when the server has one
(prompt_cache.py), and a newcomer copies the longest prefix a running or kept row holds
instead of prefilling it (prefix.py): a conversation's next turn prefills only what is new.

Rows of one batch may use different LoRA adapters (lora.row_adapters), different
sampling settings and different lengths; a row's tokens are the same as when it runs
alone. A request with n > 1 choices is prefilled once and its cache row copied.

The token loop is the shared one: `generate.prefill` (chunks too, with a start offset),
the decode step chosen once by the engine and passed in (`decode`: the fused C step for
up to 32 rows on the CPU, CUDA graphs with `--compile` on a GPU), every row's token of a
step picked in one batched pass (sampling.sample_batch), and one `RowState` per row (row_state.py: sampler, text, stop
strings and the finish rule TokenGenerator uses too). The server adds scheduling, not a
second decoder. Not here: HTTP, JSON and validation (app.py, schemas.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.generate import DecodeFn, decode_one_token, prefill
from weightsmith.inspect import HookState, hooked
from weightsmith.inspect.steering import row_edits
from weightsmith.kv_cache import KVCache
from weightsmith.lora import lora_layers, row_adapters
from weightsmith.models import CausalLM
from weightsmith.prompt_cache import PromptCache
from weightsmith.row_state import RowState, TextStream
from weightsmith.sampling import SamplingParams, sample_batch
from weightsmith.serve.events import SequenceEvent, token_logprob
from weightsmith.serve.model_calls import CallQueue
from weightsmith.serve.prefix import MIN_SHARED, held_rows, reuse_for_chunks, reuse_prefixes
from weightsmith.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its limit; the client should retry later."""


@dataclass
class Request:
    """One API request: `len(prompts)` choices (n choices share a prompt list entry each)."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    emit: Callable[[SequenceEvent], None]
    adapter: str | None = None
    #: hook edits steering this request's rows (weightsmith.inspect.steering), None: not steered
    steer: dict[str, list[Any]] | None = None
    logprobs: int | None = None  # None: off; k: the chosen token's and the top-k alternatives
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    #: prompt tokens copied from a held row's cache instead of prefilled (usage's cached_tokens)
    cached_tokens: int = 0

    def cancel(self) -> None:
        """Called from any thread (a client went away); the scheduler frees its rows."""
        self.cancelled = True


class Choice(RowState):
    """One running choice of a request: its row's state (sampler, tokens, text) and timings."""

    def __init__(
        self, request: Request, index: int, tokenizer: Tokenizer, vocab: int, device, eos: frozenset[int]
    ) -> None:
        params = request.params[index]
        text = TextStream(tokenizer, params.stop)
        super().__init__(request.prompts[index], params, eos=eos, vocab=vocab, device=device, text=text)
        self.request = request
        self.index = index
        self.last_time: float | None = None


class Observer:
    """What the scheduler reports as it runs (the server's /metrics implements it)."""

    def queue(self, waiting: int, running: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def next_token(self, seconds: float) -> None: ...

    def tokens(self, prompt: int = 0, generated: int = 0, cached: int = 0) -> None: ...

    def finished(self, reason: str) -> None: ...


@dataclass
class Staged:
    """A request whose long prompts are being prefilled a chunk per step, one distinct prompt
    after the other; the choices of a prompt join the batch when its last chunk is in."""

    request: Request
    choices: list[Choice]  # the choices not running yet, those of one prompt next to each other
    done: int = 0  # tokens of the first choice's prompt already in the staging cache


class Scheduler:
    """Runs requests from many clients in one continuously batched decode loop."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int],
        *,
        max_batch: int = 16,
        max_len: int = 2048,
        max_queue: int = 64,
        max_prefill_tokens: int = 4096,
        prefill_chunk: int = 512,
        observer: Observer | None = None,
        decode: DecodeFn = decode_one_token,
        prompt_cache: PromptCache | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        #: The decode step, chosen by the caller (`Engine.decode_step()` gives the CPU's C step).
        self.decode = decode
        self.tokenizer = tokenizer
        self.eos = eos_token_ids
        self.max_batch = max_batch
        self.max_len = max_len
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.device = model.inv_freq.device
        self.vocab = model.config.vocab_size
        dtype = kv_dtype or model.model.embed_tokens.weight.dtype  # the cache's (bf16 halves an fp32 one)
        # A step that replays CUDA graphs decodes in its own cache (cuda_graphs.py).
        make_cache = getattr(decode, "make_cache", None) or KVCache.for_model
        self.cache = make_cache(model.config, max_batch, max_len, dtype=dtype, device=self.device)
        self.has_adapters = bool(lora_layers(model))
        #: finished rows kept for the next turn of their conversation (prompt_cache.py), or None
        self.prompt_cache = prompt_cache
        self.staged: Staged | None = None  # long prompts being prefilled chunk by chunk
        self.prefilling: list[Request] = []  # taken from the queue, not running yet (see _fail_all)
        self.staging: KVCache | None = None  # its one-row cache, allocated on first use
        self.running: list[Choice] = []
        self.waiting: deque[Request] = deque()
        self.observer = observer or Observer()
        self._lock = threading.Condition()
        self.calls = CallQueue(max_queue, self._lock)  # work besides decoding: prompt scoring
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- called from other threads -------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when `max_queue` requests already wait."""
        if len(request.prompts) > self.max_batch:
            raise ValueError(f"a request has at most {self.max_batch} choices")
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit, --max-queue)")
            self.waiting.append(request)
            self.observer.queue(len(self.waiting), len(self.running))
            self._lock.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the model's thread between two steps (model_calls.py); QueueFull as `submit`."""
        if self._stop:
            raise QueueFull("the server is shutting down")
        return self.calls.submit(fn, QueueFull)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="weightsmith-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the current step; sequences still running end with "error"."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self.staged is None and not self.calls

    # ---- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self.idle:
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # a bug or an out-of-memory must not kill the server
                log.exception("scheduler step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def step(self) -> None:
        """One iteration: drop cancelled rows, prefill newcomers, decode every running row."""
        self._drop_cancelled()
        self.calls.run_one()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
        if self.staged is not None:
            self._prefill_chunk()
        if self.running:
            self._decode()
        self.observer.queue(len(self.waiting), len(self.running))

    def _drop_cancelled(self) -> None:
        if self.staged is not None and self.staged.request.cancelled:
            for _ in self.staged.choices:
                self.observer.finished("cancelled")
            self.staged = None
        for row in reversed(range(len(self.running))):
            if self.running[row].request.cancelled:
                self._finish(row, "cancelled", emit=False)
        with self._lock:
            if any(r.cancelled for r in self.waiting):
                for request in self.waiting:
                    if request.cancelled:
                        self.observer.finished("cancelled")
                self.waiting = deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> list[Request]:
        """Take waiting requests, oldest first, while their choices fit in free rows and the
        prefill budget (the first one always goes, however long its prompt). A request whose
        distinct prompts hold more than `prefill_chunk` tokens (one long prompt or a list of
        them) is staged for chunked prefill instead when no other is; while one is, shorter
        requests may pass a second long one."""
        taken: list[Request] = []
        free = self.max_batch - len(self.running) - (len(self.staged.choices) if self.staged else 0)
        budget = self.max_prefill_tokens
        passed: deque[Request] = deque()
        with self._lock:
            while self.waiting:
                request = self.waiting[0]
                prompts = {tuple(p) for p in request.prompts}
                n_tokens = sum(len(p) for p in prompts)
                if len(request.prompts) > free:
                    break  # first come, first served: nobody passes a request that does not fit
                if n_tokens > self.prefill_chunk:
                    self.waiting.popleft()
                    if self.staged is None:
                        free -= len(request.prompts) if self._stage(request) else 0
                    else:
                        passed.append(request)
                    continue
                if taken and n_tokens > budget:
                    break
                self.waiting.popleft()
                taken.append(request)
                free -= len(request.prompts)
                budget -= n_tokens
            passed.extend(self.waiting)
            self.waiting = passed
        return taken

    def _stage(self, request: Request) -> bool:
        choices = self._choices(request)
        if choices is not None:
            order = {p: i for i, p in enumerate(dict.fromkeys(tuple(c.prompt) for c in choices))}
            self.staged = Staged(request, sorted(choices, key=lambda c: order[tuple(c.prompt)]))
        return choices is not None

    def _choices(self, request: Request) -> list[Choice] | None:
        """The request's choices (a sampler each), or None after failing the request alone
        when one cannot start (e.g. a seed torch refuses)."""
        try:
            return [
                Choice(request, i, self.tokenizer, self.vocab, self.device, self.eos)
                for i in range(len(request.prompts))
            ]
        except Exception as e:
            log.exception("request %d could not start", request.id)
            _fail_request(request, f"the request could not start: {type(e).__name__}: {e}")
            return None

    @contextlib.contextmanager
    def _adapters(self, rows: Sequence[Choice]):
        """Each row's adapter and steering for one forward pass over `rows` (batch row order)."""
        with contextlib.ExitStack() as stack:
            if self.has_adapters:
                stack.enter_context(row_adapters(self.model, [s.request.adapter for s in rows]))
            steer = [s.request.steer for s in rows]
            if any(steer):  # only steered batches leave the model's fast path
                stack.enter_context(hooked(self.model, HookState(row_edits(steer))))
            yield

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill each distinct prompt once into the rows after the running ones; copy
        that row for the request's other choices with the same prompt."""
        start = len(self.running)
        unique: list[Choice] = []  # one per distinct prompt, in row order
        copies: list[tuple[Choice, Choice]] = []  # (copy, its source)
        for request in requests:
            choices = self._choices(request)
            if choices is None:
                continue
            self.prefilling.append(request)  # until it runs: a prefill that raises fails it (_fail_all)
            seen: dict[tuple[int, ...], Choice] = {}
            for seq in choices:
                key = tuple(seq.prompt)
                if key in seen:
                    copies.append((seq, seen[key]))
                else:
                    seen[key] = seq
                    unique.append(seq)
            self.observer.tokens(prompt=sum(len(p) for p in {tuple(p) for p in request.prompts}))
        if not unique:
            self.prefilling = []
            return
        held = held_rows(self.cache, self.running, self.prompt_cache)
        skip = reuse_prefixes(self.cache, held, unique, start)  # prompt tokens already cached
        for seq in unique:
            seq.request.cached_tokens += skip
        self.observer.tokens(cached=skip * len(unique))
        view = self.cache.rows(start, len(unique))  # shares the rows' storage and lengths
        with self._adapters(unique):
            logits = prefill(
                self.model, view, [s.prompt[skip:] for s in unique], self.device, start=skip
            )  # (U, V)
        self.prefilling = []
        self.running.extend(unique)
        logit_row = {id(s): i for i, s in enumerate(unique)}  # each newcomer's row in `logits`
        for seq, source in copies:
            self.cache.copy_row(start + logit_row[id(source)], len(self.running))
            logit_row[id(seq)] = logit_row[id(source)]
            self.running.append(seq)
        # Sample every newcomer's first token from its prompt's logits.
        new_logits = logits[[logit_row[id(s)] for s in self.running[start:]]]  # (new rows, V)
        self._sample(new_logits, first_row=start)

    @torch.inference_mode()
    def _prefill_chunk(self) -> None:
        """Prefill the staged prompt's next chunk; when it is complete, copy it into a row per
        choice of that prompt and sample their first tokens (the next prompt starts next step)."""
        staged = self.staged
        assert staged is not None
        prompt = staged.choices[0].prompt
        if self.staging is None:
            self.staging = KVCache.for_model(
                self.model.config, 1, self.max_len, dtype=self.cache.k.dtype, device=self.device
            )
        if staged.done == 0:  # a prefix some row holds is copied, not prefilled
            held = held_rows(self.cache, self.running, self.prompt_cache)
            staged.done = reuse_for_chunks(self.staging, held, staged.choices[0])
            staged.choices[0].request.cached_tokens += staged.done
            self.observer.tokens(cached=staged.done)
        start, end = staged.done, min(staged.done + self.prefill_chunk, len(prompt))
        with self._adapters(staged.choices[:1]):
            logits = prefill(
                self.model, self.staging, [prompt[start:end]], self.device, start=start
            )  # (1, V)
        staged.done = end
        if end < len(prompt):
            return
        first_row = len(self.running)
        joining = [c for c in staged.choices if c.prompt == prompt]
        for i, choice in enumerate(joining):
            self.cache.copy_row(0, first_row + i, source=self.staging)
            self.running.append(choice)
        staged.choices, staged.done = staged.choices[len(joining) :], 0
        if not staged.choices:
            self.staged = None
        self.observer.tokens(prompt=len(prompt))
        self._sample(logits.expand(len(joining), -1), first_row=first_row)  # (n, V)

    def _decode(self) -> None:
        # A steered batch runs the PyTorch step: the fused C step and CUDA graphs run no hooks.
        step = decode_one_token if any(s.request.steer for s in self.running) else self.decode
        with self._adapters(self.running):
            logits = step(self.model, self.cache, [s.last for s in self.running], self.device)
        self._sample(logits, first_row=0)

    def _sample(self, logits: torch.Tensor, first_row: int) -> None:
        """Pick a token for rows first_row.. (logits (B, V)) in one batched pass, emit their
        text, finish rows."""
        now = time.perf_counter()
        seqs = self.running[first_row : first_row + len(logits)]
        try:
            tokens: list[int] | None = sample_batch([s.sampler for s in seqs], logits)
        except Exception:  # some row cannot be sampled: go row by row to end only that one
            tokens = None
        finished: list[tuple[int, str]] = []
        for i, seq in enumerate(seqs):
            row = first_row + i
            try:
                token = tokens[i] if tokens is not None else seq.sampler(logits[i])
                reason = self._next_token(seq, row, token, logits[i], now)
            except Exception as e:  # one row's sampling failed: end that row only
                log.exception("sampling failed for request %d", seq.request.id)
                seq.request.emit(SequenceEvent(seq.index, "", [], None, "error", len(seq.generated),
                                               error=f"sampling failed: {type(e).__name__}: {e}"))  # fmt: skip
                seq.request.cancel()  # its other choices end too: the request has failed
                reason = "error"
            if reason is not None:
                finished.append((row, reason))
        self.observer.tokens(generated=len(logits))
        for row, reason in sorted(finished, reverse=True):
            self._finish(row, reason, emit=False)

    def _next_token(self, seq: Choice, row: int, token: int, logits: torch.Tensor, now: float) -> str | None:
        """Record row `row`'s sampled `token` (its raw logits (V,) for log-probabilities), emit
        it; return the finish reason."""
        text = seq.record(token, self.cache.room(row))
        self._record_timing(seq, now)
        reason = seq.finish_reason
        logprobs = None
        if seq.request.logprobs is not None:
            logprobs = [token_logprob(logits, token, seq.request.logprobs)]
        event = SequenceEvent(
            seq.index, text, [token], logprobs, reason, completion_tokens=len(seq.generated)
        )
        seq.request.emit(event)
        return reason

    def _record_timing(self, seq: Choice, now: float) -> None:
        if seq.last_time is None:
            self.observer.first_token(now - seq.request.arrived)
        else:
            self.observer.next_token(now - seq.last_time)
        seq.last_time = now

    def _finish(self, row: int, reason: str, *, emit: bool, error: str | None = None) -> None:
        """Free `row`: the last running row moves into it, so rows stay contiguous."""
        seq = self.running[row]
        if emit:
            seq.request.emit(SequenceEvent(seq.index, "", [], None, reason, len(seq.generated), error=error))
        if self.prompt_cache is not None and reason in ("stop", "length") and seq.request.steer is None:
            tokens = seq.prompt + seq.generated
            self.prompt_cache.keep(self.cache, row, tokens, seq.request.adapter, MIN_SHARED)
        last = len(self.running) - 1
        if row != last:
            self.cache.copy_row(last, row)
            self.running[row] = self.running[last]
        self.running.pop()
        self.cache.reset(last)
        self.observer.finished(reason)

    def _fail_all(self, message: str) -> None:
        """End every running, staged, half-admitted and waiting request with an error event."""
        if self.staged is not None:
            for choice in self.staged.choices:  # its choices already running end below
                choice.request.emit(SequenceEvent(choice.index, "", [], None, "error", 0, error=message))
            self.staged = None
        for request in self.prefilling:
            _fail_request(request, message)
        self.prefilling = []
        for row in reversed(range(len(self.running))):
            self._finish(row, "error", emit=True, error=message)
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            _fail_request(request, message)
        self.calls.fail_all(message)
        self.observer.queue(0, 0)


def _fail_request(request: Request, message: str) -> None:
    for i in range(len(request.prompts)):
        request.emit(SequenceEvent(i, "", [], None, "error", 0, error=message))
