"""sha256 of files and folders, streamed once and remembered while the file is unchanged.

`file_sha256(path)` reads a file in 1 MiB chunks; the answer is kept in a small cache
(`WEIGHTSMITH_HOME/lineage/sha256-cache.json`) keyed by the file's real path, size, mtime,
ctime and inode, so a 100 MB base model is read once, not at every command that names it.
A file whose size or times changed is read again; ctime cannot be set back by a program, so
an edit cannot pass for the old content.

`tree_digest(entries)` is the one way a set of files becomes one hash: sha256 over
``"<sha256>  <relative/path>\\n"`` lines sorted by path (the text `sha256sum` prints, so a
digest can be checked with standard tools).

Not here: which files an artifact holds (record.py), following parents (tree.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from weightsmith.errors import WeightsmithError
from weightsmith.files import weightsmith_home, write_json_atomic

#: At most this many files are remembered (the oldest are forgotten first).
CACHE_ENTRIES = 4096
#: At most this many files in one folder digest (a shared lineage.json could name a huge tree).
MAX_TREE_FILES = 20_000

_lock = threading.Lock()
_cache: dict[str, list] | None = None
_dirty = False


def _cache_path() -> Path:
    return weightsmith_home() / "lineage" / "sha256-cache.json"


def _load() -> dict[str, list]:
    global _cache
    if _cache is None:
        try:
            data = json.loads(_cache_path().read_text(encoding="utf-8"))
            _cache = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _cache = {}  # no cache yet, or a damaged one: start again
    return _cache


def _key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), from the cache while the file is unchanged."""
    global _dirty
    real = os.path.realpath(path)
    st = os.stat(real)
    with _lock:
        hit = _load().get(real)
    if isinstance(hit, list) and len(hit) == 2 and hit[0] == _key(st):
        return str(hit[1])
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if _key(os.stat(real)) == _key(st):  # not written to while it was read
        with _lock:
            cache = _load()
            cache.pop(real, None)
            cache[real] = [_key(st), digest]
            _dirty = True
    return digest


def save_cache() -> None:
    """Write the cache back (atomically) if it learned anything; a failure only costs a re-read."""
    global _dirty
    with _lock:
        if not _dirty or _cache is None:
            return
        keep = dict(list(_cache.items())[-CACHE_ENTRIES:])
        try:
            write_json_atomic(_cache_path(), keep)
        except WeightsmithError:  # a cache that cannot be written costs a re-read, nothing more
            return
        _dirty = False


def tree_digest(entries: Iterable[tuple[str, str]]) -> str:
    """One hash for (relative path, sha256) pairs: sha256 of their sorted `sha256sum` lines."""
    lines = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(entries))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def folder_files(folder: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Every regular file under `folder` as a relative POSIX path, sorted; hidden names (temp
    files) and the top-level names in `skip` are left out. Symlinks are not followed."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not (rel_root == Path(".") and d in skip)
        )
        for name in files:
            if name.startswith(".") or (rel_root == Path(".") and name in skip):
                continue
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            found.append((rel_root / name).as_posix())
            if len(found) > MAX_TREE_FILES:
                raise WeightsmithError(f"{folder}: holds more than {MAX_TREE_FILES} files; too many to hash")
    return sorted(found)


def folder_digest(folder: Path, files: list[str] | None = None) -> str:
    """The `tree_digest` of `files` (relative paths; default: `folder_files(folder)`)."""
    names = folder_files(folder) if files is None else files
    return tree_digest((rel, file_sha256(folder / rel)) for rel in names)
