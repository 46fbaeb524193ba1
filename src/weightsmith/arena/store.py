"""The arena's store: contestants, prompts, battles and votes in one SQLite file.

Who calls it: the arena page (votes from many threads at once), `arena judge` (judge votes),
`arena ratings|export` (battles with their votes, the DB's content hash), `arena import`
(battles from a shared log, in one transaction).

Writes are serialised through one connection under a lock, each one transaction
(`BEGIN IMMEDIATE` ... `COMMIT`): a call that raises has written nothing, and a call that
returns has committed (a vote is on disk before the page is told it was recorded). Votes
are group-committed: the votes that arrive while one transaction commits wait, then go
into the next one together (each in its own savepoint, so one refused vote costs the
others nothing), so under `synchronous=FULL` many voters share one fsync instead of queueing
for one each. Reads use one connection per thread, so they never wait for a writer (WAL).
The file's settings, schema and migrations are in schema.py.

Voters are never stored: the page gives each voter a random token (`mint_voter_token`, a
cookie) and the store keeps an HMAC-SHA256 of it keyed by a random per-DB salt, so one vote
per battle per voter holds without a table of who voted what. A judge's token is its voter
kind (`judge:NAME`): one verdict per battle per judge.

Not here: the page, the judge, ratings and file formats (page.py, judge.py, ratings.py,
battles.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from weightsmith.arena.records import CHOICES, HUMAN, Battle, Contestant, Prompt, Vote
from weightsmith.arena.schema import ArenaError, connect, open_db
from weightsmith.arena.store_read import (
    battle_counts,
    battle_tally,
    battles_with_votes,
    canonical_json,
    content_hash,
    get_battle,
    list_contestants,
    list_prompts,
    unknown_battle,
    unvoted_battles,
)
from weightsmith.arena.store_write import (
    MAX_ID_CHARS,
    VOTER_KIND,
    ImportCounts,
    PendingVote,
    apply_vote,
    check_battle_id,
    check_contestant,
    contestant_id,
    import_pairs,
    insert_contestant,
    insert_prompt,
    prompt_json,
)


def mint_voter_token() -> str:
    """A new random voter token (the page's cookie): 192 bits, URL-safe."""
    return secrets.token_urlsafe(24)


class ArenaStore:
    """One arena DB. Thread-safe: share one store between a page's worker threads.

    `create=False` refuses a missing file (ratings and export read an existing DB).
    `synchronous` is "full" (each commit fsynced: a vote survives a power cut) or "normal"
    (a vote survives a killed process, not a power cut); see schema.py. `clock` is the
    time source for `created` stamps and the rate limit (tests pass a fake one)."""

    def __init__(
        self,
        path: str | Path,
        *,
        create: bool = True,
        synchronous: str = "full",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ArenaError(
                "bad_db", f"{self.path}: no such arena DB; check --db (votes are collected by `arena serve`)"
            )
        self._synchronous = synchronous
        self._clock = clock
        self._writer = open_db(self.path, synchronous=synchronous)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._pending: list[PendingVote] = []  # votes waiting for the next group commit
        self._batching = threading.Condition()  # guards _pending and _committing
        self._committing = False
        row = self._writer.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()
        self._salt = bytes.fromhex(row[0])

    # -- connections and transactions ------------------------------------------------------

    def close(self) -> None:
        """Close every connection (call once no thread uses the store any more)."""
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()

    def __enter__(self) -> ArenaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._write_lock, _storage_errors(self.path):
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """This thread's reader connection, inside one read transaction (one snapshot)."""
        conn = getattr(self._local, "conn", None)
        with _storage_errors(self.path):
            if conn is None:
                conn = connect(self.path, synchronous=self._synchronous)
                self._local.conn = conn
                with self._readers_lock:
                    self._readers.append(conn)
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    # -- voters --------------------------------------------------------------------------

    def voter_hash(self, token: str) -> str:
        """The stored form of a voter token: HMAC-SHA256 under this DB's salt, hex."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_ID_CHARS:
            raise ArenaError("bad_voter", f"a voter token is 1 to {MAX_ID_CHARS} characters; reload the page")
        return self._hmac(token)

    def _hmac(self, text: str) -> str:
        return hmac.new(self._salt, text.encode(), hashlib.sha256).hexdigest()

    # -- contestants and prompts ---------------------------------------------------------

    def add_contestants(self, contestants: Iterable[Contestant]) -> None:
        """Register contestants (idempotent). A name already registered with another spec
        is refused: its ratings would mix two models."""
        contestants = list(contestants)
        for c in contestants:
            check_contestant(c)
        with self._write() as conn:
            for c in contestants:
                insert_contestant(conn, c, self._clock(), self.path)

    def add_prompts(self, prompts: Iterable[Prompt]) -> list[int]:
        """Store prompts (a prompt already stored keeps its id and first category; reference
        `fields` given again replace its stored ones); returns their ids in order."""
        encoded = [(prompt_json(p), p) for p in prompts]
        with self._write() as conn:
            return [insert_prompt(conn, text, p, self._clock()) for text, p in encoded]

    def contestants(self) -> list[Contestant]:
        with self._read() as conn:
            return list_contestants(conn)

    def prompts(self) -> list[Prompt]:
        with self._read() as conn:
            return [
                Prompt(json.loads(m), cat, src, pid, json.loads(f) if f is not None else None)
                for pid, m, cat, src, f in list_prompts(conn)
            ]

    # -- battles -------------------------------------------------------------------------

    def create_battle(
        self,
        model_a: str,
        model_b: str,
        prompt_id: int | None,
        *,
        category: str | None = None,
        sampling: dict | None = None,
        ttl: float | None = None,
    ) -> Battle:
        """A new pending battle between two registered contestants (A left, B right as the
        voter will see them), with an unguessable id. Votes wait for `record_answers`.

        With `ttl` (seconds), the battle expires that long after it is made: human votes are
        then refused ("expired"), and, if nobody voted on it, it no longer counts toward
        pairing (`battle_counts`). It stays in the DB, and a judge may still vote on it."""
        if model_a == model_b:
            raise ArenaError("same_contestant", f"a battle needs two contestants, not {model_a!r} twice")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"a battle's time to live must be positive, got {ttl}")
        battle_id = secrets.token_urlsafe(16)
        now = self._clock()
        with self._write() as conn:
            ids = [contestant_id(conn, name) for name in (model_a, model_b)]
            if (
                prompt_id is not None
                and not conn.execute("SELECT 1 FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
            ):
                raise ArenaError("bad_prompt", f"prompt {prompt_id!r}: not in the arena DB; add it first")
            conn.execute(
                "INSERT INTO battles (id, contestant_a, contestant_b, prompt_id, category, sampling,"
                " state, created, expires) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (battle_id, *ids, prompt_id, category, canonical_json(sampling or {}), now,
                 None if ttl is None else now + ttl),
            )  # fmt: skip
            return get_battle(conn, battle_id)

    def record_answers(
        self,
        battle_id: str,
        answer_a: str,
        answer_b: str,
        *,
        timings: dict | None = None,
        sampling: dict | None = None,
    ) -> None:
        """Store both answers (and timings; `sampling` is merged into the battle's, e.g. the
        seeds each side used); the battle becomes votable."""
        check_battle_id(battle_id)
        with self._write() as conn:
            row = conn.execute("SELECT state, sampling FROM battles WHERE id = ?", (battle_id,)).fetchone()
            if row is None:
                raise unknown_battle(battle_id)
            if row[0] != "pending":
                raise ArenaError("already_answered", f"battle {battle_id!r}: already has its answers")
            merged = {**json.loads(row[1]), **(sampling or {})}
            conn.execute(
                "UPDATE battles SET answer_a = ?, answer_b = ?, timings = ?, sampling = ?,"
                " state = 'answered', answered = ? WHERE id = ?",
                (
                    answer_a,
                    answer_b,
                    canonical_json(timings or {}),
                    canonical_json(merged),
                    self._clock(),
                    battle_id,
                ),
            )

    def battle(self, battle_id: str) -> Battle:
        """One battle (to reveal the names after a vote); "unknown_battle" if there is none."""
        check_battle_id(battle_id)
        with self._read() as conn:
            return get_battle(conn, battle_id)

    # -- votes ---------------------------------------------------------------------------

    def record_vote(
        self,
        battle_id: str,
        choice: str,
        voter_token: str,
        voter_kind: str = HUMAN,
        *,
        max_per_minute: int | None = None,
    ) -> Vote:
        """Record one voter's verdict and commit it before returning.

        Raises ArenaError (nothing written) with code "bad_choice", "bad_voter",
        "unknown_battle" (no such battle: forged or mistyped), "expired" (a human vote past
        the battle's time to live), "not_answered" (answers not recorded yet),
        "already_voted" (this voter, this battle) or "rate_limited" (more than
        `max_per_minute` votes by this voter in the last 60 s; `retry_after` says when to
        try again)."""
        if choice not in CHOICES:
            raise ArenaError(
                "bad_choice", f"choice {str(choice)[:20]!r}: must be one of {', '.join(CHOICES)}"
            )
        if not isinstance(voter_kind, str) or not VOTER_KIND.fullmatch(voter_kind):
            raise ArenaError(
                "bad_voter", f"voter kind {str(voter_kind)[:40]!r}: must be human, import or judge:NAME"
            )
        voter = self.voter_hash(voter_token)
        request = PendingVote(check_battle_id(battle_id), choice, voter_kind, voter, max_per_minute)
        batch: list[PendingVote] = []
        with self._batching:
            self._pending.append(request)
            while request.result is None and self._committing:
                self._batching.wait()
            if request.result is None:  # no batch took it: this thread commits the next one
                self._committing = True
                batch, self._pending = self._pending, []
        if request.result is None:
            try:
                self._commit_batch(batch)
            finally:
                with self._batching:
                    self._committing = False
                    self._batching.notify_all()
        if isinstance(request.result, ArenaError):
            raise request.result
        assert isinstance(request.result, Vote)
        return request.result

    def _commit_batch(self, batch: list[PendingVote]) -> None:
        """Group commit: every vote waiting now goes into one transaction, each in its own
        savepoint (a refused vote writes nothing), and one COMMIT (one fsync) acknowledges
        them all. If the transaction fails, every vote of the batch gets the error and none
        is written."""
        try:
            with self._write() as conn:
                now = self._clock()
                results = [apply_vote(conn, request, now) for request in batch]
            # Only now, committed: a waiting voter may see its result (and acknowledge the vote)
            # as soon as it is set, even before this thread wakes it.
            for request, result in zip(batch, results, strict=True):
                request.result = result
        except BaseException as e:
            failed = (
                e if isinstance(e, ArenaError) else ArenaError("storage", f"{self.path}: {e!r}; try again")
            )
            for request in batch:  # one exception object per waiting thread
                request.result = ArenaError(failed.code, str(failed))
            if not isinstance(e, ArenaError):
                raise

    # -- reading for ratings, export, the page and the judge ------------------------------

    def battles_with_votes(
        self, voter_kinds: Iterable[str] | None = None, *, include_unvoted: bool = False
    ) -> list[tuple[Battle, list[Vote]]]:
        """Answered battles with their votes, oldest first, from one snapshot. `voter_kinds`
        keeps votes of those kinds ("judge" matches every `judge:NAME`); None keeps all.
        Battles left with no vote are dropped unless `include_unvoted`."""
        kinds = None if voter_kinds is None else tuple(voter_kinds)
        with self._read() as conn:
            return battles_with_votes(conn, kinds, include_unvoted)

    def battle_counts(self) -> dict[str, int]:
        """Battles per contestant that count toward pairing (every contestant, 0 included):
        answered ones that have a vote or may still get one (not expired). The page pairs the
        contestants with the fewest first."""
        now = self._clock()
        with self._read() as conn:
            return battle_counts(conn, now)

    def battle_tally(self) -> dict[str, int]:
        """How many battles are voted, answered and open for votes, expired unvoted, and
        pending (answers never stored)."""
        now = self._clock()
        with self._read() as conn:
            return battle_tally(conn, now)

    def unvoted_battles(self, voter_token: str, *, limit: int | None = None) -> list[Battle]:
        """Answered battles this voter has not voted on, oldest first (for `arena judge`)."""
        voter = self.voter_hash(voter_token)
        with self._read() as conn:
            return unvoted_battles(conn, voter, limit)

    def content_hash(self) -> str:
        """SHA-256 over a stable dump of every battle and vote (the export's sidecar): equal
        hashes mean the same battles and votes."""
        with self._read() as conn:
            return content_hash(conn)

    def integrity_check(self) -> list[str]:
        """SQLite's integrity and foreign-key checks: the problems found, [] when sound."""
        with self._read() as conn:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
            problems += [f"foreign key: {r}" for r in conn.execute("PRAGMA foreign_key_check").fetchall()]
        return problems

    # -- import --------------------------------------------------------------------------

    def import_battles(self, pairs: Iterable[tuple[Battle, Iterable[Vote]]], *, origin: str) -> ImportCounts:
        """Add battles collected elsewhere with their votes, all in one transaction (one bad
        pair and nothing is added). Unknown contestants are registered as kind "imported".
        A battle id already present with the same contestants is kept (a re-import), as is
        a vote its voter already cast; a battle id present with other contestants is
        refused. A vote's `voter` (a name or hash from the log; empty: one voter per
        origin) is hashed again with this DB's salt. `pairs` may be a generator that parses
        a file: an error it raises part-way rolls the whole import back."""
        with self._write() as conn:
            return import_pairs(conn, pairs, origin, self._hmac, self._clock(), self.path)


@contextlib.contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """SQLite failures (a lock held past the busy timeout, a full disk) as one-line errors."""
    try:
        yield
    except sqlite3.OperationalError as e:
        code = "busy" if "locked" in str(e) or "busy" in str(e) else "storage"
        raise ArenaError(code, f"{path}: the arena DB failed ({e}); try again") from None
    except sqlite3.DatabaseError as e:
        raise ArenaError("storage", f"{path}: the arena DB failed ({e}); check the file") from None
