"""What the scheduler hands back for each choice of a request: new text, token ids, log-probs.

Not here: producing them (scheduler.py) or shaping them as API responses (responses.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SequenceEvent", "TokenLogprob", "token_logprob"]


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the top alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SequenceEvent:
    """New output of one choice of a request: text, token ids, and the finish on its last event."""

    index: int
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    completion_tokens: int = 0
    error: str | None = None


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The model's log-probability of `token` from raw (V,) logits, before temperature,
    penalties and filters (as OpenAI reports them), and the `top` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = lp.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(lp[token]), alternatives)
