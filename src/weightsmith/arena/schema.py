"""The arena database file: opening it, its schema, and the migrations between versions.

An arena DB is one SQLite file marked as ours twice: `PRAGMA application_id` holds
`APPLICATION_ID` and `PRAGMA user_version` the schema version it was written with. Opening
a file runs the migrations it lacks, oldest first, each in its own transaction (a killed
migration leaves the previous version whole). A file written by a newer schema, a file
that is not SQLite, and a SQLite file of some other program are each one error line that
names the file.

Every connection runs in WAL mode (readers never block the writer) with foreign keys on,
a busy timeout (another process writing, say `arena judge` beside the page, makes us wait,
not fail) and, by default, `synchronous=FULL`: each commit fsyncs the WAL, so a vote that
was acknowledged survives a power cut as well as a killed process. `synchronous=NORMAL`
(the `synchronous` argument) skips that fsync: a SIGKILL still loses nothing (the WAL
frames are in the OS page cache, which outlives the process), but a power cut or a kernel
crash may lose the last transactions (never corrupting the file).

Not here: what the tables mean to the arena (store.py).
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path

from weightsmith.errors import WeightsmithError

#: "WSAR" in the SQLite header: this file is a weightsmith arena DB.
APPLICATION_ID = 0x57534152
#: How long a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 10.0
SYNCHRONOUS = ("full", "normal")

#: The HTTP status a web page answers for each error code (the page maps; the store only raises).
HTTP_STATUS = {
    "unknown_battle": 404,
    "not_answered": 409,
    "already_answered": 409,
    "already_voted": 409,
    "expired": 410,
    "bad_choice": 422,
    "bad_voter": 422,
    "bad_prompt": 422,
    "prompt_too_large": 413,
    "unknown_contestant": 422,
    "same_contestant": 422,
    "contestant_conflict": 409,
    "bad_import": 422,
    "rate_limited": 429,
    "busy": 503,
    "storage": 503,
    "bad_db": 500,
    "newer_schema": 500,
}


class ArenaError(WeightsmithError):
    """An arena store refusal. `code` is a short machine code (a key of `HTTP_STATUS`) a
    web page maps to a 4xx answer; the message is one line for a person."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        assert code in HTTP_STATUS, code
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


