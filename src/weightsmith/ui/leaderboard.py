"""The UI's arena leaderboards: every arena DB in the workspace, rated as `arena ratings` rates it.

`Leaderboards.board(path, voters)` reads the DB without writing to it
(`weightsmith.arena.leaderboard.read_snapshot`) and rates its votes with the arena's own code
(`rate_votes`: Bradley–Terry, 95% bootstrap intervals with `arena ratings`' defaults, 200
resamples, seed 0), so the page and the command agree for the same DB. A result is kept until
the DB or its WAL file changes (size or modification time), so reloading the page does not
refit. A DB that cannot be rated yet (no votes, contestants that never met, a file we cannot
read) gives a `Board` with `problem` set: the page says so; it is not an error.

Not here: the HTML (pages.py, and the arena's own report parts), the routes (app.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.arena.leaderboard import VOTERS, rate_votes, read_snapshot, summary
from weightsmith.arena.ratings import Ratings
from weightsmith.errors import WeightsmithError

#: Bootstrap resamples and seed: `arena ratings`' defaults.
ROUNDS, SEED = 200, 0
#: DBs whose results are kept.
MAX_CACHED = 32


@dataclass
class Board:
    """One DB's leaderboard: its counts, and the ratings or why there are none."""

    counts: dict[str, Any]
    ratings: Ratings | None = None
    problem: str | None = None


def _stamp(path: Path) -> tuple:
    out = []
    for p in (path, path.with_name(path.name + "-wal")):
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class Leaderboards:
    """Ratings of the workspace's arena DBs, each kept until its file changes."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[tuple, Board]] = {}
        self._lock = threading.Lock()

    def board(self, path: Path, voters: str = "all") -> Board:
        key = (str(path), voters)
        stamp = _stamp(path)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        result = _rate(path, voters)
        with self._lock:
            if len(self._cache) >= MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (stamp, result)
        return result


def _rate(path: Path, voters: str) -> Board:
    try:
        snapshot = read_snapshot(path)
    except WeightsmithError as e:
        return Board({}, problem=str(e))
    board = Board(summary(snapshot))
    try:
        board.ratings = rate_votes(snapshot.battles, kinds=VOTERS[voters], voters=voters, db=path.name,
                                   sha256=snapshot.sha256, rounds=ROUNDS, seed=SEED)  # fmt: skip
    except WeightsmithError as e:
        board.problem = str(e)
    return board


__all__ = ["VOTERS", "Board", "Leaderboards"]
