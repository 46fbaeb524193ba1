"""`arena judge --reward`: votes from scores, not from a judge's reading of both answers.

Each answer of a battle is scored alone by the same reward functions `grpo` trains with:
the built-in verifiable rewards (`answer`, `contains`, `json`, `think`, `refusal`, `leak`),
a user's `PATH.py:FUNCTION`, or `model:DIR`, a reward model trained by `weightsmith reward`.
A reward sees the answer's text and its prompt's row: the prompt line's reference fields
(`answer`, `contains`, `expect`, ...) with `prompt`, the chat messages. The battle's vote
goes to the side whose weighted total is higher by more than the margin; within the margin
it is a tie. An answer's score does not depend on where it stood, so these votes carry no
position bias, and asking in both orders would change nothing.

A reward that gives None for either answer (it does not apply to that row) sits out that
battle; a battle no reward scores stays unvoted. The arena keeps no token counts, so the
`length` reward is refused and a function's `lengths` hold None.

Not here: the judging loop and tally (judge.py), parsing and running rewards (train/rewards.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from weightsmith.arena.records import Battle, Prompt
from weightsmith.errors import ConfigError
from weightsmith.train.rewards import Reward, check_rows, score

#: Rewards the arena cannot compute: they need the answers' token counts.
NEEDS_TOKENS = ("length",)


@dataclass(frozen=True)
class Decision:
    """One battle's verdict: the choice (None: left unvoted), whether the judge's two
    orders disagreed (an LLM judge), each side's weighted score (a reward judge), and
    whether no reward scored both answers (`unscored`, a reward judge's None)."""

    choice: str | None
    disagreed: bool = False
    scores: tuple[float, float] | None = None
    unscored: bool = False


def prompt_row(messages: Sequence[dict] | None, fields: dict | None) -> dict[str, Any]:
    """The row a reward reads for a prompt: its reference fields, and `prompt` (the messages)."""
    return {**(fields or {}), "prompt": list(messages or [])}


@dataclass
class RewardJudge:
    """Scores both answers of each battle with `rewards`; `margin` is the least difference
    of weighted totals that decides a battle."""

    rewards: list[Reward]
    margin: float = 0.0

    def __post_init__(self) -> None:
        for reward in self.rewards:
            if reward.name in NEEDS_TOKENS:
                raise ConfigError(
                    f"--reward {reward.name}: it counts the answers' tokens, which the arena does not keep; "
                    "use another reward"
                )
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ConfigError(f"--margin must be a finite number of at least 0, got {self.margin}")

    @property
    def name(self) -> str:
        """The judge's default voter name: `reward-` and the rewards' names."""
        return "reward-" + "+".join(r.name for r in self.rewards)

    def usable(self, prompt: Prompt | Battle) -> bool:
        """Whether some reward can score answers to `prompt` (it has a field one needs)."""
        needed = [field for r in self.rewards for field in r.needs]  # as check_rows asks of a row
        return not needed or any(field in (prompt.fields or {}) for field in needed)

    def check(self, prompts: Sequence[Prompt | Battle]) -> None:
        """DataError at the first prompt whose reference fields a reward cannot use, named by
        where the prompt came from (`file:line`)."""
        rows, sources = [], []
        for p in prompts:
            battle = isinstance(p, Battle)
            rows.append(prompt_row(p.prompt if battle else p.messages, p.fields))
            where = p.prompt_source if battle else p.source
            sources.append(f"prompt {where}" if where else f"battle {p.id}")
        check_rows(self.rewards, rows, sources)

    def __call__(self, battles: list[Battle]) -> list[Decision]:
        n = len(battles)
        rows = [prompt_row(b.prompt, b.fields) for b in battles]
        texts = [b.answer_a or "" for b in battles] + [b.answer_b or "" for b in battles]
        matrix = score(self.rewards, texts, rows + rows, [None] * (2 * n))  # type: ignore[list-item]
        weights = [r.weight for r in self.rewards]
        return [self._decide(matrix[i].tolist(), matrix[n + i].tolist(), weights) for i in range(n)]

    def _decide(self, a: list[float], b: list[float], weights: list[float]) -> Decision:
        both = [k for k in range(len(weights)) if math.isfinite(a[k]) and math.isfinite(b[k])]
        if not both:
            return Decision(None, unscored=True)
        total_a = sum(weights[k] * a[k] for k in both)
        total_b = sum(weights[k] * b[k] for k in both)
        diff = total_a - total_b
        choice = "tie" if abs(diff) <= self.margin else ("a" if diff > 0 else "b")
        return Decision(choice, scores=(total_a, total_b))


__all__ = ["NEEDS_TOKENS", "Decision", "RewardJudge", "prompt_row"]
