"""Sampling parameters and next-token selection from logits.

Greedy decoding, temperature, top-k, top-p (nucleus), min-p and the repetition
penalty of Keskar et al. 2019 (CTRL), each with the semantics transformers uses so
results are comparable; and OpenAI's presence and frequency penalties, which subtract
from the logits of tokens this sequence has generated (its prompt does not count). Each
row samples with its own seeded generator, so a sequence gets the same tokens whether it
runs alone or in a batch.

Not here: stop strings (text-level, engine.py) or the decode loop (generate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from weightsmith.errors import GenerationError

#: Temperatures below this decode greedily.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop, for one sequence."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top_k", self.top_k >= 0, "0 (off) or more"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "greater than 0 (1 is off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2] (0 is off)"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2] (0 is off)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise GenerationError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        # Below this, dividing by the temperature overflows fp32 for ordinary logits, and the
        # limit of sampling as temperature -> 0 is the argmax anyway (vLLM draws the same line).
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Picks one token per row from (V,) logits, keeping per-row state (seen tokens, counts, RNG)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, device=device)] = True
        #: How often each token has been generated (not prompted), for presence/frequency penalties.
        self.counts: torch.Tensor | None = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: (V,) for one row -> the chosen token id."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        if self.counts is not None:
            logits = apply_presence_frequency_penalty(
                logits, self.counts, p.presence_penalty, p.frequency_penalty
            )
        if p.greedy:
            token = int(logits.argmax())
        else:
            probs = probabilities(logits, p.temperature, p.top_k, p.top_p, p.min_p)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        return token


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: divide positive logits, multiply negative ones."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logits - counts * frequency - (counts > 0) * presence, where counts
    (V,) says how often each token was generated so far."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def probabilities(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """(V,) logits -> (V,) probabilities after temperature and the top-k/top-p/min-p filters."""
    # A tiny repetition penalty can push a logit to +inf; cap it so softmax stays finite.
    logits = (logits / temperature).clamp(max=torch.finfo(logits.dtype).max)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low-probability tail whose mass is at most 1 - top_p; the top token always stays.
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[-1] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs
