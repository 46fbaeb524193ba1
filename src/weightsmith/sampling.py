"""Sampling parameters and next-token selection from logits.

Greedy decoding, temperature, top-k, top-p (nucleus), min-p and the repetition
penalty of Keskar et al. 2019 (CTRL), each with the semantics transformers uses so
results are comparable (except that top-p keeps a tie at its boundary whole, where
transformers keeps whichever tied tokens its sort put last: `nucleus_floor`); and OpenAI's presence and frequency penalties, which subtract
from the logits of tokens this sequence has generated (its prompt does not count), and
OpenAI's `logit_bias` (added to the named tokens' logits; -100 bans, 100 all but forces). A
row with a `grammar` (grammar.py: a JSON schema, a tool call) may pick only the tokens its
grammar allows next: the others' logits become -inf after the penalties and the bias, before
any filter, and the grammar consumes the picked token. Each
row samples with its own seeded generator, so a sequence gets the same tokens whether it
runs alone or in a batch. `sample_batch` picks every row's token of a decode step in one
pass over the (B, V) logits, with one device sync (on a GPU, one sync a step rather than
one a row).

Not here: stop strings (text-level, engine.py) or the decode loop (generate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from weightsmith.errors import GenerationError
from weightsmith.grammar import Grammar, mask_logits

#: OpenAI's range for a logit bias.
MAX_LOGIT_BIAS = 100.0

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
    #: token id -> a value in [-100, 100] added to its logit (OpenAI's `logit_bias`)
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: the grammar the output must follow (grammar.py), or None
    grammar: Grammar | None = None

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
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and token >= 0):
                raise GenerationError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise GenerationError(f"logit_bias for token {token} must be in [-100, 100], got {bias!r}")
        if self.grammar is not None and self.ignore_eos:
            raise GenerationError(
                "ignore_eos cannot be combined with a grammar, which ends with the end token"
            )

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
        #: (token ids, biases) for `logit_bias`
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= vocab_size]
            if bad:
                raise GenerationError(
                    f"logit_bias names token {bad[0]}, outside the vocabulary [0, {vocab_size})"
                )
            ids = torch.tensor(list(params.logit_bias), device=device)
            self.bias = (
                ids,
                torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device),
            )
        #: where this row is in its grammar (None: unconstrained)
        self.grammar = params.grammar.state() if params.grammar is not None else None

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: (V,) for one row -> the chosen token id."""
        return sample_batch([self], logits[None])[0]


def sample_batch(samplers: Sequence[Sampler], logits: torch.Tensor) -> list[int]:
    """One token per row from (B, V) logits, row i picked by `samplers[i]`, as tensor ops over
    the whole batch with one device sync (the chosen ids). Each row gets what it would get
    alone: the filters work row by row, and each sampling row draws from its own generator."""
    # No torch call that can be skipped: each costs tens of us a token once a CPU decode step has
    # swept the caches.
    x = logits if logits.dtype == torch.float32 else logits.float()
    device = x.device
    rep = [i for i, s in enumerate(samplers) if s.seen is not None]
    counted = [i for i, s in enumerate(samplers) if s.counts is not None]
    biased = [i for i, s in enumerate(samplers) if s.bias is not None]
    constrained = [i for i, s in enumerate(samplers) if s.grammar is not None]
    if rep or counted or biased or constrained:
        x = x.clone() if x is logits else x  # the caller's logits stay raw (logprobs read them)
    if rep:
        idx = torch.tensor(rep, device=device)
        seen = torch.stack([samplers[i].seen for i in rep])  # type: ignore[misc]
        penalty = _column([samplers[i].params.repetition_penalty for i in rep], device)
        x[idx] = apply_repetition_penalty(x[idx], seen, penalty)
    if counted:
        idx = torch.tensor(counted, device=device)
        counts = torch.stack([samplers[i].counts for i in counted])  # type: ignore[misc]
        presence = _column([samplers[i].params.presence_penalty for i in counted], device)
        frequency = _column([samplers[i].params.frequency_penalty for i in counted], device)
        x[idx] = apply_presence_frequency_penalty(x[idx], counts, presence, frequency)
    for i in biased:
        ids, values = samplers[i].bias  # type: ignore[misc]
        x[i].index_add_(0, ids, values)
    if constrained:
        mask_logits(x, constrained, [samplers[i].grammar for i in constrained])  # type: ignore[misc]
    out = _picks(x, samplers)
    for i in rep:
        samplers[i].seen[out[i]] = True  # type: ignore[index]
    for i in counted:
        samplers[i].counts[out[i]] += 1  # type: ignore[index]
    for i in constrained:
        samplers[i].grammar.consume(out[i])  # type: ignore[union-attr]
    return out


