"""The arena store's queries: battles as records, battles with their votes, counts per
contestant, and the content hash. Each function takes a connection the caller holds inside
one read transaction (store.py), so a result comes from one snapshot.

Not here: connections, transactions and writes (store.py, store_write.py).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3

from weightsmith.arena.records import Battle, Contestant, Vote
from weightsmith.arena.schema import ArenaError

# Names, not contestant ids; the prompt's category stands in for a battle without its own.
_BATTLES = """
SELECT b.id, ca.name, cb.name, p.messages, b.answer_a, b.answer_b,
       COALESCE(b.category, p.category), b.sampling, b.timings, p.fields, p.source
FROM battles b
JOIN contestants ca ON ca.id = b.contestant_a
JOIN contestants cb ON cb.id = b.contestant_b
LEFT JOIN prompts p ON p.id = b.prompt_id
"""


def canonical_json(value: object) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text (and hashes)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _battle(row: tuple) -> Battle:
    bid, a, b, messages, answer_a, answer_b, category, sampling, timings, fields, source = row
    return Battle(
        id=bid,
        model_a=a,
        model_b=b,
        prompt=json.loads(messages) if messages is not None else None,
        answer_a=answer_a,
        answer_b=answer_b,
        category=category,
        sampling=json.loads(sampling),
        timings=json.loads(timings),
        fields=json.loads(fields) if fields is not None else None,
        prompt_source=source or "",
    )


def unknown_battle(battle_id: str) -> ArenaError:
    return ArenaError(
        "unknown_battle", f"battle {battle_id[:40]!r}: no such battle; vote on one the page showed you"
    )


def get_battle(conn: sqlite3.Connection, battle_id: str) -> Battle:
    row = conn.execute(_BATTLES + "WHERE b.id = ?", (battle_id,)).fetchone()
    if row is None:
        raise unknown_battle(battle_id)
    return _battle(row)


def kind_matches(kind: str, wanted: tuple[str, ...]) -> bool:
    """`kind` is one of `wanted`, or `wanted` names its family ("judge" for `judge:NAME`)."""
    return any(kind == w or kind.startswith(w + ":") for w in wanted)


def battles_with_votes(
    conn: sqlite3.Connection, voter_kinds: tuple[str, ...] | None, include_unvoted: bool
) -> list[tuple[Battle, list[Vote]]]:
    votes: dict[str, list[Vote]] = {}
    for bid, choice, kind, voter, created in conn.execute(
        "SELECT battle_id, choice, voter_kind, voter, created FROM votes ORDER BY battle_id, created, id"
    ):
        if voter_kinds is None or kind_matches(kind, voter_kinds):
            votes.setdefault(bid, []).append(Vote(bid, choice, kind, voter, created))
    out = []
    for row in conn.execute(_BATTLES + "WHERE b.state = 'answered' ORDER BY b.created, b.id"):
        found = votes.get(row[0], [])
        if found or include_unvoted:
            out.append((_battle(row), found))
    return out


def unvoted_battles(conn: sqlite3.Connection, voter: str, limit: int | None) -> list[Battle]:
    rows = conn.execute(
        _BATTLES + "WHERE b.state = 'answered' AND NOT EXISTS "
        "(SELECT 1 FROM votes v WHERE v.battle_id = b.id AND v.voter = ?) ORDER BY b.created, b.id LIMIT ?",
        (voter, -1 if limit is None else limit),
    )
    return [_battle(r) for r in rows]


#: A battle that counts toward pairing: answered, and voted on or still open for votes.
_COUNTS = (
    "state = 'answered' AND (expires IS NULL OR expires > :now"
    " OR EXISTS (SELECT 1 FROM votes v WHERE v.battle_id = battles.id))"
)


def battle_counts(conn: sqlite3.Connection, now: float) -> dict[str, int]:
    rows = conn.execute(
        "SELECT c.name,"
        f" (SELECT COUNT(*) FROM battles WHERE contestant_a = c.id AND {_COUNTS})"
        f" + (SELECT COUNT(*) FROM battles WHERE contestant_b = c.id AND {_COUNTS})"
        " FROM contestants c ORDER BY c.name",
        {"now": now},
    )
    return dict(rows.fetchall())


def battle_tally(conn: sqlite3.Connection, now: float) -> dict[str, int]:
    """Battles by where they stand: voted, open (answered, unvoted, not expired), expired
    (answered or not, unvoted, past their time to live), pending (answers not stored yet)."""
    rows = conn.execute(
        "SELECT CASE"
        " WHEN EXISTS (SELECT 1 FROM votes v WHERE v.battle_id = b.id) THEN 'voted'"
        " WHEN b.expires IS NOT NULL AND b.expires <= :now THEN 'expired'"
        " WHEN b.state = 'answered' THEN 'open'"
        " ELSE 'pending' END AS standing, COUNT(*) FROM battles b GROUP BY standing",
        {"now": now},
    )
    return {"voted": 0, "open": 0, "expired": 0, "pending": 0, **dict(rows.fetchall())}


def list_contestants(conn: sqlite3.Connection) -> list[Contestant]:
    rows = conn.execute("SELECT name, spec, kind FROM contestants ORDER BY id")
    return [Contestant(*r) for r in rows]


def list_prompts(conn: sqlite3.Connection) -> list[tuple[int, str, str | None, str, str | None]]:
    return conn.execute("SELECT id, messages, category, source, fields FROM prompts ORDER BY id").fetchall()


def content_hash(conn: sqlite3.Connection) -> str:
    """SHA-256 over every battle (by id) and every vote (by battle, voter), one canonical JSON
    line each, so equal content gives an equal hash whatever the row order on disk."""
    h = hashlib.sha256(b"weightsmith-arena-content-v1\n")
    battles = conn.execute(
        "SELECT b.id, ca.name, cb.name, p.messages, b.answer_a, b.answer_b, b.category, b.sampling,"
        " b.timings, b.state, b.origin, b.created FROM battles b"
        " JOIN contestants ca ON ca.id = b.contestant_a JOIN contestants cb ON cb.id = b.contestant_b"
        " LEFT JOIN prompts p ON p.id = b.prompt_id ORDER BY b.id"
    )
    for row in battles:
        h.update(("B" + canonical_json(list(row)) + "\n").encode())
    votes = conn.execute(
        "SELECT battle_id, voter, choice, voter_kind, created FROM votes ORDER BY battle_id, voter"
    )
    for row in votes:
        h.update(("V" + canonical_json(list(row)) + "\n").encode())
    return h.hexdigest()
