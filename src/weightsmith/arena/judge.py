"""`arena judge`'s work: an LLM judge votes on battles, and new battles are fought for it.

The judge first votes on answered battles it has not voted on yet (oldest first). When asked
for more battles than those, it has new ones fought: a pair chosen as the page chooses one
(`choose_pair` on the store's battle counts and the current ratings), a prompt from the
store's (and `--prompts`), both answers generated with the battle's sampling settings and a
seed per side, recorded, then judged. The verdicts come from a `Decide` function: an LLM
judge's (`llm_decider`: each pair judged in both orders by `weightsmith.eval.judge_pairwise`,
agreement is the vote, disagreement a tie) or a reward judge's (reward_judge.py: each answer
scored alone). Every battle and vote is committed as it goes, so an interrupted run keeps
its work and the next run carries on (the judge never votes twice on a battle: its voter
token is its voter kind).

Not here: the judge's prompt and verdict parsing (eval/judge_pairwise.py), scoring answers
(reward_judge.py), loading the judge (the command), contestants (contestants.py).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from weightsmith.arena.contestants import Contestants
from weightsmith.arena.pairing import choose_pair
from weightsmith.arena.records import Battle, Outcome, Prompt
from weightsmith.arena.reward_judge import Decision
from weightsmith.arena.store import ArenaStore
from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.eval.judge import JudgeBackend, JudgeConfig
from weightsmith.eval.judge_pairwise import judge_both_orders
from weightsmith.sampling import SamplingParams

#: Battles judged per backend call (both orders: twice as many judge prompts).
CHUNK = 4
#: New battles fought between two refreshes of the ratings that pair contestants.
REFRESH = 10

Tick = Callable[[int, int], None]
#: Verdicts for a list of answered battles, one each, in order.
Decide = Callable[[list[Battle]], list[Decision]]


@dataclass
class JudgeTally:
    """What a judge run did; `to_dict()` is the command's result."""

    voter: str
    judged: int = 0  # battles given a vote
    created: int = 0  # new battles fought
    choices: Counter = field(default_factory=Counter)
    disagreements: int = 0  # ties because the two orders disagreed
    unparsable: int = 0  # battles left unvoted: a reply had no verdict
    unscored: int = 0  # battles left unvoted: no reward scored both answers
    skipped: int = 0  # battles without a prompt or answers (imported logs)
    unreferenced: int = 0  # battles whose prompt has no field the rewards read
    scores: dict[str, list[float]] = field(default_factory=dict)  # a reward judge's, per contestant

    def to_dict(self) -> dict[str, Any]:
        return {
            "voter": self.voter,
            "judged": self.judged,
            "created": self.created,
            "choices": dict(self.choices),
            "disagreements": self.disagreements,
            "unparsable": self.unparsable,
            "unscored": self.unscored,
            "skipped": self.skipped,
            "unreferenced": self.unreferenced,
            "scores": {
                name: {"mean": sum(v) / len(v), "n": len(v)} for name, v in sorted(self.scores.items())
            },
        }


@dataclass
class Fight:
    """How new battles are fought: who, over which prompts, with which settings."""

    contestants: Contestants
    prompts: list[Prompt]  # stored prompts (with ids)
    params: SamplingParams
    rng: random.Random


def llm_decider(cfg: JudgeConfig, backend: JudgeBackend) -> Decide:
    """An LLM judge's verdicts: each battle judged in both orders, a tie where they disagree."""

    def decide(battles: list[Battle]) -> list[Decision]:
        asked = [(b.prompt, b.answer_a, b.answer_b) for b in battles]
        verdicts = judge_both_orders(cfg, backend, asked)  # type: ignore[arg-type]
        return [Decision(v.choice, v.forward != v.backward) for v in verdicts]

    return decide


