"""The local model store: one directory per model, each described by a manifest.

Layout: ``$WEIGHTSMITH_HOME/models/<name>/manifest.json`` (default home
``~/.cache/weightsmith``), plus, for a pulled model, the model files themselves; a
registered local checkpoint is recorded by absolute path and never copied. This module
reads entries (`get_entry`, `list_models`), deletes them (`remove`) and installs new ones:
an entry is built in a ``models/.tmp-*`` staging directory on the same filesystem
(`staging`) and swapped into place complete (`install`), so an interrupted or failed
pull leaves the store as it was.

Not here: where models come from and fetching them, or turning a name into a path
(checkpoint/pull.py); the catalog of well-known models (checkpoint/catalog.py); reading
the checkpoints themselves (checkpoint/load.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from weightsmith.errors import ModelNotFoundError, PullError, UsageError
from weightsmith.files import replace_dir, weightsmith_home

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class StoreEntry:
    """One model in the store, as its manifest describes it.

    `problem` is set (and `kind` may be "broken") when the entry cannot be used:
    an unreadable manifest, or a registered path that has vanished.
    """

    name: str
    kind: str  # "gguf" | "hf" | "broken"
    path: Path  # the .gguf file or HF directory (for a broken entry: its store dir)
    source: str  # "pypi:pkg==ver", "hf:org/name" or "local:/abs/path"
    size_bytes: int | None
    sha256: str | None  # of the model file, where known (GGUF pulls)
    pulled_at: str | None
    description: str
    registered: bool = False  # True: `path` belongs to the user, the store only points at it
    problem: str | None = None
    catalog: str | None = None  # the catalog name it was pulled from, if any

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# --------------------------------------------------------------------------- locations and names


def models_dir() -> Path:
    return weightsmith_home() / "models"


def is_name(text: str) -> bool:
    """Whether `text` can be a store name (1-128 of a-z 0-9 '-_.:', starting with a letter or digit)."""
    return bool(_NAME_RE.fullmatch(text))


def validate_name(name: str) -> str:
    """Return `name` if it can be a store name, else raise UsageError."""
    if not is_name(name):
        raise UsageError(
            f"invalid model name {name!r}: use 1-128 lowercase letters, digits and '-_.:', "
            "starting with a letter or digit (e.g. --name my-model-v2)"
        )
    return name


def default_name(stem: str) -> str:
    """A store name made from a file or repo name: cleaned rather than rejected, since the
    user did not choose it."""
    cleaned = re.sub(r"[^a-z0-9._:-]+", "-", stem.lower()).strip("-._:")
    return cleaned[:128] or "model"


def short_path(path: Path) -> str:
    """`path` for messages, with the home directory written as ~."""
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if text.startswith(home + os.sep) else text


# --------------------------------------------------------------------------- reading the store


def get_entry(name: str) -> StoreEntry | None:
    """The store entry called `name`, or None if there is none."""
    entry_dir = models_dir() / validate_name(name)
    return _load_entry(entry_dir) if entry_dir.is_dir() else None


def list_models() -> list[StoreEntry]:
    """All store entries sorted by name; broken ones are returned with `problem` set."""
    root = models_dir()
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    return [_load_entry(d) for d in sorted(dirs, key=lambda d: d.name)]


def _load_entry(entry_dir: Path) -> StoreEntry:
    name = entry_dir.name
    try:
        data = json.loads((entry_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        raw_path = Path(data["path"])
        entry = StoreEntry(
            name=name,
            kind=str(data["kind"]),
            # Store-owned files are recorded relative to the entry so the store can move.
            path=raw_path if raw_path.is_absolute() else entry_dir / raw_path,
            source=str(data["source"]),
            size_bytes=data.get("size_bytes"),
            sha256=data.get("sha256"),
            pulled_at=data.get("pulled_at"),
            description=str(data.get("description") or ""),
            registered=bool(data.get("registered", False)),
            catalog=data.get("catalog"),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = (
            f"unreadable {MANIFEST_NAME} in {entry_dir} ({type(exc).__name__}: {exc}) "
            f"— run `weightsmith remove {name}` and pull it again"
        )
        return StoreEntry(name, "broken", entry_dir, "?", None, None, None, "", problem=problem)
    if not entry.path.exists():
        fix = "restore it" if entry.registered else "pull it again"
        problem = f"{entry.path} no longer exists — {fix}, or run `weightsmith remove {name}`"
        entry = replace(entry, problem=problem)
    return entry


def reusable_entry(name: str, source: str, *, force: bool, sha256: str | None = None) -> StoreEntry | None:
    """The existing entry if it already holds `source` intact; None if a pull should go ahead.

    Raises PullError when `name` is taken by a different source and `force` is off.
    """
    entry = get_entry(name)
    if entry is None or force:
        return None
    same = entry.source == source and (sha256 is None or entry.sha256 == sha256)
    if same and entry.problem is None:
        log.info("%s is already in the store (%s)", name, entry.path)
        return entry
    if same or entry.kind == "broken":
        log.warning("store entry %s is damaged (%s); pulling it again", name, entry.problem)
        return None
    raise PullError(
        f"store name {name!r} is already used by {entry.source} — pass --force to replace it, "
        "or --name to choose another name"
    )


# --------------------------------------------------------------------------- removing


def remove(name: str) -> None:
    """Delete a store entry. For a registered path only the registration goes, never the user's files."""
    entry_dir = models_dir() / validate_name(name)
    if not entry_dir.is_dir():
        raise ModelNotFoundError(
            f"model {name!r} is not in the store ({short_path(models_dir())}) — `weightsmith models` lists what is there"
        )
    # Rename first so the entry disappears at once; the slow delete happens out of sight.
    # A registered entry dir holds only manifest.json, and rmtree does not follow symlinks.
    doomed = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "rm-", dir=models_dir()))
    os.replace(entry_dir, doomed / name)
    shutil.rmtree(doomed, ignore_errors=True)
    log.info("removed %s from the store", name)


