"""One sequence being decoded: its sampler, tokens and text, and the one rule that ends it.

`RowState` is what both token loops keep per batch row, `TokenGenerator` (generate.py)
and the server's scheduler (serve/scheduler.py): the sampler, the tokens generated so
far, the last one (fed at the next decode step), optionally the row's text (a
`TextStream`: streaming detokenization and stop strings) and its finish reason.
`RowState.record` takes a sampled token (the loops sample every row of a step at once,
sampling.sample_batch) and applies `finish_reason` after it, so a row ends the same way
whichever loop runs it:

- "stop": an end-of-sequence token (unless `ignore_eos`), one of `stop_token_ids`, or a
  completed stop string (neither it nor what follows is in the text, as in OpenAI's API);
- "length": `max_tokens` generated, or the row's cache slot full;
- whatever `cancel` says (a client went away, a request failed).

Not here: the model, the KV cache and the loops (generate.py, serve/scheduler.py),
sampling itself (sampling.py), prompts and chat templates (engine.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightsmith.sampling import Sampler, SamplingParams
from weightsmith.tokenizer import Tokenizer


def finish_reason(
    token: int, generated: int, params: SamplingParams, eos: frozenset[int], room: int
) -> str | None:
    """Why a row ends after sampling `token`, its `generated`-th token, when its cache slot can
    take `room` more tokens (the new one not fed yet); None while it goes on."""
    if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
        return "stop"
    if generated >= params.max_tokens or room <= 1:
        return "length"
    return None


class StopMatcher:
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
        self.matcher = StopMatcher(stops)
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


class RowState:
    """One row of a decode batch: sampler, generated tokens, text and finish reason."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        eos: frozenset[int] | set[int],
        vocab: int,
        device: torch.device,
        text: TextStream | None = None,
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.eos = frozenset(eos)
        self.sampler = Sampler(params, prompt, vocab, device)
        #: The row's text; None in a token-only loop.
        self.text = text
        self.generated: list[int] = []
        #: The token the next decode step feeds for this row.
        self.last = prompt[-1]
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, logits: torch.Tensor, room: int) -> tuple[int, str]:
        """Sample the next token from (V,) logits and `record` it. Returns (token, new text)."""
        token = self.sampler(logits)
        return token, self.record(token, room)

    def record(self, token: int, room: int) -> str:
        """Take `token` (sampled by this row's sampler, alone or in a batch: sampling.sample_batch)
        as the next one and apply the finish rule; `room` is how many tokens the row's cache slot
        can still take. Returns the row's new text."""
        self.generated.append(token)
        self.last = token
        reason = finish_reason(token, len(self.generated), self.params, self.eos, room)
        piece = ""
        if self.text is not None:
            piece, reason = self.text.push(token, reason)
        self.finish_reason = reason
        return piece

    def cancel(self, reason: str = "stop") -> None:
        """End the row now (unless it has ended already)."""
        if self.finish_reason is None:
            self.finish_reason = reason
