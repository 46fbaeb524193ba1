"""Speculative decoding with a draft model or by prompt lookup: greedy, batch 1, lossless.

A drafter proposes up to `k` tokens: a small draft model, greedily, one at a time
(`ModelDrafter`), or the text itself (`LookupDrafter`: prompt lookup decoding, Saxena 2023:
the tokens that followed the latest earlier occurrence of the last n tokens, n from `max_n`
down to `min_n`; nothing when the text has no such repeat, and then the step is a plain one
through the caller's decode step). The target model
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
from typing import Protocol

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


def _new_cache(model: CausalLM, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
    dtype = dtype or model.model.embed_tokens.weight.dtype
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


class Drafter(Protocol):
    """What proposes tokens for the target to check."""

    context: int  # the longest sequence it can draft for

    def start(self, prompt: list[int], max_len: int) -> None: ...

    def propose(self, seq: list[int], k: int) -> list[int]: ...

    def keep(self, n: int) -> None:
        """The target kept the first `n` tokens of the sequence; forget what follows."""


class ModelDrafter:
    """A draft model with its own cache; its one-token steps go through `step`."""

    def __init__(self, model: CausalLM, step: DecodeFn = decode_one_token) -> None:
        self.model, self.step = model, step
        self.context = model.config.max_position_embeddings
        self.cache: KVCache | None = None

    def start(self, prompt: list[int], max_len: int) -> None:
        self.cache = _new_cache(self.model, max_len)
        prefill(self.model, self.cache, [prompt], self.model.inv_freq.device)

    def propose(self, seq: list[int], k: int) -> list[int]:
        assert self.cache is not None
        return _propose(self.model, self.cache, seq, k, self.step)

    def keep(self, n: int) -> None:
        assert self.cache is not None
        self.cache.set_length(0, min(self.cache.length(0), n))


@dataclass
class LookupDrafter:
    """Prompt lookup: the `k` tokens that followed the latest earlier occurrence of the
    sequence's last n tokens (n = max_n, then shorter, down to min_n). A short n matches
    often and is often wrong, and a rejected proposal costs a multi-token forward: on a CPU
    that is several of the fused one-token steps, so `generate --prompt-lookup N` matches
    exactly N tokens."""

    max_n: int = 3
    min_n: int = 1
    context: int = 1 << 62

    def start(self, prompt: list[int], max_len: int) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise GenerationError(
                f"prompt lookup needs 1 <= min_n <= max_n, got {self.min_n} and {self.max_n}"
            )

    def propose(self, seq: list[int], k: int) -> list[int]:
        if k == 0:
            return []
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            tail = seq[-n:]
            for i in range(len(seq) - n - 1, -1, -1):  # latest first; the tail itself excluded
                if seq[i : i + n] == tail:
                    return seq[i + n : i + n + k]
        return []

    def keep(self, n: int) -> None:
        pass


def speculative_generate(
    target: CausalLM,
    draft: CausalLM | Drafter,
    prompt: list[int],
    *,
    max_tokens: int,
    k: int = 4,
    eos_token_ids: frozenset[int] | set[int] = frozenset(),
    draft_step: DecodeFn = decode_one_token,
    target_step: DecodeFn = decode_one_token,
    kv_dtype: torch.dtype | None = None,
) -> SpeculativeResult:
    """Greedy-decode up to `max_tokens` tokens of `prompt` with `target`, drafting with
    `draft` (a model, its one-token steps through `draft_step`; or a `Drafter`); stops after
    an `eos_token_ids` token (which is kept as the last token). A step with nothing drafted
    (prompt lookup found no repeat) is a plain one through `target_step`. `kv_dtype`: the
    target's cache dtype (default: its own)."""
    if isinstance(draft, CausalLM):
        check_draft(target, draft)
        draft = ModelDrafter(draft, draft_step)
    max_tokens = _room(target, draft, prompt, max_tokens, k)
    if max_tokens <= 0:
        return SpeculativeResult([], 0, 0, 0)
    eos = frozenset(eos_token_ids)
    # Each step writes at most up to position len(seq) - 1 + (remaining - 1), so
    # prompt + max_tokens entries always suffice.
    t_cache = _new_cache(target, len(prompt) + max_tokens, kv_dtype)
    t_dev = target.inv_freq.device
    first = int(prefill(target, t_cache, [prompt], t_dev)[0].argmax())
    draft.start(prompt, len(prompt) + max_tokens)
    seq = list(prompt) + [first]  # the target's cache holds all of seq but the last token
    result = SpeculativeResult([first], 0, 0, 1, "stop" if first in eos else "length")
    while result.finish_reason != "stop" and len(result.tokens) < max_tokens:
        # Proposing more than the tokens still wanted would be wasted work.
        step = min(k, max_tokens - len(result.tokens) - 1)
        proposals = draft.propose(seq, step)
        if proposals:  # (k+1, V): the target's next token after the last token and after each proposal
            logits = _extend(target, t_cache, [seq[-1], *proposals], all_logits=True)
        else:
            logits = target_step(target, t_cache, [seq[-1]], t_dev)  # (1, V)
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
        draft.keep(len(seq) + n)
        seq += new
        for token in new[: max_tokens - len(result.tokens)]:
            result.tokens.append(token)
            if token in eos:
                result.finish_reason = "stop"
                break
    return result


def _room(target: CausalLM, draft: Drafter, prompt: list[int], max_tokens: int, k: int) -> int:
    """How many tokens can be generated, after checking `k` and the prompt."""
    if k < 1:
        raise GenerationError(f"the draft must propose at least 1 token per step, got k={k}")
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token")
    context = min(target.config.max_position_embeddings, draft.context)
    if len(prompt) >= context:
        raise GenerationError(f"the prompt has {len(prompt)} tokens but the context is {context}; shorten it")
    return min(max_tokens, context - len(prompt))


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
