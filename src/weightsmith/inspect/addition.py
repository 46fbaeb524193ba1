"""Choosing how to *add* the refusal direction so that the model refuses harmless prompts, by
what is measured in the end: generated replies judged as refusals.

The layer and position whose direction ablates refusal best (selection.py) need not be the
ones whose direction, added, induces it; on a small model they are not. So addition is chosen
separately, on the same validation prompts, in two steps:

1. A screen over every candidate (position p, layer l; the differences of means over the fit
   prompts) by a refusal-opening score: the log-probability, summed over tokens, that the
   reply to a harmless validation prompt opens the way the model's own refusals open, with the
   candidate added at l (scale 1, every position). The openings are the first
   `opening_tokens` tokens of the model's plain replies to the harmful *fit* prompts that the
   refusal judge calls refusals (the model's words, not a fixed list); the score of a prompt is
   log sum over the openings of p(opening | prompt), averaged over the first `add_screen_prompts`
   harmless validation prompts. Forward passes only.
2. The `add_candidates` best of the screen are judged by generation: greedy replies of `add_tokens`
   tokens to every harmless validation prompt, with the candidate added at each of `add_scales`
   (smallest first), judged by the refusal judge, and checked for coherence (`valid_text`: at
   least three words, mostly letters, no single word filling half the reply). The choice is
   the smallest scale at which a candidate's refusal rate reaches `add_target` while at least
   `add_min_valid` of its replies are valid text (at that scale, the candidate refusing most);
   when none does, the trial refusing most among the coherent ones, marked as short of the
   target. Scales above the first that reaches the target are not tried.

Not here: the ablation choice (selection.py), the judge (weightsmith.safety, passed in).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from weightsmith.config import opt
from weightsmith.engine import Engine
from weightsmith.inspect.hooks import Edit, HookState, InspectError, hooked
from weightsmith.inspect.selection import packed_logits
from weightsmith.inspect.steering import addition_edits
from weightsmith.models.model import CausalLM
from weightsmith.sampling import SamplingParams


@dataclass(kw_only=True)
class AddOptions:
    """How `inspect direction --select` chooses the addition (flattened into the command's flags)."""

    add_select: bool = opt(
        True, "with --select: also choose an addition (a screen, then generation judged as refusals)"
    )
    add_candidates: int = opt(
        3, "with --select: addition candidates (best screen scores) judged by generation"
    )
    add_scales: list[float] = opt(
        default_factory=lambda: [1.0, 2.0, 4.0, 6.0, 8.0],
        help="with --select: addition scales tried by generation, smallest first",
    )
    add_target: float = opt(
        0.5, "with --select: share of harmless validation prompts addition should make refuse"
    )
    add_tokens: int = opt(24, "with --select: tokens generated per reply when judging addition")
    add_screen_prompts: int = opt(8, "with --select: harmless validation prompts in the addition screen")
    add_min_valid: float = opt(0.8, "with --select: share of an addition's replies that must be valid text")
    opening_tokens: int = opt(3, "with --select: tokens of each train refusal kept as a refusal opening")

    def __post_init__(self) -> None:
        for name in ("add_candidates", "add_tokens", "add_screen_prompts", "opening_tokens"):
            if getattr(self, name) < 1:
                raise InspectError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not self.add_scales or any(s <= 0 for s in self.add_scales):
            raise InspectError(f"--add-scales {self.add_scales}: give positive scales, e.g. 1,2,4,8")
        if not 0.0 < self.add_target <= 1.0:
            raise InspectError(f"--add-target is a share in (0, 1], got {self.add_target}")
        if not 0.0 <= self.add_min_valid <= 1.0:
            raise InspectError(f"--add-min-valid is a share in [0, 1], got {self.add_min_valid}")


class NoRefusals(InspectError):
    """The model refuses none of the harmful fit prompts: there is no refusal to add."""


@dataclass
class Trial:
    """One generation trial: a candidate added at a scale, judged on the harmless validation prompts."""

    layer: int
    position: int
    scale: float
    refused: int
    valid: int
    n: int
    sample: str


_WORD = re.compile(r"[A-Za-z']+")


def valid_text(text: str) -> bool:
    """At least three words, at least 70% of the non-space characters letters or punctuation
    ordinary in prose, and no single word making up half of the words (degenerate repetition)."""
    words = [w.lower() for w in _WORD.findall(text)]
    chars = [c for c in text if not c.isspace()]
    if len(words) < 3 or not chars:
        return False
    ordinary = sum(c.isalpha() or c in ".,;:!?'\"-()" for c in chars) / len(chars)
    return ordinary >= 0.7 and Counter(words).most_common(1)[0][1] < len(words) / 2


def generate(
    engine: Engine, rows: Sequence[Sequence[int]], tokens: int, edits: dict[str, list[Edit]] | None = None
) -> list[str]:
    """Greedy replies of at most `tokens` tokens to every row, batched, with `edits` applied."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    with hooked(engine.model, HookState(edits or {})):
        return [c.text for c in engine.generate([list(r) for r in rows], params)]


def refusal_openings(
    engine: Engine, rows: Sequence[Sequence[int]], judge: Callable[[str], bool], opts: AddOptions
) -> list[list[int]]:
    """The first `opening_tokens` tokens of each plain reply to `rows` that `judge` calls a
    refusal, deduplicated; none -> one line."""
    params = SamplingParams(temperature=0.0, max_tokens=max(opts.add_tokens, opts.opening_tokens))
    with hooked(engine.model, HookState({})):
        done = engine.generate([list(r) for r in rows], params)
    openings: list[list[int]] = []
    for c in done:
        head = list(c.token_ids[: opts.opening_tokens])
        if judge(c.text) and head and head not in openings:
            openings.append(head)
    if not openings:
        raise NoRefusals(
            f"the model refuses none of the {len(rows)} harmful fit prompts, so there is no refusal to add; "
            "give more harmful prompts or a model that refuses some"
        )
    return openings


def opening_score(
    model: CausalLM,
    rows: Sequence[Sequence[int]],
    openings: Sequence[Sequence[int]],
    edits: dict[str, list[Edit]] | None = None,
) -> float:
    """Mean over `rows` of log sum over `openings` of p(opening | row) (teacher forced)."""
    seqs = [list(r) + list(o) for r in rows for o in openings]
    at = [list(range(len(r) - 1, len(r) - 1 + len(o))) for r in rows for o in openings]
    targets = [list(o) for _ in rows for o in openings]
    logits = packed_logits(model, seqs, at, edits)
    per = torch.stack(
        [
            torch.log_softmax(x, -1)[torch.arange(len(o)), torch.tensor(o)].sum()
            for x, o in zip(logits, targets, strict=True)
        ]
    )
    return float(torch.logsumexp(per.view(len(rows), len(openings)), dim=1).mean())


def _screen(
    model: CausalLM,
    vectors: torch.Tensor,
    candidates: Sequence[tuple[int, int]],
    rows: Sequence[Sequence[int]],
    openings: Sequence[Sequence[int]],
    progress: Callable | None,
) -> list[dict]:
    """Every candidate (position index, layer) with its opening score at scale 1, best first."""
    n_layers = len(model.model.layers)
    out = []
    for k, (j, layer) in enumerate(candidates):
        edits = addition_edits(vectors[j, layer], layer, 1.0, n_layers)
        out.append({"j": j, "layer": layer, "score": opening_score(model, rows, openings, edits)})
        if progress is not None:
            progress(k + 1, len(candidates))
    return sorted(out, key=lambda c: -c["score"])


def _trials(
    engine: Engine,
    vectors: torch.Tensor,
    best: Sequence[dict],
    positions: Sequence[int],
    rows: Sequence[Sequence[int]],
    judge: Callable[[str], bool],
    opts: AddOptions,
    progress: Callable | None,
) -> list[Trial]:
    """Generation trials, smallest scale first, stopping after the first scale that reaches the target."""
    n_layers = len(engine.model.model.layers)
    trials: list[Trial] = []
    total = len(best) * len(opts.add_scales)
    for scale in sorted(opts.add_scales):
        for c in best:
            edits = addition_edits(vectors[c["j"], c["layer"]], c["layer"], scale, n_layers)
            texts = generate(engine, rows, opts.add_tokens, edits)
            refused = [judge(t) for t in texts]
            sample = next((t for t, r in zip(texts, refused, strict=True) if r), texts[0])
            trials.append(
                Trial(
                    c["layer"],
                    positions[c["j"]],
                    scale,
                    sum(refused),
                    sum(map(valid_text, texts)),
                    len(texts),
                    sample,
                )
            )
            if progress is not None:
                progress(len(trials), total)
        if any(_passes(t, opts) for t in trials):
            break
    if progress is not None and len(trials) < total:
        progress(total, total)  # the larger scales are not needed
    return trials


def _passes(t: Trial, opts: AddOptions) -> bool:
    return t.refused >= opts.add_target * t.n and t.valid >= opts.add_min_valid * t.n


def choose(trials: Sequence[Trial], opts: AddOptions) -> tuple[Trial, bool]:
    """(the chosen trial, whether it reaches the target): the smallest scale at which one
    passes (the most refusing there); else the most refusing coherent one (smallest scale)."""
    passing = [t for t in trials if _passes(t, opts)]
    if passing:
        return max(passing, key=lambda t: (-t.scale, t.refused)), True
    coherent = [t for t in trials if t.valid >= opts.add_min_valid * t.n] or list(trials)
    return max(coherent, key=lambda t: (t.refused, -t.scale)), False


def select_addition(
    engine: Engine,
    vectors: torch.Tensor,
    positions: Sequence[int],
    layers: Sequence[int],
    rows: dict[str, list[list[int]]],
    judge: Callable[[str], bool],
    opts: AddOptions,
    progress: Callable | None = None,
    trial_progress: Callable | None = None,
) -> dict:
    """The addition (layer, position, scale) chosen as the module doc says, and its report.
    `vectors` (P, L+1, h) are the candidates at `positions`; `rows` holds token rows for
    "harmful_fit" (the openings) and "harmless_val" (screen and trials). `progress(done,
    total)` is told as the screen goes, `trial_progress` as the generation trials do."""
    openings = refusal_openings(engine, rows["harmful_fit"], judge, opts)
    screen_rows = rows["harmless_val"][: opts.add_screen_prompts]
    candidates = [
        (j, layer) for j in range(len(positions)) for layer in layers if float(vectors[j, layer].norm()) > 0
    ]
    screen = _screen(engine.model, vectors, candidates, screen_rows, openings, progress)
    plain = opening_score(engine.model, screen_rows, openings)
    trials = _trials(
        engine, vectors, screen[: opts.add_candidates], positions, rows["harmless_val"], judge, opts,
        trial_progress,
    )  # fmt: skip
    plain_texts = generate(engine, rows["harmless_val"], opts.add_tokens)
    chosen, reached = choose(trials, opts)
    tokenizer = engine.tokenizer
    return {
        "method": "refusal-opening screen (scale 1), then generation judged by the refusal judge: "
        "smallest scale reaching the target refusal rate with coherent replies",
        "openings": [tokenizer.decode(o) for o in openings],
        "target": opts.add_target, "min_valid": opts.add_min_valid, "tokens": opts.add_tokens, "reached": reached,
        "chosen": {"layer": chosen.layer, "position": chosen.position, "scale": chosen.scale,
                   "refused": chosen.refused, "valid": chosen.valid, "n": chosen.n},
        "plain": {"screen": plain, "refused": sum(map(judge, plain_texts)),
                  "valid": sum(map(valid_text, plain_texts)), "n": len(plain_texts)},
        "screen": [{"layer": c["layer"], "position": positions[c["j"]], "score": c["score"]} for c in screen],
        "trials": [asdict(t) for t in trials],
    }  # fmt: skip
