"""What the UI shows from a workspace folder: its artifacts, runs and reports, found by a bounded walk.

`Workspace(root).scan()` walks the folder (hidden folders, `checkpoints/` and the model store
skipped; at most `MAX_DEPTH` levels and `MAX_ENTRIES` folders) and lists every lineage record,
every training run (a folder with `metrics.jsonl`, finished or still training), every
`report.html`, the models a chat can load (checkpoint and adapter folders, GGUF files) and the
arena DBs (by their SQLite header) and saved arena ratings. `resolve(rel)` turns a request's path into a path inside the workspace, or a
`PageError` (403 for `../`, an absolute path or a symlink out; 404 for nothing there): a
request never reads outside the folder the user started the UI in.

Not here: HTML (pages.py), routes (app.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.files import is_inside
from weightsmith.lineage.record import LINEAGE_FILE, MAX_RECORD_BYTES, SUFFIX

MAX_DEPTH = 8
MAX_MODELS = 1000
#: File names an arena DB may have; the file's header says whether it is one.
ARENA_SUFFIXES = (".sqlite", ".sqlite3", ".db")
MAX_ENTRIES = 20_000
#: Largest metrics.jsonl or transcripts file a page reads.
MAX_READ_BYTES = 64 << 20


class PageError(Exception):
    """A request the UI answers with an error page: `status` and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Artifact:
    """One thing the workspace holds: a recorded artifact and/or a training run."""

    rel: str  # the artifact's path relative to the workspace (folder or file)
    record: str | None = None  # its lineage record, relative
    kind: str = "run"
    id: str | None = None
    finished: str | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scan:
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    #: models a chat can load, by workspace path: "hf" (a checkpoint folder), "adapter" (a LoRA
    #: adapter folder), "gguf" (a file); at most MAX_MODELS
    models: dict[str, str] = field(default_factory=dict)
    arenas: list[str] = field(default_factory=list)  # arena DBs (SQLite files marked as ours)
    ratings: list[str] = field(default_factory=list)  # ratings.json files (`arena ratings --out`)
    truncated: bool = False


class Workspace:
    def __init__(self, root: Path, skip: tuple[Path, ...] = ()) -> None:
        self.root = Path(os.path.realpath(root))
        self.skip = tuple(Path(os.path.realpath(s)) for s in skip)

    def rel(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def inside(self, path: str) -> str | None:
        """`path` (absolute, or relative to the current folder) relative to the workspace; None outside."""
        full = Path(os.path.abspath(path))
        return self.rel(full) if is_inside(full, self.root) else None

    def resolve(self, rel: str | None, *, want: str = "any") -> Path:
        """The workspace path `rel` names; PageError when it leaves the workspace or is missing."""
        if rel is None or "\0" in rel or rel.startswith(("/", "\\")) or len(rel) > 4096:
            raise PageError(403, f"{rel!r}: give a path inside the workspace, relative to it")
        path = self.root / rel
        if not is_inside(path, self.root):
            raise PageError(403, f"{rel}: outside the workspace {self.root}; the UI shows only that folder")
        if not path.exists():
            raise PageError(404, f"{rel}: not found in the workspace")
        if want == "file" and not path.is_file():
            raise PageError(404, f"{rel}: not a file")
        return path

    def scan(self) -> Scan:
        found = Scan()
        count = 0
        for top, dirs, files in os.walk(self.root):
            here = Path(top)
            depth = len(here.relative_to(self.root).parts)
            dirs[:] = sorted(
                d for d in dirs
                if not d.startswith(".") and d != "checkpoints" and depth < MAX_DEPTH
                and Path(os.path.realpath(here / d)) not in self.skip and not (here / d).is_symlink()
            )  # fmt: skip
            count += 1
            if count > MAX_ENTRIES:
                found.truncated = True
                break
            self._look(here, sorted(files), found)
        return found

    def _look(self, here: Path, files: list[str], found: Scan) -> None:
        if "metrics.jsonl" in files:
            rel = self.rel(here)
            found.artifacts.setdefault(rel, Artifact(rel))
        kind = model_kind(here, files)
        if kind is not None and len(found.models) < MAX_MODELS:
            found.models[self.rel(here)] = kind
        for name in files:
            if name == "report.html":
                found.reports.append(self.rel(here / name))
            elif name == "ratings.json":
                found.ratings.append(self.rel(here / name))
            elif name.endswith(".gguf") and len(found.models) < MAX_MODELS:
                found.models[self.rel(here / name)] = "gguf"
            elif name.lower().endswith(ARENA_SUFFIXES) and is_arena_db(here / name):
                found.arenas.append(self.rel(here / name))
            if name == LINEAGE_FILE or (name.endswith(SUFFIX) and name != SUFFIX):
                self._record(here / name, found)

    def _record(self, file: Path, found: Scan) -> None:
        try:
            if file.stat().st_size > MAX_RECORD_BYTES:
                return
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # a damaged record: its lineage page says what is wrong
        if not isinstance(record, dict):
            return
        artifact = record.get("artifact") if isinstance(record.get("artifact"), dict) else {}
        target = file.parent if artifact.get("type") != "file" else file.parent / str(artifact.get("path"))
        rel = self.rel(target)
        entry = found.artifacts.setdefault(rel, Artifact(rel))
        entry.record, entry.kind = self.rel(file), str(record.get("kind", "?"))
        entry.id, entry.finished = str(record.get("id", "")), str(record.get("finished", ""))
        entry.inputs = [i for i in record.get("inputs", []) if isinstance(i, dict)]
        entry.metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}

    def children(self, scan: Scan, ident: str | None) -> list[Artifact]:
        """The artifacts made from the one with lineage id `ident` (its reports, merges, exports)."""
        if not ident:
            return []
        return [
            a for a in scan.artifacts.values()
            if any(isinstance(i.get("lineage"), dict) and i["lineage"].get("id") == ident for i in a.inputs)
        ]  # fmt: skip


def model_kind(folder: Path, files: list[str]) -> str | None:
    """ "adapter" for a LoRA adapter folder, "hf" for a checkpoint folder, else None."""
    weights = any(f.endswith(".safetensors") for f in files)
    if "adapter_config.json" in files and weights:
        return "adapter"
    if "config.json" in files and weights:
        return "hf"
    return None


def is_arena_db(path: Path) -> bool:
    """Whether the file is an SQLite DB whose header holds the arena's application id (no SQL run)."""
    from weightsmith.arena.schema import APPLICATION_ID

    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError:
        return False
    return head.startswith(b"SQLite format 3\x00") and int.from_bytes(head[68:72], "big") == APPLICATION_ID


def read_jsonl(path: Path, limit: int) -> list[dict[str, Any]]:
    """At most `limit` JSON objects from a JSON-lines file (bad lines skipped); PageError if huge."""
    if path.stat().st_size > MAX_READ_BYTES:
        raise PageError(413, f"{path.name}: larger than {MAX_READ_BYTES >> 20} MiB; open it another way")
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
            if len(out) >= limit:
                break
    return out
