"""The arena store's writes that check what they write: contestants, prompts, the vote rate
limit, and imported battles. Each function runs inside a write transaction the caller holds
(store.py), so a refusal part-way leaves nothing behind.

Not here: connections and transactions (store.py), queries (store_read.py).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from weightsmith.arena.records import CHOICES, HUMAN, Battle, Contestant, Prompt, Vote
from weightsmith.arena.schema import ArenaError
from weightsmith.arena.store_read import canonical_json, unknown_battle

#: The longest battle id, voter token or contestant name the store accepts.
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 200
#: A backstop for one prompt's messages as JSON; the page sets its own, smaller limit.
MAX_PROMPT_CHARS = 200_000
#: Voter kinds: a person, a judge (`judge:NAME`) or a vote from an imported log.
VOTER_KIND = re.compile(r"human|import|judge:\S{1,100}")
CONTESTANT_KINDS = ("local", "fork", "endpoint", "imported")


@dataclass(frozen=True)
class ImportCounts:
    """What an import added; `*_skipped` were already in the DB (a re-import)."""

    battles_added: int
    battles_skipped: int
    votes_added: int
    votes_skipped: int


@dataclass
class PendingVote:
    """A vote waiting for the next group commit, and then its outcome: the Vote stored, or
    the ArenaError that refused it."""

    battle_id: str
    choice: str
    voter_kind: str
    voter: str  # the salted hash
    max_per_minute: int | None = None
    result: Vote | ArenaError | None = None


def apply_vote(conn: sqlite3.Connection, request: PendingVote, now: float) -> Vote | ArenaError:
    """Check and insert one vote inside the caller's transaction, in a savepoint, and return
    what its voter is to be told: a refused vote (an ArenaError) leaves no row. The caller
    hands it to the voter only once the transaction is committed."""
    conn.execute("SAVEPOINT vote")
    try:
        result: Vote | ArenaError = _insert_vote(conn, request, now)
    except ArenaError as e:
        conn.execute("ROLLBACK TO vote")
        result = e
    conn.execute("RELEASE vote")
    return result


def _insert_vote(conn: sqlite3.Connection, r: PendingVote, now: float) -> Vote:
    row = conn.execute("SELECT state, expires, created FROM battles WHERE id = ?", (r.battle_id,)).fetchone()
    if row is None:
        raise unknown_battle(r.battle_id)
    state, expires, created = row
    if expires is not None and now >= expires and r.voter_kind == HUMAN:
        raise ArenaError(
            "expired",
            f"battle {r.battle_id!r}: voting on it closed {_minutes(expires - created)} after it began; "
            "start a new battle",
        )
    if state != "answered":
        raise ArenaError("not_answered", f"battle {r.battle_id!r}: its answers are not in yet; wait for both")
    if conn.execute(
        "SELECT 1 FROM votes WHERE battle_id = ? AND voter = ?", (r.battle_id, r.voter)
    ).fetchone():
        raise ArenaError("already_voted", f"battle {r.battle_id!r}: you already voted on it")
    if r.max_per_minute is not None:
        check_rate(conn, r.voter, now, r.max_per_minute)
    conn.execute(
        "INSERT INTO votes (battle_id, choice, voter_kind, voter, created) VALUES (?, ?, ?, ?, ?)",
        (r.battle_id, r.choice, r.voter_kind, r.voter, now),
    )
    return Vote(r.battle_id, r.choice, r.voter_kind, r.voter, now)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} minutes"


def check_battle_id(battle_id: object) -> str:
    """A battle id of a plausible shape; anything else is a battle that does not exist."""
    if not isinstance(battle_id, str) or not 0 < len(battle_id) <= MAX_ID_CHARS:
        raise unknown_battle(str(battle_id))
    return battle_id


def check_contestant(c: Contestant) -> None:
    if not isinstance(c.name, str) or not 0 < len(c.name) <= MAX_NAME_CHARS or c.kind not in CONTESTANT_KINDS:
        raise ArenaError(
            "unknown_contestant",
            f"contestant {str(c.name)[:80]!r}: needs a name of 1-{MAX_NAME_CHARS} characters and a kind "
            f"in {', '.join(CONTESTANT_KINDS)}, not {c.kind!r}",
        )


def insert_contestant(conn: sqlite3.Connection, c: Contestant, now: float, path: Path) -> int:
    """The contestant's id, registering it if new; the same name with another spec is refused
    (its ratings would mix two models)."""
    row = conn.execute("SELECT id, spec, kind FROM contestants WHERE name = ?", (c.name,)).fetchone()
    if row is None:
        cur = conn.execute(
            "INSERT INTO contestants (name, spec, kind, created) VALUES (?, ?, ?, ?)",
            (c.name, c.spec, c.kind, now),
        )
        return cur.lastrowid
    if (row[1], row[2]) != (c.spec, c.kind):
        raise ArenaError(
            "contestant_conflict",
            f"{path}: contestant {c.name!r} is {row[1]!r} in this DB, not {c.spec!r}; "
            "give the new one another name or pass another --db",
        )
    return row[0]


def contestant_id(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT id FROM contestants WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ArenaError(
            "unknown_contestant", f"contestant {str(name)[:80]!r}: not in the arena DB; add it first"
        )
    return row[0]


def prompt_json(p: Prompt) -> str:
    """A prompt's messages as canonical JSON, after checking their shape and size."""
    where = f"prompt {p.source}" if p.source else "prompt"
    ok = isinstance(p.messages, list) and len(p.messages) > 0
    ok = ok and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in p.messages
    )
    if not ok:
        raise ArenaError(
            "bad_prompt", f"{where}: messages must be a non-empty list of {{role, content}} strings"
        )
    text = canonical_json(p.messages)
    if len(text) > MAX_PROMPT_CHARS:
        raise ArenaError(
            "prompt_too_large",
            f"{where}: {len(text)} characters, over the {MAX_PROMPT_CHARS} limit; shorten it",
        )
    return text