def _picks(x: torch.Tensor, samplers: Sequence[Sampler]) -> list[int]:
    """Each row's token from its final logits: the argmax for a greedy row, a draw from its
    generator for the others; one device sync."""
    drawn = [i for i, s in enumerate(samplers) if not s.params.greedy]
    # On the CPU, numpy's argmax keeps torch's rule (the first maximum; a NaN counts as the
    # maximum) and takes a few microseconds where torch's takes ~80 over a 49K vocabulary.
    on_cpu = x.device.type == "cpu" and x.dtype == torch.float32
    greedy = None
    if len(drawn) < len(samplers):
        greedy = _numpy(x).argmax(-1).tolist() if on_cpu else x.argmax(-1)  # (B,)
    if not drawn:
        return greedy if on_cpu else greedy.tolist()  # type: ignore[union-attr,return-value]
    ps = [samplers[i].params for i in drawn]
    rows = x if len(drawn) == len(samplers) else x[torch.tensor(drawn, device=x.device)]
    picks = _among_top_k(rows, ps, [samplers[i].generator for i in drawn]) if on_cpu else None
    if picks is None:
        probs = probabilities(
            rows,
            [p.temperature for p in ps],
            [p.top_k for p in ps],
            [p.top_p for p in ps],
            [p.min_p for p in ps],
        )
        picks = draw(probs, [samplers[i].generator for i in drawn])
    if greedy is None:
        return _checked(picks.tolist(), x.shape[-1])
    if on_cpu:
        for i, token in zip(drawn, _checked(picks.tolist(), x.shape[-1]), strict=True):
            greedy[i] = token  # type: ignore[index]
        return greedy  # type: ignore[return-value]
    greedy[torch.tensor(drawn, device=x.device)] = picks  # type: ignore[index]
    return _checked(greedy.tolist(), x.shape[-1])  # type: ignore[union-attr]