def judge_battles(
    store: ArenaStore,
    decide: Decide,
    *,
    voter: str,
    limit: int | None,
    fight: Fight | None = None,
    progress: Tick | None = None,
    usable: Callable[[Battle], bool] | None = None,
) -> JudgeTally:
    """Vote as `voter` (`judge:NAME`) on up to `limit` battles (None: every unvoted one),
    fighting new ones with `fight` once the unvoted ones run out. `usable` (a reward judge's)
    passes over battles whose prompt it cannot score."""
    tally = JudgeTally(voter)
    # A reward judge passes over battles it cannot score, so it reads them all and keeps `limit`.
    unvoted = store.unvoted_battles(voter, limit=None if usable else limit)
    pending = [b for b in unvoted if _judgeable(b, tally, usable)][:limit]
    total = limit if limit is not None and fight is not None else len(pending)
    done = 0
    for start in range(0, len(pending), CHUNK):
        chunk = pending[start : start + CHUNK]
        _vote(store, decide, voter, chunk, tally)
        done += len(chunk)
        if progress:
            progress(done, total)
    if fight is None or limit is None:
        return tally
    ratings: dict[str, float] | None = None
    while done < limit:
        if tally.created % REFRESH == 0:
            ratings = current_ratings(store, fight.contestants.names)
        battle = fight_battle(store, fight, ratings)
        tally.created += 1
        _vote(store, decide, voter, [battle], tally)
        done += 1
        if progress:
            progress(done, total)
    return tally


def _judgeable(battle: Battle, tally: JudgeTally, usable: Callable[[Battle], bool] | None) -> bool:
    ok = bool(battle.prompt) and battle.answer_a is not None and battle.answer_b is not None
    tally.skipped += not ok
    if ok and usable is not None and not usable(battle):
        tally.unreferenced += 1
        return False
    return ok


def _vote(store: ArenaStore, decide: Decide, voter: str, battles: list[Battle], tally: JudgeTally) -> None:
    """Decide `battles` and commit a vote for each verdict."""
    for battle, verdict in zip(battles, decide(battles), strict=True):
        if verdict.scores is not None:
            tally.scores.setdefault(battle.model_a, []).append(verdict.scores[0])
            tally.scores.setdefault(battle.model_b, []).append(verdict.scores[1])
        if verdict.choice is None:
            tally.unscored += verdict.unscored
            tally.unparsable += not verdict.unscored
            continue
        store.record_vote(battle.id, verdict.choice, voter, voter)
        tally.judged += 1
        tally.choices[verdict.choice] += 1
        tally.disagreements += verdict.disagreed


def current_ratings(store: ArenaStore, names: list[str]) -> dict[str, float] | None:
    """Bradley–Terry strengths of `names` from every vote so far; None until they are finite."""
    from weightsmith.arena.ratings import bradley_terry

    wanted = set(names)
    outcomes = [
        Outcome.of(battle, vote)
        for battle, votes in store.battles_with_votes()
        for vote in votes
        if {battle.model_a, battle.model_b} <= wanted
    ]
    try:
        return bradley_terry(outcomes) if outcomes else None
    except WeightsmithError:  # not connected yet, or a model that won every battle
        return None


def fight_battle(store: ArenaStore, fight: Fight, ratings: dict[str, float] | None) -> Battle:
    """Fight one new battle and record it with both answers (answered, not yet voted)."""
    if not fight.prompts:
        raise ConfigError("no prompts to fight new battles over; pass --prompts FILE")
    stored = store.battle_counts()
    counts = {name: stored.get(name, 0) for name in fight.contestants.names}
    model_a, model_b = choose_pair(counts, ratings, fight.rng)
    prompt = fight.rng.choice(fight.prompts)
    seeds = {"seed_a": fight.rng.randrange(2**31), "seed_b": fight.rng.randrange(2**31)}
    p = fight.params
    sampling = {
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "repetition_penalty": p.repetition_penalty,
        **seeds,
    }
    battle = store.create_battle(model_a, model_b, prompt.id, category=prompt.category, sampling=sampling)
    answer_a, time_a = fight.contestants.answer(model_a, prompt.messages, replace(p, seed=seeds["seed_a"]))
    answer_b, time_b = fight.contestants.answer(model_b, prompt.messages, replace(p, seed=seeds["seed_b"]))
    store.record_answers(battle.id, answer_a, answer_b, timings={"a": time_a, "b": time_b})
    return replace(battle, answer_a=answer_a, answer_b=answer_b, prompt=prompt.messages)


__all__ = ["Decide", "Fight", "JudgeTally", "current_ratings", "fight_battle", "judge_battles", "llm_decider"]
