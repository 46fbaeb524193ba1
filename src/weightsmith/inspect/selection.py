"""Choosing the refusal direction as Arditi et al. (2024) do, by forward passes only.

Candidates: the difference of means (harmful minus harmless) at every layer and at each of a
few post-instruction positions (the chat template's tokens after the user message, counted
from the end: -1 is the last prompt token), over the *fit* prompts. Each candidate is scored
on separate *validation* prompts through a refusal score, the log-odds that the first answer
token is one a refusal starts with (no generation):

    s = log p(R) - log(1 - p(R)),   p(R) = sum over the tokens R of softmax(logits at the last prompt token)

Per candidate (layer l, position p, direction r): `ablate`, the mean score on harmful
validation prompts with r ablated everywhere (lower: the refusal is gone); `add`, the mean
score on harmless ones with r added at layer l (scale 1); `kl`, the mean KL divergence of
the next-token distribution on harmless prompts, plain || ablated. The chosen candidate has
the lowest `ablate` among those with l in the first `max_layer_fraction` of layers (not the
embedding), `add` above the harmless prompts' plain score and `kl` at most `max_kl`.
Candidates are checked in order of `ablate`, so only the best few need the harmless passes;
the table says which were. A steering scale is chosen the same way: the smallest of `SCALES`
at which adding r lifts the harmless prompts' mean score to the harmful ones' plain mean
(when none does, the one that lifts it most).

Prompts are packed several to a row (each attends only to its own tokens), so one forward
covers many prompts. Not here: the direction file (directions.py), the edits (steering.py),
choosing the addition (addition.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from weightsmith.config import opt
from weightsmith.inspect.directions import Direction, prompt_ids, separations, stream_names
from weightsmith.inspect.hooks import Edit, HookState, InspectError, hooked
from weightsmith.inspect.steering import ablation_edits, addition_edits
from weightsmith.models.model import CausalLM

#: Steering scales tried, in order, when choosing one (units of the difference of means).
SCALES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: Tokens per packed forward pass.
PACK_TOKENS = 512
_VALIDATION_SALT = "weightsmith-direction-validation-v1"


@dataclass(kw_only=True)
class SelectOptions:
    """How `inspect direction --select` chooses (flattened into the command's flags)."""

    select: bool = opt(
        False, "choose layer and position on validation prompts (Arditi et al. 2024) instead of Cohen's d"
    )
    positions: list[int] = opt(
        default_factory=lambda: [-1, -2, -3, -4, -5],
        help="with --select: prompt positions (from the end) whose directions are candidates",
    )
    refusal_tokens: list[str] = opt(
        default_factory=lambda: ["I"], help="with --select: texts whose first token starts a refusal"
    )
    validation_fraction: float = opt(0.3, "with --select: share of each set kept for validation")
    max_kl: float = opt(0.1, "with --select: most KL on harmless prompts that ablation may cause")
    max_layer_fraction: float = opt(0.8, "with --select: candidates come from this first share of layers")

    def __post_init__(self) -> None:
        for name in ("validation_fraction", "max_layer_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                flag = name.replace("_", "-")
                raise InspectError(f"--{flag} is a share strictly between 0 and 1, got {getattr(self, name)}")
        if self.max_kl <= 0:
            raise InspectError(f"--max-kl must be positive, got {self.max_kl}")
        if not self.positions or any(p >= 0 for p in self.positions):
            raise InspectError(
                f"--positions {self.positions}: give negative positions counted from the prompt's end, e.g. -1,-2"
            )
        if not any(t.strip() for t in self.refusal_tokens):
            raise InspectError("--refusal-tokens is empty; give the words refusals start with, e.g. I,Sorry")


@dataclass
class PromptSets:
    """Harmful and harmless prompts, each split into fit and validation prompts."""

    harmful_fit: list[str]
    harmless_fit: list[str]
    harmful_val: list[str]
    harmless_val: list[str]


@dataclass
class Candidate:
    layer: int
    position: int
    ablate: float
    add: float | None = None
    kl: float | None = None
    verdict: str = "not checked (a better one passed)"


@dataclass
class Selection:
    direction: Direction
    position: int
    scale: float
    report: dict = field(default_factory=dict)
    #: every candidate, (P, L+1, h) at `positions`, the eligible layers and the token rows (by
    #: set name), for choosing the addition separately (addition.py)
    vectors: torch.Tensor | None = None
    positions: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    rows: dict[str, list[list[int]]] = field(default_factory=dict)


def validation_split(prompts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(fit, validation): a prompt is for validation when sha256(salt, prompt) < fraction; stable."""
    fit, val = [], []
    for p in prompts:
        u = int(hashlib.sha256(f"{_VALIDATION_SALT}\0{p}".encode()).hexdigest()[:16], 16) / 2**64
        (val if u < fraction else fit).append(p)
    return fit, val


def refusal_token_ids(tokenizer, texts: Sequence[str]) -> list[int]:
    """The first token of each text (as a reply begins: no leading space), deduplicated."""
    ids: list[int] = []
    for text in texts:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if not encoded:
            raise InspectError(f"--refusal-tokens {text!r} has no tokens; give words like I,Sorry")
        if encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def refusal_score(logits: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """log p(R) - log(1 - p(R)) per row of next-token logits (N, V), R = `tokens` (see module doc)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    log_r = torch.logsumexp(logp[:, list(tokens)], dim=-1).clamp_max(-1e-7)
    return log_r - torch.log(-torch.expm1(log_r))


def _packs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    packs: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if packs[-1] and used + n > budget:
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += n
    return packs


def _forward_packs(
    model: CausalLM, rows: Sequence[Sequence[int]], edits: dict[str, list[Edit]] | None, keep: Sequence[str]
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, HookState]]:
    """Per pack of rows: (the rows' indices, the final hidden states (T, h), where each row
    starts in it, the hook state with `keep`'s values)."""
    device = model.inv_freq.device
    for pack in _packs([len(r) for r in rows], PACK_TOKENS):
        ids = torch.tensor([[t for i in pack for t in rows[i]]], device=device)
        docs = torch.tensor([[d for d, i in enumerate(pack) for _ in rows[i]]], device=device)
        pos = torch.tensor([[j for i in pack for j in range(len(rows[i]))]], device=device)
        starts = torch.tensor([0] + [len(rows[i]) for i in pack]).cumsum(0)
        state = HookState(edits, keep)
        with hooked(model, state):
            hidden = model.hidden_states(ids, positions=pos, documents=docs)
            yield pack, hidden[0], starts, state


@torch.no_grad()
def packed_run(
    model: CausalLM,
    rows: Sequence[Sequence[int]],
    *,
    edits: dict[str, list[Edit]] | None = None,
    keep: Sequence[str] = (),
    positions: Sequence[int] = (-1,),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token logits after each row (N, V) and the values at `keep` at `positions` of each
    row (name -> (N, P, h)), with `edits` applied, several rows to a forward pass."""
    logits, kept = [], {name: [] for name in keep}
    for _, hidden, starts, state in _forward_packs(model, rows, edits, keep):
        ends = starts[1:]  # one past each row's last token
        logits.append(model.logits(hidden[ends - 1]).float().cpu())
        at = ends[:, None] + torch.tensor(list(positions))[None, :]  # (n, P)
        for name in keep:
            kept[name].append(state.cache[name][0, at].float().cpu())
    return torch.cat(logits), {name: torch.cat(v) for name, v in kept.items()}


@torch.no_grad()
def packed_logits(
    model: CausalLM,
    rows: Sequence[Sequence[int]],
    at: Sequence[Sequence[int]],
    edits: dict[str, list[Edit]] | None = None,
) -> list[torch.Tensor]:
    """The logits at positions `at[i]` of each row i ((len(at[i]), V) each), packed as `packed_run`."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    for pack, hidden, starts, _ in _forward_packs(model, rows, edits, ()):
        for k, i in enumerate(pack):
            out[i] = (
                model.logits(hidden[starts[k] + torch.tensor(list(at[i]), dtype=torch.long)]).float().cpu()
            )
    return [x for x in out if x is not None]


def _kl(plain: torch.Tensor, other: torch.Tensor) -> float:
    p, q = torch.log_softmax(plain, -1), torch.log_softmax(other, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


class _Scorer:
    """Validation forward passes for one model, refusal tokens and prompt sets."""

    def __init__(
        self, model: CausalLM, tokens: list[int], harmful: list[list[int]], harmless: list[list[int]]
    ):
        self.model, self.tokens, self.harmful, self.harmless = model, tokens, harmful, harmless
        self.n_layers = len(model.model.layers)
        self.harmful_plain = float(self.score(harmful).mean())
        self.harmless_logits = packed_run(model, harmless)[0]
        self.harmless_plain = float(refusal_score(self.harmless_logits, tokens).mean())

    def score(self, rows: list[list[int]], edits: dict[str, list[Edit]] | None = None) -> torch.Tensor:
        return refusal_score(packed_run(self.model, rows, edits=edits)[0], self.tokens)

    def ablate(self, vector: torch.Tensor) -> float:
        return float(self.score(self.harmful, ablation_edits(vector, self.n_layers)).mean())

    def add(self, vector: torch.Tensor, layer: int, scale: float = 1.0) -> float:
        return float(self.score(self.harmless, addition_edits(vector, layer, scale, self.n_layers)).mean())

    def kl(self, vector: torch.Tensor) -> float:
        ablated = packed_run(self.model, self.harmless, edits=ablation_edits(vector, self.n_layers))[0]
        return _kl(self.harmless_logits, ablated)


def _rows(
    tokenizer, prompts: Sequence[str], chat: bool, positions: Sequence[int], what: str
) -> list[list[int]]:
    if not prompts:
        raise InspectError(
            f"the {what} prompt set is empty; give more prompts or a larger --validation-fraction"
        )
    rows = [prompt_ids(tokenizer, p, chat) for p in prompts]
    shortest = min(len(r) for r in rows)
    if -min(positions) > shortest:
        raise InspectError(
            f"--positions reach {min(positions)} but a {what} prompt has only {shortest} tokens; use fewer positions"
        )
    return rows


def _check(cand: Candidate, scorer: _Scorer, vector: torch.Tensor, opts: SelectOptions) -> bool:
    """Whether `cand` passes the filters; its `kl`, `add` (when the KL passes) and verdict are set."""
    cand.kl = scorer.kl(vector)
    if cand.kl > opts.max_kl:
        cand.verdict = f"ablation KL above {opts.max_kl}"
        return False
    cand.add = scorer.add(vector, cand.layer)
    cand.verdict = (
        "chosen" if cand.add > scorer.harmless_plain else "adding it does not raise the harmless score"
    )
    return cand.verdict == "chosen"


def _fit(model: CausalLM, rows: dict, positions: list[int]) -> dict[str, torch.Tensor]:
    """Each fit prompt's stream at every layer and position: name -> (N, P, L+1, h)."""
    names = stream_names(model)
    out = {}
    for what in ("harmful_fit", "harmless_fit"):
        _, kept = packed_run(model, rows[what], keep=names, positions=positions)
        out[what] = torch.stack([kept[n] for n in names], dim=2)
    return out


def eligible_layers(n_layers: int, opts: SelectOptions) -> list[int]:
    """Candidate layers: the first `max_layer_fraction` of them, not the embedding (layer 0)."""
    return list(range(1, max(2, int(opts.max_layer_fraction * n_layers))))


def _rank(
    scorer: _Scorer,
    vectors: torch.Tensor,
    positions: list[int],
    opts: SelectOptions,
    progress: Callable | None,
) -> list[Candidate]:
    """Every eligible candidate with its ablation score, best (lowest) first."""
    eligible = [
        (i, j)
        for j in range(len(positions))
        for i in eligible_layers(scorer.n_layers, opts)
        if float(vectors[j, i].norm()) > 0
    ]
    table = []
    for k, (layer, j) in enumerate(eligible):
        table.append(Candidate(layer, positions[j], scorer.ablate(vectors[j, layer])))
        if progress is not None:
            progress(k + 1, len(eligible))
    return sorted(table, key=lambda c: c.ablate)


def select_direction(
    model: CausalLM,
    tokenizer,
    sets: PromptSets,
    opts: SelectOptions,
    *,
    chat: bool = True,
    progress: Callable | None = None,
) -> Selection:
    """The candidate directions and the one Arditi et al.'s selection picks (see the module doc)."""
    positions = sorted(set(opts.positions), reverse=True)
    rows = {k: _rows(tokenizer, v, chat, positions, k.replace("_", " ")) for k, v in asdict(sets).items()}
    tokens = refusal_token_ids(tokenizer, opts.refusal_tokens)
    streams = _fit(model, rows, positions)
    vectors = streams["harmful_fit"].mean(0) - streams["harmless_fit"].mean(0)  # (P, L+1, h)
    scorer = _Scorer(model, tokens, rows["harmful_val"], rows["harmless_val"])
    table = _rank(scorer, vectors, positions, opts, progress)
    at = {(c.layer, c.position): vectors[positions.index(c.position), c.layer] for c in table}
    chosen = next((c for c in table if _check(c, scorer, at[c.layer, c.position], opts)), None)
    if chosen is None:
        raise InspectError(
            f"no candidate direction passed the filters (of {len(table)}: adding raises the harmless score, "
            f"ablation KL <= {opts.max_kl}); give more prompts, other --positions or a larger --max-kl"
        )
    j = positions.index(chosen.position)
    scales = {}
    for s in SCALES:  # the smallest scale that makes harmless prompts score like harmful ones
        scales[s] = scorer.add(vectors[j, chosen.layer], chosen.layer, s)
        if scales[s] >= scorer.harmful_plain:
            break
    # none reaches it: the scale that raises the harmless score most
    scale = next((s for s, v in scales.items() if v >= scorer.harmful_plain), max(scales, key=scales.get))
    report = {
        "method": "Arditi et al. 2024: lowest ablated refusal score on harmful validation prompts, "
        "subject to: addition raises the harmless score, ablation KL on harmless prompts <= max_kl, "
        "layer in the first max_layer_fraction of layers",
        "refusal_tokens": [tokenizer.decode([t]) for t in tokens],
        "positions": positions, "max_kl": opts.max_kl, "max_layer_fraction": opts.max_layer_fraction,
        "validation_fraction": opts.validation_fraction, "counts": {k: len(v) for k, v in rows.items()},
        "plain": {"harmful": scorer.harmful_plain, "harmless": scorer.harmless_plain},
        "chosen": {"layer": chosen.layer, "position": chosen.position, "scale": scale},
        "scales": {str(s): v for s, v in scales.items()},
        "candidates": [asdict(c) for c in table],
    }  # fmt: skip
    seps = separations(streams["harmful_fit"][:, j], streams["harmless_fit"][:, j], vectors[j])
    meta = {
        "separation": json.dumps([round(float(s), 4) for s in seps]),
        "position": str(chosen.position),
        "scale": str(scale),
        "selection": json.dumps(report, separators=(",", ":")),
    }
    direction = Direction(vectors[j].clone(), chosen.layer, meta)
    layers = eligible_layers(scorer.n_layers, opts)
    return Selection(direction, chosen.position, scale, report, vectors, positions, layers, rows)
