"""What an arena keeps: contestants, battles and votes, as plain records.

A battle is one prompt answered by two contestants (A on the left, B on the right as the
voter saw them); a vote is one voter's verdict on one battle. The store (SQLite), the
ratings, the imported battle logs and the exported preference pairs all speak these
records, so each part can be built and tested alone.

Not here: storage (store.py), ratings (ratings.py), file formats (battles.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: A vote's verdict: A better, B better, a tie, or both bad (a tie that says neither is good).
CHOICES = ("a", "b", "tie", "both_bad")
#: Who voted: a person through the page, or a judge (`judge:NAME`), or an imported log.
HUMAN = "human"
#: The voter kind of a vote read from a battle log collected elsewhere (battles.py).
IMPORTED = "import"
#: A voter-kind filter that matches every judge (`judge:NAME`), whatever its name.
ANY_JUDGE = "judge"


def judge_voter(name: str) -> str:
    """The voter kind recorded for an LLM judge called `name`."""
    return f"judge:{name}"


def voter_matches(kind: str, wanted: str) -> bool:
    """Whether voter kind `kind` is one a filter `wanted` asks for: the same kind, or any
    judge for ``"judge"`` (`ANY_JUDGE`)."""
    return kind == wanted or (wanted == ANY_JUDGE and kind.startswith(ANY_JUDGE + ":"))


@dataclass(frozen=True)
class Contestant:
    """One model in the arena: a store or catalog model, a fork (`model:adapter`) or an
    OpenAI-compatible endpoint (`URL#model`); `name` is how ratings and exports call it."""

    name: str
    spec: str  # what the command line said
    kind: str  # "local" | "fork" | "endpoint"


@dataclass(frozen=True)
class Prompt:
    """A prompt battles are fought over: chat messages, an optional category and where it
    came from (`file:line`, "typed", or an import's origin). `id` is the store's. `fields`
    are its prompt line's other keys (reference answers and the like, for reward judges)."""

    messages: list[dict]
    category: str | None = None
    source: str = ""
    id: int | None = None
    fields: dict | None = None


@dataclass
class Battle:
    """Two answers to one prompt. `id` is the store's (or the log's) battle id."""

    id: str
    model_a: str
    model_b: str
    prompt: list[dict] | None = None  # chat messages; None in logs that carry no text
    answer_a: str | None = None
    answer_b: str | None = None
    category: str | None = None
    sampling: dict = field(default_factory=dict)  # the settings and seeds both answers used
    timings: dict = field(default_factory=dict)  # seconds to first token / total, per side
    fields: dict | None = None  # the prompt's reference fields (Prompt.fields)
    prompt_source: str = ""  # where the prompt came from (Prompt.source)


@dataclass
class Vote:
    """One voter's verdict on one battle."""

    battle_id: str
    choice: str  # one of CHOICES
    voter_kind: str  # HUMAN, judge_voter(NAME), or IMPORTED
    voter: str = ""  # a salted hash of the voter's token (never the token)
    created: float = 0.0  # Unix time

    def __post_init__(self) -> None:
        if self.choice not in CHOICES:
            raise ValueError(f"a vote's choice is one of {', '.join(CHOICES)}, not {self.choice!r}")


@dataclass
class Outcome:
    """What ratings need from a battle and its vote: who met whom and who won (1 for A, 0 for
    B, 0.5 for a tie or both bad), and the battle's category."""

    model_a: str
    model_b: str
    score_a: float
    category: str | None = None
    voter_kind: str = HUMAN

    @classmethod
    def of(cls, battle: Battle, vote: Vote) -> Outcome:
        score = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}[vote.choice]
        return cls(battle.model_a, battle.model_b, score, battle.category, vote.voter_kind)
