"""Writing an artifact's lineage record: what made it, from what, with which code, and what it holds.

`write_lineage(out, kind=..., config=..., inputs=..., metrics=..., started=...)` is the one
call an artifact writer makes once its files are complete. It hashes the inputs (each linked
to its own lineage record when it has one) and the outputs, and writes `lineage.json` into
the artifact folder (or `NAME.lineage.json` beside a single-file artifact) atomically.

An input is given as the user gave it (a path, a store or catalog name, `builtin:NAME`, an
endpoint URL); `input_record` resolves it without touching the network. Its `sha256` is the
file's hash, or for a folder the `tree_digest` of its files (for a folder with a lineage
record: of the files that record lists, so it equals that record's `digest` while nothing
changed).

Not here: hashing itself (hashing.py), reading records back and checking them (tree.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from weightsmith import __version__
from weightsmith.errors import WeightsmithError
from weightsmith.files import is_inside, write_json_atomic
from weightsmith.lineage.hashing import file_sha256, folder_files, save_cache, tree_digest

SCHEMA = "weightsmith.lineage/1"
LINEAGE_FILE = "lineage.json"
SUFFIX = ".lineage.json"
#: How far up from an input a parent artifact's lineage.json is looked for (runs/x/model/...).
PARENT_LEVELS = 3
#: A record larger than this is not read (records are a few KiB; a shared file could be huge).
MAX_RECORD_BYTES = 16 << 20

_command_line: list[str] | None = None


def note_command_line(argv: Sequence[str]) -> None:
    """Remember the command line this process runs (the CLI calls this; records cite it)."""
    global _command_line
    _command_line = ["weightsmith", *argv]


def lineage_file(artifact: Path) -> Path:
    """Where an artifact's record lives: DIR/lineage.json, or NAME.lineage.json beside a file
    (`pairs.jsonl` -> `pairs.lineage.json`, as `NAME.meta.json`)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / LINEAGE_FILE
    return artifact.with_name(artifact.stem + SUFFIX)


def artifact_folder(record_file: Path) -> Path:
    """The folder an artifact's output paths are relative to."""
    return record_file.parent


# ----- inputs ---------------------------------------------------------------------------------------


def resolve_input(spec: str) -> Path | None:
    """A local path for `spec`: the path itself, or a store or catalog model already pulled
    (never a download); None for anything else."""
    local = Path(spec).expanduser()
    if local.exists():
        return local
    from weightsmith.checkpoint.pull import resolve

    try:
        return resolve(spec, auto_pull=False)
    except (WeightsmithError, OSError, ValueError):  # not a model we can find: recorded by name only
        return None


def model_facts(spec: str) -> dict[str, Any] | None:
    """What the store and catalog say about a model name (source, Hub repo, license)."""
    from weightsmith.checkpoint import store
    from weightsmith.checkpoint.catalog import CATALOG

    if not store.is_name(spec):
        return None
    entry, known = store.get_entry(spec), CATALOG.get(spec)
    if entry is None and known is None:
        return None
    facts = {"name": spec, "source": entry.source if entry else known.source}  # type: ignore[union-attr]
    if known is not None:
        facts.update(hf_repo=known.hf_repo, license=known.license)
    return facts


def find_parent(path: Path, within: Sequence[Path] | None = None) -> tuple[Path, dict[str, Any], str] | None:
    """(its lineage file, the record, `path` relative to that artifact) for an input some
    weightsmith command wrote; None when no record covers it. A damaged record is skipped;
    with `within`, records outside those folders are not read."""
    path = Path(os.path.abspath(path))
    candidates: list[Path] = []
    if path.is_dir():
        candidates.append(path / LINEAGE_FILE)
    else:
        candidates.append(path.with_name(path.stem + SUFFIX))
    candidates += [a / LINEAGE_FILE for a in list(path.parents)[:PARENT_LEVELS]]
    for file in candidates:
        if within is not None and not any(is_inside(file, w) for w in within):
            continue
        if not file.is_file() or file.stat().st_size > MAX_RECORD_BYTES:
            continue
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        part = Path(os.path.relpath(path, file.parent)).as_posix()
        part = "" if part == "." else part
        if isinstance(record, dict) and covers(record, part):
            return file, record, part
    return None