# --------------------------------------------------------------------------- writing the store


def new_manifest(
    name: str, kind: str, source: str, path: str, files: list[dict[str, Any]], description: str
) -> dict[str, Any]:
    """The manifest fields every entry has; `files` paths are relative to the model's directory."""
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "kind": kind,
        "source": source,
        "path": path,
        "registered": False,
        "files": files,
        "size_bytes": sum(int(f["size"]) for f in files),
        "sha256": None,
        "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "description": description,
    }


def describe_files(model_dir: Path) -> list[dict[str, Any]]:
    """The manifest's `files` list for every file under `model_dir` (sizes; no hashes)."""
    # Large checkpoints are not hashed here: reading gigabytes twice to fill a field
    # nobody checks is not worth it. Sizes are enough to notice a truncated copy.
    return [
        {"path": p.relative_to(model_dir).as_posix(), "size": p.stat().st_size, "sha256": None}
        for p in sorted(model_dir.rglob("*"))
        if p.is_file()
    ]


@contextlib.contextmanager
def staging() -> Iterator[Path]:
    """A scratch dir inside the store (same filesystem, so the final rename is atomic), always removed."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        yield tmp
    finally:
        # Runs on KeyboardInterrupt too: a half-written pull never outlives its process.
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale_tmp(root: Path) -> None:
    # Leftovers from a killed process (SIGKILL skips `finally`); a day is far longer than any pull.
    cutoff = time.time() - _STALE_TMP_SECONDS
    for d in root.glob(_TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)


def install(staged: Path, name: str, manifest: dict[str, Any]) -> StoreEntry:
    """Write `manifest` into the complete entry `staged` (a dir made under `staging()`) and
    swap it into the store as `name`, replacing any old entry; the only visible step."""
    text = json.dumps(manifest, indent=2) + "\n"
    (staged / MANIFEST_NAME).write_text(text, encoding="utf-8")  # fsynced with the entry below
    replace_dir(staged, models_dir() / name)
    return _load_entry(models_dir() / name)
