"""Prompt log-probabilities: what `/v1/completions` returns with `echo` and `logprobs`.

OpenAI's legacy echo layout scores the prompt itself: each prompt token's log-probability given
the tokens before it (the first token has none, so null), the `logprobs` most likely tokens at
each position, and where each token starts in the echoed text (`text_offset`). lm-eval's
`local-completions` model reads it to score loglikelihood tasks over HTTP, and so does
`weightsmith eval --endpoint`.

A prompt is scored alone, in one forward pass over its tokens on the scheduler's thread (the
model's owner; `Scheduler.call`), never batched with other requests, so its numbers do not
depend on what else the server is doing: an eval spread over replicas gets the floats an eval
on one server gets. Log-probabilities come from the raw logits (no temperature or penalties), in
fp32, as `scheduler.token_logprob` reports generated tokens'.

Not here: HTTP, validation and the response layout (app.py, schemas.py, responses.py).
"""

from __future__ import annotations

import contextlib

import torch

from weightsmith.lora import lora_layers, row_adapters
from weightsmith.models import CausalLM
from weightsmith.serve.events import TokenLogprob
from weightsmith.tokenizer import Tokenizer

#: Positions whose logits are materialised at once ((chunk, V) fp32: 100 MB at V = 49,152).
LOGIT_CHUNK = 512


@torch.inference_mode()
def score_prompt(
    model: CausalLM, ids: list[int], top: int, adapter: str | None = None, n_ctx: int | None = None
) -> list[TokenLogprob | None]:
    """For each token of `ids`: its log-probability given the tokens before it and the `top`
    most likely tokens there; None for the first token, which has no context.

    A prompt longer than the context (`n_ctx`) is scored as lm-eval's Hugging Face backend and
    the local eval scorer score it: the last n_ctx + 1 tokens are kept, so the tokens before
    them, and the first kept one, get None (nothing that fits predicts them)."""
    device = model.inv_freq.device
    skip = max(0, len(ids) - (n_ctx + 1)) if n_ctx else 0
    out: list[TokenLogprob | None] = [None] * (skip + 1)
    if len(ids) - skip < 2:
        return out
    inputs = torch.tensor([ids[skip:-1]], device=device)  # (1, T): the last token predicts nothing
    targets = torch.tensor(ids[skip + 1 :], device=device)  # (T,): the token each position predicts
    adapters = row_adapters(model, [adapter]) if lora_layers(model) else contextlib.nullcontext()
    with adapters:
        hidden = model.hidden_states(inputs)[0]  # (T, h)
        for start in range(0, len(targets), LOGIT_CHUNK):
            end = min(start + LOGIT_CHUNK, len(targets))
            lp = torch.log_softmax(model.logits(hidden[start:end]).float(), dim=-1)  # (C, V)
            chunk = targets[start:end]  # (C,)
            chosen = lp.gather(1, chunk[:, None])[:, 0].tolist()
            if top > 0:
                values, idx = lp.topk(top, dim=-1)  # (C, top)
                alternatives = [
                    list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), values.tolist(), strict=True)
                ]
            else:
                alternatives = [[] for _ in chosen]
            out += [
                TokenLogprob(t, lp_t, alt)
                for t, lp_t, alt in zip(chunk.tolist(), chosen, alternatives, strict=True)
            ]
    return out


def text_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Where each token starts in `tokenizer.decode(ids)`: the whole characters `ids[:k]` decode
    to (a token that starts inside a character, a byte-level piece of it, starts where that
    character does). Decoded through a short window, as `StreamDecoder` does, so the cost grows
    with the prompt's length, not its square: `ids[ctx:k]` decode to the text of `ids[ctx:anchor]`
    (`base` characters, ending on a whole character) followed by what `ids[anchor:k]` add."""
    offsets: list[int] = []
    ctx = anchor = at = base = 0  # `at`: characters of ids[:anchor]
    for k in range(len(ids)):
        text = tokenizer.decode(ids[ctx:k]) if k > ctx else ""
        whole = text.rstrip("\ufffd")  # an incomplete last character is not there yet
        offsets.append(at + len(whole) - base)
        if len(whole) == len(text) and k - anchor >= 8:  # a clean boundary: move the window up
            ctx, anchor, at = anchor, k, offsets[-1]
            base = len(tokenizer.decode(ids[ctx:anchor]))
    return offsets


__all__ = ["score_prompt", "text_offsets"]
