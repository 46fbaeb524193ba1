"""The ratings of an arena DB's votes: one function for `arena ratings` and the UI's leaderboard.

`rate_votes(battles, kinds=..., ...)` turns battles with their votes into `Ratings` (Bradley–Terry
with bootstrap intervals, per category, and the agreement of humans and judges where both
voted), keeping the votes of the voter kinds asked for; `arena ratings` and `weightsmith ui`
both call it, so a leaderboard in the browser shows the numbers the command prints for the same
DB and defaults.

`read_snapshot(path)` reads a DB without writing to it (SQLite's read-only mode: no
migration, no WAL switch, no lock that stops `arena serve` from writing): its answered
battles with their votes, its content hash and its battle tally, all from one read
transaction. The file must be an arena DB (its `application_id`) of a schema this version
reads; older schemas read as they are (their battles and votes have not changed shape).

Not here: the fit and its tables (ratings.py), the store that writes (store.py), pages.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from weightsmith.arena.agreement import cohen_kappa
from weightsmith.arena.ratings import Ratings, rate
from weightsmith.arena.records import ANY_JUDGE, HUMAN, IMPORTED, Battle, Outcome, Vote, voter_matches
from weightsmith.arena.schema import BUSY_TIMEOUT_S, ArenaError, check_file
from weightsmith.arena.store_read import battle_tally, battles_with_votes, content_hash
from weightsmith.arena.store_write import VOTER_KIND
from weightsmith.errors import UsageError

#: `--voters` words -> the voter kinds kept (None: every kind).
VOTERS: dict[str, tuple[str, ...] | None] = {
    "human": (HUMAN,),
    "judge": (ANY_JUDGE,),
    "import": (IMPORTED,),
    "all": None,
}
#: Voter kinds an agreement may compare: the words, or one judge's `judge:NAME`.
KIND_WORDS = (HUMAN, ANY_JUDGE, IMPORTED)


def voter_kinds(word: str, option: str = "--voters") -> tuple[str, ...] | None:
    """The voter kinds `--voters WORD` keeps: a word of VOTERS, or `judge:NAME` for one judge's
    votes alone; UsageError naming the option otherwise."""
    if word in VOTERS:
        return VOTERS[word]
    if word.startswith(ANY_JUDGE + ":") and VOTER_KIND.fullmatch(word):
        return (word,)
    raise UsageError(f"{option} {word!r}: give {', '.join(VOTERS)}, or judge:NAME for one judge's votes")


def agree_kinds(first: str, second: str) -> tuple[str, str]:
    """Two voter kinds whose agreement `--agree` reports (human, judge, import, judge:NAME),
    checked not to overlap (a vote must count for one side only)."""
    for kind in (first, second):
        if kind not in KIND_WORDS and not (kind.startswith(ANY_JUDGE + ":") and VOTER_KIND.fullmatch(kind)):
            raise UsageError(f"--agree {kind!r}: give human, judge, import or judge:NAME")
    if voter_matches(first, second) or voter_matches(second, first):
        raise UsageError(f"--agree {first},{second}: the two overlap; compare two different voters")
    return first, second


#: The schema version that added `battles.expires`, which the tally reads.
_TALLY_SCHEMA = 3


@dataclass
class Snapshot:
    """What a leaderboard reads from one arena DB, at one moment."""

    battles: list[tuple[Battle, list[Vote]]]  # answered battles with at least one vote
    sha256: str  # content_hash: equal hashes, equal battles and votes
    tally: dict[str, int] | None  # voted / open / expired / pending (None: a schema before expiry)


def rate_votes(
    battles: list[tuple[Battle, list[Vote]]],
    *,
    kinds: tuple[str, ...] | None,
    voters: str,
    db: str,
    sha256: str,
    anchor: str | None = None,
    rounds: int = 200,
    seed: int = 0,
    agree: tuple[str, str] = (HUMAN, ANY_JUDGE),
) -> Ratings:
    """Ratings of the votes whose kind is one of `kinds` (None: every vote), with the agreement
    of the two voter kinds `agree` (people and judges) over all votes. `voters` is the word for
    `kinds` (messages and the source record); UsageError when no vote is left to rate."""
    outcomes = [
        Outcome.of(battle, vote)
        for battle, votes in battles
        for vote in votes
        if kinds is None or any(voter_matches(vote.voter_kind, k) for k in kinds)
    ]
    if not outcomes:
        raise UsageError(f"{db}: no {voters} votes to rate yet; try --voters all, or collect votes")
    source = {"db": db, "sha256": sha256, "voters": voters, "votes": len(outcomes)}
    ratings = rate(outcomes, anchor=anchor, rounds=rounds, seed=seed, source=source)
    everyone = [vote for _, votes in battles for vote in votes]
    ratings.agreement = cohen_kappa(everyone, *agree, rounds=rounds, seed=seed)
    return ratings


def read_snapshot(path: Path) -> Snapshot:
    """The DB's voted battles, content hash and tally, read without writing (see the module
    docstring); ArenaError naming the file when it is not an arena DB we can read."""
    path = Path(path)
    if not path.is_file():
        raise ArenaError("bad_db", f"{path}: no such arena DB")
    try:
        conn = sqlite3.connect(
            f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
            isolation_level=None, check_same_thread=False,
        )  # fmt: skip
    except sqlite3.Error as e:
        raise ArenaError("bad_db", f"{path}: cannot open the arena DB read-only ({e})") from None
    try:
        version = check_file(conn, path)
        conn.execute("BEGIN")
        battles = battles_with_votes(conn, None, False)
        sha = content_hash(conn)
        tally = battle_tally(conn, time.time()) if version >= _TALLY_SCHEMA else None
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise ArenaError(
            "bad_db", f"{path}: cannot read the arena DB ({e}); check it with `sqlite3`"
        ) from None
    finally:
        conn.close()
    return Snapshot(battles, sha, tally)


def summary(snapshot: Snapshot) -> dict[str, Any]:
    """Counts for a list of arenas: voted battles, votes, contestants, and the tally."""
    names = {m for battle, _ in snapshot.battles for m in (battle.model_a, battle.model_b)}
    return {"battles": len(snapshot.battles), "votes": sum(len(v) for _, v in snapshot.battles),
            "contestants": len(names), "tally": snapshot.tally}  # fmt: skip


__all__ = ["VOTERS", "Snapshot", "agree_kinds", "rate_votes", "read_snapshot", "summary", "voter_kinds"]