def _outputs(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, sha256) of a record's outputs; entries of the wrong shape (a damaged or crafted
    record, read before it is checked) are left out."""
    outputs = record.get("outputs")
    return [
        (o["path"], o["sha256"]) for o in (outputs if isinstance(outputs, list) else [])
        if isinstance(o, dict) and isinstance(o.get("path"), str) and isinstance(o.get("sha256"), str)
    ]  # fmt: skip


def covers(record: dict[str, Any], part: str) -> bool:
    """Whether `part` (a path relative to the artifact folder; "" the whole) is among its outputs."""
    if part == "":
        return True
    return any(p == part or p.startswith(part + "/") for p, _ in _outputs(record))


def listed_under(record: dict[str, Any], part: str) -> list[tuple[str, str]]:
    """(path relative to `part`, recorded sha256) of the record's outputs inside `part`."""
    out = []
    for p, sha in _outputs(record):
        if part == "" or p == part:
            out.append((Path(p).name if p == part else p, sha))
        elif p.startswith(part + "/"):
            out.append((p[len(part) + 1 :], sha))
    return out


def expected_hash(record: dict[str, Any], part: str) -> str | None:
    """The hash an input `part` of this artifact had when the artifact was written."""
    if part == "":
        return record.get("digest")
    entries = listed_under(record, part)
    if len(entries) == 1 and any(p == part for p, _ in _outputs(record)):
        return entries[0][1]
    return tree_digest(entries) if entries else None


def input_hash(path: Path, parent: tuple[Path, dict[str, Any], str] | None) -> str:
    """A file's sha256, or a folder's digest: over the files its lineage lists (a listed file
    that is gone counts as "missing"), else over every file in it."""
    if path.is_file():
        return file_sha256(path)
    if parent is not None:
        _, record, part = parent
        entries = []
        for rel, _ in listed_under(record, part):
            f = path / rel
            if not is_inside(f, path):  # a record naming ../ files: never read
                entries.append((rel, "outside"))
            else:
                entries.append((rel, file_sha256(f) if f.is_file() else "missing"))
        return tree_digest(entries)
    return tree_digest((rel, file_sha256(path / rel)) for rel in folder_files(path, skip=(LINEAGE_FILE,)))


def input_record(role: str, spec: Any, base: Path) -> dict[str, Any]:
    """One input as the record keeps it: role, spec, where it was, its hash and its parent."""
    text = str(spec).strip()
    entry: dict[str, Any] = {"role": role, "spec": text}
    if text.startswith(("http://", "https://")):
        return {**entry, "endpoint": True}
    if text.startswith("builtin:"):
        return {**entry, "builtin": True}  # shipped with this weightsmith version
    if (facts := model_facts(text)) is not None:
        entry["model"] = facts
    path = resolve_input(text)
    if path is None:
        return {**entry, "missing": True}
    absolute = Path(os.path.abspath(path))
    entry.update(path=str(absolute), relpath=Path(os.path.relpath(absolute, base)).as_posix())
    parent = find_parent(absolute)
    try:
        entry["sha256"] = input_hash(absolute, parent)
    except (OSError, WeightsmithError) as e:  # unreadable or too big: recorded as such, not fatal
        return {**entry, "missing": True, "error": str(e)}
    if parent is not None:
        file, record, part = parent
        entry["lineage"] = {
            "id": record.get("id"),
            "kind": record.get("kind"),
            "file": Path(os.path.relpath(file, base)).as_posix(),
            "part": part,
        }
    return entry


def input_records(inputs: Mapping[str, Any], base: Path) -> list[dict[str, Any]]:
    """`inputs` (role -> spec, list of specs, or None) as records, in order."""
    records = []
    for role, value in inputs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for spec in values:
            if spec is not None and str(spec).strip():
                records.append(input_record(role, spec, base))
    return records