def fields_json(p: Prompt) -> str | None:
    """A prompt's reference fields as canonical JSON (None without any), size-checked."""
    if not p.fields:
        return None
    text = canonical_json(p.fields)
    if not isinstance(p.fields, dict) or len(text) > MAX_PROMPT_CHARS:
        where = f"prompt {p.source}" if p.source else "prompt"
        raise ArenaError(
            "prompt_too_large",
            f"{where}: its fields must be a JSON object of at most {MAX_PROMPT_CHARS} characters",
        )
    return text


def insert_prompt(conn: sqlite3.Connection, text: str, p: Prompt, now: float) -> int:
    """The id of the prompt whose messages are `text`, storing it if new; the fields of a
    prompt given again with fields replace its stored ones (a corrected reference)."""
    fields = fields_json(p)
    row = conn.execute("SELECT id, fields, source FROM prompts WHERE messages = ?", (text,)).fetchone()
    if row is not None:
        if fields is not None and fields != row[1]:
            conn.execute("UPDATE prompts SET fields = ?, source = ? WHERE id = ?", (fields, p.source, row[0]))
        return row[0]
    cur = conn.execute(
        "INSERT INTO prompts (messages, category, source, created, fields) VALUES (?, ?, ?, ?, ?)",
        (text, p.category, p.source, now, fields),
    )
    return cur.lastrowid


def check_rate(conn: sqlite3.Connection, voter: str, now: float, max_per_minute: int) -> None:
    """Refuse a vote from `voter` if it already cast `max_per_minute` in the last 60 s."""
    recent = conn.execute(
        "SELECT created FROM votes WHERE voter = ? AND created > ? ORDER BY created DESC LIMIT ?",
        (voter, now - 60.0, max(1, max_per_minute)),
    ).fetchall()
    if len(recent) >= max_per_minute:
        # A slot frees when the oldest of the last `max_per_minute` votes turns 60 s old.
        retry = max(0.0, recent[-1][0] + 60.0 - now) if recent else 60.0
        raise ArenaError(
            "rate_limited",
            f"at most {max_per_minute} votes a minute; try again in {retry:.0f} s",
            retry_after=retry,
        )


