"""The text-level engine: prompts or chat messages in, streamed text deltas out.

Wraps the token loop (generate.py) with tokenization, the checkpoint's chat
template, a streaming detokenizer that never splits a UTF-8 character, and stop
strings (text up to the stop string is returned; the stop string is not, as in
OpenAI's API). chat, generate, eval, red-team and serve all go through `Engine`.

Not here: request scheduling across clients (the server adds that on top).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from weightsmith.errors import GenerationError
from weightsmith.generate import TokenGenerator
from weightsmith.models import CausalLM
from weightsmith.sampling import SamplingParams
from weightsmith.tokenizer import Tokenizer

Prompt = str | list[int]


@dataclass
class Delta:
    """New text for one sequence; the last delta carries `finish_reason`."""

    text: str
    index: int = 0
    finish_reason: str | None = None  # "stop" | "length"
    completion: Completion | None = None  # set on the last delta


@dataclass
class Completion:
    """A finished sequence with its usage and timings."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(self.completion_tokens - 1, 0)  # the first token comes from prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "timings": {
                "prefill_seconds": round(self.prefill_seconds, 4),
                "decode_seconds": round(self.decode_seconds, 4),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            },
        }


class _StopMatcher:
    """Holds back text that could be the start of a stop string; finds complete ones."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            # Cut at the stop that completes first (then the earliest start): that is
            # where token-by-token generation would have stopped, however text was chunked.
            cut = min(hits, key=lambda h: (h[0] + len(h[1]), h[0]))[0]
            out, self.pending = self.pending[:cut], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """One sequence's tokens in, its text out: streaming detokenization (never splitting a
    UTF-8 character) and stop strings (text is held back while it could be the start of
    one; a complete one ends the sequence, and neither it nor what follows is returned)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.matcher = _StopMatcher(stops)
        self.text = ""

    def push(self, token: int | None, finish_reason: str | None = None) -> tuple[str, str | None]:
        """Add a generated token (its row's finish reason, if it is the last); return the new
        text and the finish reason, which becomes "stop" when a stop string was completed."""
        # An end-of-sequence or stop token ends the text without adding its own.
        piece = "" if finish_reason == "stop" or token is None else self.decoder.push(token)
        if finish_reason is not None:
            piece += self.decoder.flush()
        out, hit = self.matcher.feed(piece)
        if hit:
            finish_reason = "stop"
        elif finish_reason is not None:
            out += self.matcher.flush()
        self.text += out
        return out, finish_reason


class Engine:
    """Generates text from a model and its tokenizer."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, compile: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        #: decode through torch.compile with static shapes (weightsmith.compiled)
        self.compile = compile
        eos = set(tokenizer.eos_token_ids)
        cfg_eos = model.config.eos_token_id
        eos.update([cfg_eos] if isinstance(cfg_eos, int) else (cfg_eos or []))
        self.eos_token_ids = frozenset(eos)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise GenerationError("the prompt is empty; give at least one token of text")
        if len(ids) >= self.context_length:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens but the model's context is {self.context_length}; shorten it"
            )
        return ids

    def chat_prompt(self, messages: list[dict], **template_kwargs) -> list[int]:
        """Render `messages` with the checkpoint's chat template and tokenize it."""
        if not self.tokenizer.chat_template:
            raise GenerationError(
                "this checkpoint has no chat template; use `generate` with a plain prompt instead of chat"
            )
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **template_kwargs
        )
        return self.encode_prompt(ids)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Stream one sequence's text deltas; the last carries the finish reason."""
        yield from self.stream_batch([prompt], [params or SamplingParams()])

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Complete several prompts in one batch; results equal running each alone."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        done: list[Completion | None] = [None] * len(prompts)
        for delta in self.stream_batch(list(prompts), params):
            if delta.completion is not None:
                done[delta.index] = delta.completion
        return [c for c in done if c is not None]

    def stream_batch(self, prompts: list[Prompt], params: list[SamplingParams]) -> Iterator[Delta]:
        """Stream deltas for a batch, tagged with the prompt's index."""
        if not prompts or len(prompts) != len(params):
            raise GenerationError(
                f"got {len(prompts)} prompts and {len(params)} sampling settings; give one per prompt"
            )
        ids = [self.encode_prompt(p) for p in prompts]
        params = [
            replace(sp, max_tokens=min(sp.max_tokens, self.context_length - len(p)))
            for p, sp in zip(ids, params, strict=False)
        ]
        gen = TokenGenerator(self.model, ids, params, eos_token_ids=self.eos_token_ids, compile=self.compile)
        streams = [TextStream(self.tokenizer, sp.stop) for sp in params]
        start = time.perf_counter()
        first_at: list[float | None] = [None] * len(ids)
        for events in gen:
            now = time.perf_counter()
            for ev in events:
                row = ev.row
                first_at[row] = first_at[row] or now
                out, reason = streams[row].push(ev.token, ev.finish_reason)
                if reason is not None and ev.finish_reason is None:
                    gen.cancel(row)  # a stop string
                if reason is None:
                    if out:
                        yield Delta(out, row)
                    continue
                n_gen = len(gen.generated[row])
                completion = Completion(
                    streams[row].text, reason, len(ids[row]), n_gen, list(gen.generated[row]),
                    prefill_seconds=(first_at[row] or now) - start, decode_seconds=now - (first_at[row] or now),
                )  # fmt: skip
                yield Delta(out, row, reason, completion)