# ----- outputs, software, the record --------------------------------------------------------------


def output_records(out: Path, extra: Sequence[str | Path], exclude: Sequence[str]) -> list[dict[str, Any]]:
    """The artifact's files: everything in a folder artifact (but the record itself, hidden temp
    files and the top-level names in `exclude`), or a file artifact and the `extra` files."""
    if out.is_dir():
        folder, names = out, folder_files(out, skip=(LINEAGE_FILE, *exclude))
    else:
        folder = out.parent
        names = [out.name, *(Path(os.path.relpath(Path(e), folder)).as_posix() for e in extra)]
    return [
        {"path": n, "sha256": file_sha256(folder / n), "bytes": (folder / n).stat().st_size} for n in names
    ]


_git: dict[str, Any] | None = None


def git_state() -> dict[str, Any] | None:
    """The commit (and whether the tree has local changes) of a weightsmith run from a git
    checkout; None for an installed package or without git."""
    global _git
    if _git is not None:
        return _git or None
    here = Path(__file__).resolve().parents[3]
    _git = {}
    if not (here / ".git").exists():
        return None

    def run(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        _git = {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return None
    return _git


def software(device: str | None) -> dict[str, Any]:
    import torch

    where = device
    if device in (None, "auto"):
        from weightsmith.device import pick_device

        where = str(pick_device(device))
    info: dict[str, Any] = {
        "weightsmith": __version__,
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": where,
    }
    if where and str(where).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(str(where)))
        info["cuda"] = torch.version.cuda
    return info


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        from weightsmith.config import config_to_dict

        value = config_to_dict(value)
    return json.loads(json.dumps(value, default=str))


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def write_lineage(
    out: str | Path,
    *,
    kind: str,
    config: Any = None,
    inputs: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    started: float | None = None,
    device: str | None = "cpu",
    extra_outputs: Sequence[str | Path] = (),
    exclude: Sequence[str] = (),
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record how the artifact at `out` (a folder, or a file) was made; returns the record.

    `kind`: the command that made it ("finetune", "eval", ...; `reproduce` re-runs by it);
    `config`: its config dataclass (or a dict); `inputs`: role -> spec(s) as the user gave
    them; `metrics`: headline numbers; `started`: `time.time()` when the work began;
    `device`: where it ran ("auto" is resolved, "endpoint" for remote models);
    `extra_outputs`: for a file artifact, the files written beside it; `exclude`: top-level
    names of a folder artifact that are not part of it (checkpoints); `details`: what else the
    kind records about its making (synth: the generator's identity, prompt file hashes)."""
    out = Path(out)
    record_file = lineage_file(out)
    base = artifact_folder(record_file)
    outputs = output_records(out, extra_outputs, exclude)
    now = time.time()
    record = {
        "schema": SCHEMA,
        "id": uuid.uuid4().hex,
        "kind": kind,
        "artifact": {"path": out.name, "type": "folder" if out.is_dir() else "file"},
        "command": {"argv": _command_line, "cwd": os.getcwd(), "exclude": list(exclude)},
        "config": _plain(config) if config is not None else None,
        "inputs": input_records(inputs or {}, base),
        "outputs": outputs,
        "digest": tree_digest((o["path"], o["sha256"]) for o in outputs),
        "software": software(device),
        "started": _iso(started if started is not None else now),
        "finished": _iso(now),
        "seconds": round(now - started, 3) if started is not None else None,
        "metrics": _plain(dict(metrics or {})),
    }
    if details:
        record["details"] = _plain(dict(details))
    write_json_atomic(record_file, record)
    save_cache()
    return record


__all__ = [
    "LINEAGE_FILE",
    "SCHEMA",
    "expected_hash",
    "find_parent",
    "input_hash",
    "lineage_file",
    "note_command_line",
    "write_lineage",
]