def _v1(conn: sqlite3.Connection) -> None:
    """The first schema: meta (the salt), contestants, prompts, battles, votes.

    Frozen: a migration never changes once released (a DB written by it must migrate the
    same way forever); later changes are new migrations."""
    statements = [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE contestants (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            spec TEXT NOT NULL,
            kind TEXT NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            messages TEXT NOT NULL UNIQUE,
            category TEXT,
            source TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL)""",
        """CREATE TABLE battles (
            id TEXT PRIMARY KEY,
            contestant_a INTEGER NOT NULL REFERENCES contestants(id),
            contestant_b INTEGER NOT NULL REFERENCES contestants(id),
            prompt_id INTEGER REFERENCES prompts(id),
            answer_a TEXT,
            answer_b TEXT,
            category TEXT,
            sampling TEXT NOT NULL DEFAULT '{}',
            timings TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL CHECK (state IN ('pending', 'answered')),
            origin TEXT NOT NULL DEFAULT 'arena',
            created REAL NOT NULL,
            answered REAL,
            CHECK (contestant_a <> contestant_b))""",
        """CREATE TABLE votes (
            id INTEGER PRIMARY KEY,
            battle_id TEXT NOT NULL REFERENCES battles(id),
            choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
            voter_kind TEXT NOT NULL,
            voter TEXT NOT NULL,
            created REAL NOT NULL,
            UNIQUE (battle_id, voter))""",
        f"PRAGMA application_id = {APPLICATION_ID}",
    ]
    for sql in statements:
        conn.execute(sql)
    # The voter-token salt: random per DB, so hashes from two arenas cannot be matched up.
    conn.execute("INSERT INTO meta (key, value) VALUES ('salt', ?)", (secrets.token_hex(32),))


def _v2(conn: sqlite3.Connection) -> None:
    """Indexes for the hot paths: a voter's recent votes (the rate limit) and the battles
    of a contestant (the page's pair choice)."""
    conn.execute("CREATE INDEX votes_by_voter ON votes (voter, created)")
    conn.execute("CREATE INDEX battles_by_a ON battles (contestant_a, state)")
    conn.execute("CREATE INDEX battles_by_b ON battles (contestant_b, state)")


def _v3(conn: sqlite3.Connection) -> None:
    """A battle's voting deadline: `expires`, when it stops taking human votes and stops
    counting toward pairing unless voted (NULL: never; imported and judge-fought battles, and
    every battle made before this version)."""
    conn.execute("ALTER TABLE battles ADD COLUMN expires REAL")


def _v4(conn: sqlite3.Connection) -> None:
    """A prompt's reference fields: `fields`, the JSON object of a prompt line's other keys
    (`answer`, `contains`, `expect`, ...) that `arena judge --reward` scores answers against
    (NULL: none; typed prompts and every prompt stored before this version)."""
    conn.execute("ALTER TABLE prompts ADD COLUMN fields TEXT")


#: MIGRATIONS[i] takes a DB from version i to i + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4]
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, *, synchronous: str = "full") -> sqlite3.Connection:
    """A connection with the arena's settings (WAL, foreign keys, busy timeout, synchronous).

    Autocommit mode (`isolation_level=None`): transactions are explicit `BEGIN` / `COMMIT`,
    so nothing is ever committed by accident or left open. Usable from any thread; callers
    serialise their use of one connection."""
    if synchronous not in SYNCHRONOUS:
        raise ArenaError(
            "bad_db", f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}"
        )
    try:
        conn = sqlite3.connect(
            str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as e:
        raise ArenaError("bad_db", f"{path}: cannot open the arena DB ({e}); check the path") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except sqlite3.Error as e:
        conn.close()
        raise _not_ours(path, e) from None
    return conn


def _not_ours(path: Path, e: Exception | None = None) -> ArenaError:
    why = f" ({e})" if e else ""
    return ArenaError(
        "bad_db",
        f"{path}: not a weightsmith arena DB{why}; pass a new file or one written by `weightsmith arena`",
    )


def check_file(conn: sqlite3.Connection, path: Path) -> int:
    """The file's schema version, after checking the file is ours (or empty) and not newer."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.Error as e:  # "file is not a database", an encrypted or truncated file
        raise _not_ours(path, e) from None
    if app_id != APPLICATION_ID and (version or tables):
        raise _not_ours(path)
    if version > SCHEMA_VERSION:
        raise ArenaError(
            "newer_schema",
            f"{path}: written by a newer weightsmith (arena schema {version}; this one reads up to "
            f"{SCHEMA_VERSION}); upgrade weightsmith or pass another --db",
        )
    return version


def open_db(path: Path, *, synchronous: str = "full") -> sqlite3.Connection:
    """Open (or create) the arena DB at `path`, migrated to `SCHEMA_VERSION`."""
    path = Path(path)
    if path.is_dir():
        raise ArenaError("bad_db", f"{path}: is a folder; pass a file path for the arena DB")
    if not path.parent.is_dir():
        raise ArenaError("bad_db", f"{path}: folder {path.parent} does not exist; create it first")
    conn = connect(path, synchronous=synchronous)
    try:
        check_file(conn, path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ArenaError("bad_db", f"{path}: SQLite cannot use WAL mode here ({mode}); use a local disk")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the missing migrations, each in one transaction. Another process may migrate
    at the same time: the version is read again under the write lock."""
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise ArenaError("busy", f"{path}: the arena DB stays locked ({e}); try again") from None
        try:
            version = check_file(conn, path)
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise ArenaError(
                    "bad_db", f"{path}: migrating the arena DB failed ({e}); it is unchanged"
                ) from None
            raise
