"""A result cache for evaluation requests, so a rerun of the same model on the same
requests is instant.

Keys are SHA-256 of (model fingerprint, request kind, request arguments); the model
fingerprint hashes every weight (adapters merged in), the dtype and the device type,
so a changed fork, precision or device never reads another's numbers. Stored in one
SQLite file (WAL mode; each batch is one transaction, so a killed run loses at most the
batch in flight and never leaves a half-written entry).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.models.fingerprint import model_fingerprint

__all__ = ["ResultCache", "model_fingerprint", "request_key"]


def request_key(fingerprint: str, kind: str, args: Any) -> str:
    payload = json.dumps([fingerprint, kind, args], ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class ResultCache:
    """Maps request keys to JSON values."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise WeightsmithError(
                f"{path}: cannot open the eval cache ({exc}); pass --no-cache or --cache PATH"
            ) from None

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(keys)
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in self._db.execute(
                f"SELECT key, value FROM results WHERE key IN ({marks})", chunk
            ):
                found[key] = json.loads(value)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO results (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in items.items()],
            )

    def close(self) -> None:
        self._db.close()