def import_pairs(
    conn: sqlite3.Connection,
    pairs: Iterable[tuple[Battle, Iterable[Vote]]],
    origin: str,
    hash_voter: Callable[[str], str],
    now: float,
    path: Path,
) -> ImportCounts:
    """Insert imported battles and votes (see ArenaStore.import_battles)."""
    counts = [0, 0, 0, 0]
    for battle, votes in pairs:
        where = f"{origin}: battle {str(battle.id)[:40]!r}"
        if not isinstance(battle.id, str) or not 0 < len(battle.id) <= MAX_ID_CHARS:
            raise ArenaError("bad_import", f"{where}: the id must be 1-{MAX_ID_CHARS} characters")
        if battle.model_a == battle.model_b:
            raise ArenaError(
                "bad_import", f"{where}: a battle needs two contestants, not {battle.model_a!r} twice"
            )
        ids = [
            _imported_contestant(conn, name, now, path, where) for name in (battle.model_a, battle.model_b)
        ]
        if _insert_battle(conn, battle, ids, origin, now, where):
            counts[0] += 1
        else:
            counts[1] += 1
        for vote in votes:
            added = _insert_imported_vote(conn, battle.id, vote, origin, hash_voter, now, where)
            counts[2 if added else 3] += 1
    return ImportCounts(*counts)


def _imported_contestant(conn: sqlite3.Connection, name: object, now: float, path: Path, where: str) -> int:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ArenaError("bad_import", f"{where}: a model name is 1-{MAX_NAME_CHARS} characters")
    row = conn.execute("SELECT id FROM contestants WHERE name = ?", (name,)).fetchone()
    return row[0] if row else insert_contestant(conn, Contestant(name, name, "imported"), now, path)


def _insert_battle(
    conn: sqlite3.Connection, battle: Battle, ids: list[int], origin: str, now: float, where: str
) -> bool:
    """Insert an imported battle; False if the same battle is already there."""
    row = conn.execute("SELECT contestant_a, contestant_b FROM battles WHERE id = ?", (battle.id,)).fetchone()
    if row is not None:
        if list(row) != ids:
            raise ArenaError(
                "bad_import",
                f"{where}: this DB has a battle with that id between other contestants; rename it",
            )
        return False
    prompt_id = None
    if battle.prompt is not None:
        prompt = Prompt(battle.prompt, battle.category, f"{origin} battle {battle.id[:40]}")
        prompt_id = insert_prompt(conn, prompt_json(prompt), prompt, now)
    conn.execute(
        "INSERT INTO battles (id, contestant_a, contestant_b, prompt_id, answer_a, answer_b, category,"
        " sampling, timings, state, origin, created, answered)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'answered', ?, ?, ?)",
        (
            battle.id, *ids, prompt_id, battle.answer_a, battle.answer_b, battle.category,
            canonical_json(battle.sampling or {}), canonical_json(battle.timings or {}), origin, now, now,
        ),
    )  # fmt: skip
    return True


def _insert_imported_vote(
    conn: sqlite3.Connection,
    battle_id: str,
    vote: Vote,
    origin: str,
    hash_voter: Callable[[str], str],
    now: float,
    where: str,
) -> bool:
    """Insert one imported vote; False if its voter already voted on the battle."""
    if vote.battle_id != battle_id:
        raise ArenaError(
            "bad_import", f"{where}: a vote for battle {str(vote.battle_id)[:40]!r} is filed under it"
        )
    if (
        vote.choice not in CHOICES
        or not isinstance(vote.voter_kind, str)
        or not VOTER_KIND.fullmatch(vote.voter_kind)
    ):
        raise ArenaError(
            "bad_import",
            f"{where}: a vote needs a choice in {', '.join(CHOICES)} and a voter kind human, import or "
            f"judge:NAME, not {str(vote.choice)[:20]!r} / {str(vote.voter_kind)[:40]!r}",
        )
    voter = hash_voter(f"import\x00{origin}\x00{vote.voter_kind}\x00{vote.voter}")
    cur = conn.execute(
        "INSERT INTO votes (battle_id, choice, voter_kind, voter, created) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (battle_id, voter) DO NOTHING",
        (battle_id, vote.choice, vote.voter_kind, voter, vote.created or now),
    )
    return cur.rowcount == 1
