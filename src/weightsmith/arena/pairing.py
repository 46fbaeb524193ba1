"""Which two contestants meet next: the pair that teaches the ratings the most.

Chatbot Arena samples pairs so that votes go where the ratings are least certain: models
with few battles first, and, among those, opponents of similar strength (a battle between
a strong and a weak model mostly confirms what is known). `choose_pair` does that
deterministically given its random source: the contestant with the fewest battles meets,
among the others with the fewest battles, the one whose rating is closest; ties are broken
at random, and which side (A left, B right) each gets is random too, so a voter cannot
learn a model's place.

Not here: the counts and ratings themselves (the store, ratings.py).
"""

from __future__ import annotations

import random

from weightsmith.errors import ConfigError


def choose_pair(
    counts: dict[str, int], ratings: dict[str, float] | None, rng: random.Random
) -> tuple[str, str]:
    """Two different contestants (A, B) from `counts` (battles per contestant).

    The first is one with the fewest battles; its opponent is one of the others with the
    fewest battles, and among those the closest in `ratings` (a contestant without a rating
    counts as close: it is new and worth measuring). Equal candidates are chosen by `rng`,
    and so is the order of the pair."""
    names = sorted(counts)  # a fixed order, so one seed gives one sequence of pairs
    if len(names) < 2:
        raise ConfigError(
            f"the arena needs at least two contestants to pair, got {len(names)} ({', '.join(names) or 'none'})"
        )
    ratings = ratings or {}
    fewest = min(counts[n] for n in names)
    first = rng.choice([n for n in names if counts[n] == fewest])
    others = [n for n in names if n != first]
    fewest_other = min(counts[n] for n in others)
    equal = [n for n in others if counts[n] == fewest_other]
    gaps = {n: _gap(ratings, first, n) for n in equal}
    closest = min(gaps.values())
    second = rng.choice([n for n in equal if gaps[n] == closest])
    return (first, second) if rng.random() < 0.5 else (second, first)


def _gap(ratings: dict[str, float], a: str, b: str) -> float:
    """How far apart two ratings are; 0 when either is unknown."""
    if a not in ratings or b not in ratings:
        return 0.0
    return abs(ratings[a] - ratings[b])


__all__ = ["choose_pair"]
