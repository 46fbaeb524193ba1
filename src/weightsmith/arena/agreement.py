"""How often two kinds of voter (people and LLM judges) agree on the same battles: Cohen's kappa.

Each battle both kinds voted on gives one pair of verdicts in three categories: A better, B
better, or a tie (both-bad counts as a tie: neither answer was preferred). Where several voters
of one kind voted on a battle, that kind's verdict is their majority; an even split is a tie.

    κ = (p_o − p_e) / (1 − p_e)      (Cohen 1960)

p_o is the share of battles with the same verdict, p_e = Σ_k p1_k · p2_k the share expected
by chance from each kind's own verdict shares. κ is undefined when p_e = 1 (both kinds gave
one and the same verdict every time). Its interval is a percentile bootstrap over the shared
battles (the 3×3 table resampled as multinomial counts, seeded), widened where narrower to
Wilson's interval for p_o mapped through κ with p_e held at its estimate: where every
resample gives the same κ (full agreement, or a voter that gave one verdict every time, whose
κ is 0 by construction) the bootstrap alone would collapse to a point such as [1, 1].

Not here: ratings (ratings.py), reading votes (the store).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from weightsmith.arena.records import ANY_JUDGE, HUMAN, Vote, voter_matches
from weightsmith.eval.intervals import wilson

#: The three verdicts agreement counts (both-bad is a tie).
VERDICTS = ("a", "b", "tie")


@dataclass
class Agreement:
    """Cohen's kappa between two voter kinds on the battles both voted on."""

    first: str
    second: str
    battles: int  # shared battles
    observed: float  # p_o: share of battles with the same verdict
    kappa: float | None  # None when undefined (p_e = 1)
    lower: float | None
    upper: float | None
    level: float = 0.95
    confusion: list[list[int]] = field(default_factory=list)  # [first's verdict][second's], VERDICTS order
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self), "verdicts": list(VERDICTS),
            "method": "Cohen's kappa; percentile bootstrap, at least Wilson's interval of p_o through kappa",
        }  # fmt: skip


def verdict(votes: Iterable[Vote]) -> str:
    """The majority verdict (a, b or tie) of some votes on one battle; an even split is a tie."""
    counts = Counter("tie" if v.choice == "both_bad" else v.choice for v in votes)
    top = counts.most_common()
    if len(top) > 1 and top[0][1] == top[1][1]:
        return "tie"
    return top[0][0]


def kappa_of(confusion: np.ndarray) -> np.ndarray:
    """κ of 3×3 tables (…, 3, 3); nan where it is undefined."""
    c = np.asarray(confusion, dtype=float)
    total = c.sum(axis=(-2, -1))
    p_o = np.trace(c, axis1=-2, axis2=-1) / total
    p_e = (c.sum(-1) * c.sum(-2)).sum(-1) / total**2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p_e < 1.0 - 1e-12, (p_o - p_e) / (1.0 - p_e), np.nan)


def cohen_kappa(
    votes: Iterable[Vote],
    first: str = HUMAN,
    second: str = ANY_JUDGE,
    *,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> Agreement | None:
    """Agreement of voter kinds `first` and `second` (``"judge"``: any judge) on shared battles;
    None when no battle has votes of both."""
    by_battle: dict[str, tuple[list[Vote], list[Vote]]] = defaultdict(lambda: ([], []))
    for v in votes:
        if voter_matches(v.voter_kind, first):
            by_battle[v.battle_id][0].append(v)
        elif voter_matches(v.voter_kind, second):
            by_battle[v.battle_id][1].append(v)
    confusion = np.zeros((3, 3), dtype=int)
    for one, two in by_battle.values():
        if one and two:
            confusion[VERDICTS.index(verdict(one)), VERDICTS.index(verdict(two))] += 1
    n = int(confusion.sum())
    if n == 0:
        return None
    kappa = float(kappa_of(confusion))
    rng = np.random.default_rng(seed)
    resampled = rng.multinomial(n, confusion.ravel() / n, size=rounds).reshape(rounds, 3, 3)
    spread = kappa_of(resampled)
    spread = spread[~np.isnan(spread)]
    tail = 100.0 * (1.0 - level) / 2.0
    defined = not np.isnan(kappa)
    low, high = np.percentile(spread, [tail, 100.0 - tail]) if defined and spread.size else (None, None)
    if defined:  # at least the Wilson interval of p_o, through kappa at this p_e
        p_e = float((confusion.sum(1) * confusion.sum(0)).sum()) / n**2
        w_low, w_high = (np.array(wilson(int(np.trace(confusion)), n, level)) - p_e) / (1.0 - p_e)
        low, high = (
            min(w_low, low if low is not None else w_low),
            max(w_high, high if high is not None else w_high),
        )
    note = "" if defined else "both kinds gave one and the same verdict every time: kappa is undefined"
    constant = [
        kind for kind, margin in ((first, confusion.sum(1)), (second, confusion.sum(0))) if max(margin) == n
    ]
    if defined and constant:
        note = (
            f"{constant[0]} gave one verdict on every shared battle: its kappa is 0 whatever the other voted"
        )
    return Agreement(
        first=first,
        second=second,
        battles=n,
        observed=float(np.trace(confusion) / n),
        kappa=kappa if defined else None,
        lower=None if low is None else float(low),
        upper=None if high is None else float(high),
        level=level,
        confusion=confusion.tolist(),
        note=note,
    )
