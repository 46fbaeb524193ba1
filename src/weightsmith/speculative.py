"""Speculative decoding with a draft model: greedy, batch 1, lossless.

A small draft model proposes `k` tokens greedily, one at a time; the target model
checks all of them in ONE forward over [last token, proposals...] and keeps the
longest prefix that matches its own argmax, then adds its own token at the first
mismatch (or a bonus token when all `k` match). Every emitted token is the
target's argmax given the tokens before it, so the output is the target's plain
greedy decoding (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", greedy case) -- up to floating-point differences between a
multi-token and a one-token forward, which only matter on exact near-ties.
Rejected entries are rolled back by shortening each cache's row length
(`KVCache.set_length`): entries past it are never attended (kv_len is exactly length +
new tokens) and get overwritten. Both models feed several tokens at once through the
one `prefill` (with the row's length as its start); the draft's one-token steps go
through the decode step the caller chose for it (`draft_step`: the CPU's fused C step
from the draft's engine, say).

Not here: sampling (temperature > 0 needs the rejection-sampling rule), batches
of more than one sequence, penalties, stop strings or text (the CLI decodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.errors import GenerationError
from weightsmith.generate import DecodeFn, decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.models import CausalLM


@dataclass
class SpeculativeResult:
    """Generated token ids (an end-of-sequence token, if hit, is the last) and counters."""

    tokens: list[int]
    proposed: int  # draft tokens the target checked
    accepted: int  # of those, how many the target agreed with
    target_forwards: int  # including the prefill
    finish_reason: str = "length"  # "stop" (end-of-sequence token) | "length"

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _new_cache(model: CausalLM, max_len: int) -> KVCache:
    dtype = model.model.embed_tokens.weight.dtype
    return KVCache.for_model(model.config, 1, max_len, dtype=dtype, device=model.inv_freq.device)


def _extend(model: CausalLM, cache: KVCache, tokens: list[int], *, all_logits: bool = False) -> torch.Tensor:
    """Feed `tokens` at the row's next positions; return the last (V,) or all (T, V) logits."""
    # Batch 1 and aligned: kv_len is exactly the row's length + T, so no stale entry
    # past a rolled-back length is ever attended.
    logits = prefill(
        model, cache, [tokens], model.inv_freq.device, start=cache.length(0), every_position=all_logits
    )
    return logits[0]


def check_draft(target: CausalLM, draft: CausalLM) -> None:
    """Refuse a draft whose token ids cannot mean the same as the target's."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise GenerationError(
            f"the draft model's vocabulary has {dv} tokens but the target's has {tv}; "
            "speculative decoding needs a draft with the same tokenizer and vocabulary size"
        )


def speculative_generate(
    target: CausalLM,
    draft: CausalLM,
    prompt: list[int],
    *,
    max_tokens: int,
    k: int = 4,
    eos_token_ids: frozenset[int] | set[int] = frozenset(),
    draft_step: DecodeFn = decode_one_token,
) -> SpeculativeResult:
    """Greedy-decode up to `max_tokens` tokens of `prompt` with `target`, drafting with
    `draft` (its one-token steps through `draft_step`); stops after an `eos_token_ids`
    token (which is kept as the last token)."""
    check_draft(target, draft)
    if k < 1:
        raise GenerationError(f"the draft must propose at least 1 token per step, got k={k}")
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token")
    context = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    if len(prompt) >= context:
        raise GenerationError(f"the prompt has {len(prompt)} tokens but the context is {context}; shorten it")
    max_tokens = min(max_tokens, context - len(prompt))
    if max_tokens <= 0:
        return SpeculativeResult([], 0, 0, 0)
    eos = frozenset(eos_token_ids)
    # Each step writes at most up to position len(seq) - 1 + (remaining - 1), so
    # prompt + max_tokens entries always suffice.
    t_cache, d_cache = (
        _new_cache(target, len(prompt) + max_tokens),
        _new_cache(draft, len(prompt) + max_tokens),
    )
    t_dev = target.inv_freq.device
    first = int(prefill(target, t_cache, [prompt], t_dev)[0].argmax())
    prefill(draft, d_cache, [prompt], draft.inv_freq.device)
    seq = list(prompt) + [first]  # the target's cache holds all of seq but the last token
    result = SpeculativeResult([first], 0, 0, 1, "stop" if first in eos else "length")
    while result.finish_reason != "stop" and len(result.tokens) < max_tokens:
        # Proposing more than the tokens still wanted would be wasted work.
        step = min(k, max_tokens - len(result.tokens) - 1)
        proposals = _propose(draft, d_cache, seq, step, draft_step)
        # (k+1, V) -> the target's next token after the last token and after each proposal.
        logits = _extend(target, t_cache, [seq[-1], *proposals], all_logits=True)
        preds = logits.argmax(-1).tolist()
        n = 0
        while n < len(proposals) and proposals[n] == preds[n]:
            n += 1
        new = proposals[:n] + [preds[n]]
        result.target_forwards += 1
        result.proposed += len(proposals)
        result.accepted += n
        # Roll back: the target keeps seq + accepted proposals; the draft keeps no more.
        t_cache.set_length(0, len(seq) + n)
        d_cache.set_length(0, min(d_cache.length(0), len(seq) + n))
        seq += new
        for token in new[: max_tokens - len(result.tokens)]:
            result.tokens.append(token)
            if token in eos:
                result.finish_reason = "stop"
                break
    return result


@torch.inference_mode()
def _propose(draft: CausalLM, cache: KVCache, seq: list[int], k: int, step: DecodeFn) -> list[int]:
    """Catch the draft up on the tokens of `seq` it has not seen, then draft `k` greedily."""
    if k == 0:
        return []
    token = int(_extend(draft, cache, seq[cache.length(0) :]).argmax())
    proposals = [token]
    for _ in range(k - 1):
        token = int(step(draft, cache, [token], draft.inv_freq.device)[0].argmax())
        proposals.append(token)
    return proposals