def _among_top_k(
    rows: torch.Tensor, ps: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor | None:
    """Each row's draw when every row samples among its top k tokens (a CPU's decode step): the
    filters, the softmax and the draw run over candidates alone, in vocabulary order, rather
    than over all V tokens. The same tokens stay as in `probabilities` (a token is kept when its
    logit is at least the k-th largest, so a tie there stays whole: the candidates widen until
    every row's ties end inside them) and the same token is drawn (the cumulative sums over V
    only add zeros between candidates). None, for the full path, when a row has no top-k or a
    tie runs past half the vocabulary."""
    v = rows.shape[-1]
    ks = [p.top_k for p in ps]
    if not all(0 < k < v // 2 for k in ks):
        return None
    at = torch.tensor(ks, device=rows.device)[:, None]
    width = max(ks) + 1
    while True:
        values, ids = torch.topk(rows, width)  # (B, width), largest first
        kept = (values >= values.gather(1, at - 1)).sum(-1)  # each row's k-th logit and its ties
        if bool((kept < width).all()):  # a smaller candidate follows every row's kept tokens
            break
        if width >= v // 2:
            return None
        width = min(width * 4, v // 2)
    ids, order = ids.sort(-1)  # vocabulary order: the draw's cumulative sums are V's
    probs = probabilities(
        values.gather(1, order), [p.temperature for p in ps], ks, [p.top_p for p in ps], [p.min_p for p in ps]
    )
    picks = draw(probs, generators)
    return torch.where(picks < width, ids.gather(1, picks.clamp(max=width - 1)[:, None])[:, 0], v)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token id per row of (B, V) probabilities, row i drawn with `generators[i]`: inverse
    transform sampling, the first token whose cumulative probability (summed in float64) passes
    u times the row's total, for one uniform u a row. The chance of token t is its probability
    to float64 rounding of the sums; a token of probability 0 is never drawn. A row whose total
    is not a positive finite number (NaN logits, or every token excluded) gets the id V (`_checked` refuses it).

    One random number a row: torch.multinomial draws one exponential per vocabulary entry, about
    1 ms a row on a 49K vocabulary, which is most of a batch's sampling time on a CPU."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators])
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: cap the target just below it
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    picks = torch.searchsorted(cdf, target, right=True)[:, 0]
    usable = (total[:, 0] > 0) & total[:, 0].isfinite()
    return torch.where(usable, picks, probs.shape[-1])


def _checked(ids: list[int], vocab: int) -> list[int]:
    if any(t >= vocab for t in ids):
        raise GenerationError(
            "no token can be drawn: the next-token probabilities are not finite (NaN logits: the "
            "weights overflow in this dtype, load them in float32) or every token was excluded"
        )
    return ids


def _numpy(x: torch.Tensor):
    return (x.detach() if x.requires_grad else x).numpy()


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row settings as a (B, 1) fp32 column (the value a Python float becomes in fp32 math)."""
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor
) -> torch.Tensor:
    """Make already-seen tokens less likely: divide positive logits, multiply negative ones."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor,
    counts: torch.Tensor,
    presence: float | torch.Tensor,
    frequency: float | torch.Tensor,
) -> torch.Tensor:
    """OpenAI's penalties: logits - counts * frequency - (counts > 0) * presence, where counts
    (V,) says how often each token was generated so far."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def probabilities(
    logits: torch.Tensor,
    temperature: float | Sequence[float],
    top_k: int | Sequence[int],
    top_p: float | Sequence[float],
    min_p: float | Sequence[float],
) -> torch.Tensor:
    """(V,) or (B, V) logits -> probabilities after temperature and the top-k/top-p/min-p
    filters; with (B, V) logits each setting may be one value per row. A filter is applied
    only to the rows that switch it on (top_k 0, top_p 1 and min_p 0 are off), so a row's
    probabilities do not depend on the other rows."""
    x = logits if logits.dim() == 2 else logits[None]
    b, v = x.shape

    def per_row(value, kind=float) -> list:
        return [kind(value)] * b if isinstance(value, (int, float)) else [kind(t) for t in value]

    temps, ks, ps, mins = per_row(temperature), per_row(top_k, int), per_row(top_p), per_row(min_p)
    # A tiny repetition penalty can push a logit to +inf; cap it so softmax stays finite.
    x = (x / _column(temps, x.device)).clamp(max=torch.finfo(x.dtype).max)
    if any(0 < k < v for k in ks):
        k_max = max(k for k in ks if 0 < k < v)
        kth = torch.topk(x, k_max).values  # (B, k_max), largest first
        on = torch.tensor([0 < k < v for k in ks], device=x.device)[:, None]
        at = torch.tensor([min(max(k, 1), k_max) - 1 for k in ks], device=x.device)[:, None]
        x = torch.where(on & (x < kth.gather(1, at)), float("-inf"), x)
    if any(p < 1.0 for p in ps):
        on = torch.tensor([p < 1.0 for p in ps], device=x.device)[:, None]
        x = torch.where(on & (x < nucleus_floor(x, ps)), float("-inf"), x)
    probs = x.softmax(-1)
    if any(m > 0 for m in mins):
        floor = _column(mins, x.device) * probs.max(-1, keepdim=True).values
        kept = probs.masked_fill(probs < floor, 0.0)
        on = torch.tensor([m > 0 for m in mins], device=x.device)[:, None]
        probs = torch.where(on, kept / kept.sum(-1, keepdim=True), probs)
    return probs if logits.dim() == 2 else probs[0]


#: The most likely tokens `nucleus_floor` looks at first, and the factor it widens by.
NUCLEUS_FIRST, NUCLEUS_WIDEN = 256, 8


def nucleus_floor(x: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """(B, 1): the lowest logit top-p keeps in each row of (B, V) `x`. Top-p drops a token when
    the tokens no more likely than it (itself and its ties included) hold at most 1 - top_p of
    the mass, so the most likely token always stays, and tied tokens stay or go together.

    That is transformers' TopPLogitsWarper (a cumulative sum over the ascending sort, dropping
    where it is at most 1 - top_p), except at a tie on the boundary, which transformers splits
    by the order of its unstable sort. Sorting all V logits is most of the cost of sampling a
    step (about 2 ms a row for 49K tokens on two cores), so this looks at the `NUCLEUS_FIRST`
    most likely tokens first and widens only where the mass outside them is more than 1 -
    top_p (a flat distribution or top_p near 1): everything outside is dropped then, and the
    mass below each candidate is that outside plus the candidates below it, summed in float64."""
    b, v = x.shape
    probs = x.softmax(-1)
    drop_mass = 1 - torch.tensor(top_p, dtype=torch.float64, device=x.device)[:, None]
    total = probs.sum(-1, dtype=torch.float64)[:, None]
    # (on a GPU, sorting all V costs little and a check would cost a device sync)
    k = min(NUCLEUS_FIRST, v) if x.device.type == "cpu" else v
    while True:
        top, at = torch.topk(x, k)  # (B, k), most likely first
        mass = probs.gather(1, at).double()
        outside = (total - mass.sum(-1, keepdim=True)).clamp(min=0)
        if k == v or bool(((outside <= drop_mass) | (drop_mass <= 0)).all()):  # top_p 1: not asked
            break
        k = min(k * NUCLEUS_WIDEN, v)
    below = outside + mass.flip(-1).cumsum(-1)  # mass at or below each candidate, least likely first
    # the least likely candidate kept is the first whose mass at or below it passes 1 - top_p
    first = (below <= drop_mass).sum(-1, keepdim=True).clamp(max=k - 1)
    return top.flip(-1).gather(1, first)
