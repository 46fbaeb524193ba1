"""Reading lineage records back: the tree from an artifact to its base weights, every hash checked.

`check_lineage(path, roots)` finds the record of `path` (a folder, a file artifact, or a
record file), checks it, then follows each input to the artifact that produced it, and so on
down to inputs nobody recorded (the base weights, the user's data). At every step the
outputs and inputs are hashed again: a file that changed, went missing, or whose parent was
rebuilt since is a *problem*, listed in the result. A damaged top record, a cycle of ids or
a tree too big to be real is a `LineageError`.

Records are shared files, so they are not trusted: a record is at most 16 MiB, every field
is checked before use, and files are read only inside `roots` (the workspace and the model
store); an input elsewhere is shown as not checked.

Not here: writing records (record.py), printing the tree (cli/lineage.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.files import is_inside, weightsmith_home
from weightsmith.lineage.hashing import file_sha256
from weightsmith.lineage.record import (
    LINEAGE_FILE,
    MAX_RECORD_BYTES,
    SCHEMA,
    SUFFIX,
    expected_hash,
    find_parent,
    input_hash,
)

#: Deeper or bigger trees than these are not lineage a person made (a crafted file is).
MAX_DEPTH = 64
MAX_ARTIFACTS = 1000

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_FIX = "the record is damaged or was not written by weightsmith; re-run the command that made the artifact"


class LineageError(WeightsmithError):
    """A lineage record is missing, damaged, or its ids form a cycle; `result` is the tree so far."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def locate(path: Path) -> Path:
    """The record of the artifact at `path`: DIR/lineage.json, NAME.lineage.json beside a file,
    or `path` itself when it is a record."""
    path = Path(path)
    if path.is_file() and path.name.endswith((SUFFIX, LINEAGE_FILE)) and path.name != SUFFIX:
        return path
    if path.is_dir():
        if (path / LINEAGE_FILE).is_file():
            return path / LINEAGE_FILE
        found = sorted(path.glob(f"*{SUFFIX}"))
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(f.name[: -len(SUFFIX)] for f in found)
            raise LineageError(f"{path}: holds several artifacts ({names}); name one of their files")
    elif path.is_file() and path.with_name(path.stem + SUFFIX).is_file():
        return path.with_name(path.stem + SUFFIX)
    elif not path.exists():
        raise LineageError(f"{path}: no such file or folder")
    raise LineageError(
        f"{path}: no {LINEAGE_FILE} (nor NAME{SUFFIX} beside a file): it was not written by this "
        "weightsmith, or the command that wrote it did not finish; re-run that command to record it"
    )


def read_record(file: Path) -> dict[str, Any]:
    """A lineage record, every field the tree uses checked; LineageError naming the field otherwise."""
    try:
        if file.stat().st_size > MAX_RECORD_BYTES:
            raise LineageError(f"{file}: larger than {MAX_RECORD_BYTES >> 20} MiB; {_FIX}")
        record = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LineageError(f"{file}: not found; {_FIX}") from None
    except json.JSONDecodeError as e:
        raise LineageError(f"{file}:{e.lineno}: invalid JSON ({e.msg}); {_FIX}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LineageError(f"{file}: cannot be read ({e}); {_FIX}") from None
    problem = _problem(record)
    if problem:
        raise LineageError(f"{file}: {problem}; {_FIX}")
    return record


def _problem(record: Any) -> str | None:
    """What is wrong with a parsed record, as `key: problem` (None: nothing)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if record.get("schema") != SCHEMA:
        return f"schema: expected {SCHEMA!r}, got {record.get('schema')!r}"
    checks = [
        ("id", isinstance(record.get("id"), str) and _ID.fullmatch(record["id"]), "an id of 1-64 letters"),
        ("kind", isinstance(record.get("kind"), str) and record["kind"], "a command name"),
        ("digest", isinstance(record.get("digest"), str) and _HEX64.fullmatch(record["digest"]), "a sha256"),
        ("inputs", isinstance(record.get("inputs"), list), "a list"),
        ("outputs", isinstance(record.get("outputs"), list), "a list"),
    ]
    for key, ok, what in checks:
        if not ok:
            return f"{key}: expected {what}, got {json.dumps(record.get(key))[:60]}"
    for i, o in enumerate(record["outputs"]):
        if not (isinstance(o, dict) and isinstance(o.get("path"), str) and o["path"]):
            return f"outputs[{i}].path: expected a relative file path"
        if not (isinstance(o.get("sha256"), str) and _HEX64.fullmatch(o["sha256"])):
            return f"outputs[{i}].sha256: expected 64 hex digits"
    for i, entry in enumerate(record["inputs"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("role"), str)):
            return f"inputs[{i}]: expected an object with a role"
        for key in ("spec", "path", "relpath", "sha256"):
            if key in entry and not isinstance(entry[key], str):
                return f"inputs[{i}].{key}: expected a string"
        link = entry.get("lineage")
        if link is not None and not (isinstance(link, dict) and isinstance(link.get("id"), str)):
            return f"inputs[{i}].lineage: expected an object with an id"
    return None


@dataclass
class _Walk:
    roots: tuple[Path, ...]
    problems: list[str] = field(default_factory=list)
    shown: set[str] = field(default_factory=set)
    artifacts: int = 0

    def allowed(self, path: Path) -> bool:
        return any(is_inside(path, root) for root in self.roots)


def check_lineage(path: str | Path, roots: Sequence[str | Path] = (".",)) -> dict[str, Any]:
    """The checked tree of `path`'s lineage: {"tree", "problems", "artifacts", "roots"}.
    Files are read only inside `roots` and the model store."""
    file = locate(Path(path))
    walk = _Walk(tuple(Path(r).resolve() for r in roots) + (weightsmith_home().resolve(),))
    tree = _node(walk, file, read_record(file), [])
    return {"tree": tree, "problems": walk.problems, "artifacts": walk.artifacts,
            "roots": [str(r) for r in walk.roots]}  # fmt: skip


def _node(walk: _Walk, file: Path, record: dict[str, Any], stack: list[tuple[str, Path]]) -> dict[str, Any]:
    ident = record["id"]
    if any(ident == seen for seen, _ in stack):
        chain = " -> ".join(f"{f} ({i[:12]})" for i, f in [*stack, (ident, file)])
        raise LineageError(
            f"lineage cycle: {chain}; an artifact cannot be its own ancestor: a record was copied or edited "
            "by hand; re-run the command that made the last one"
        )
    stack = [*stack, (ident, file)]
    walk.artifacts += 1
    if len(stack) > MAX_DEPTH or walk.artifacts > MAX_ARTIFACTS:
        raise LineageError(
            f"{file}: lineage deeper than {MAX_DEPTH} or larger than {MAX_ARTIFACTS} artifacts"
        )
    walk.shown.add(ident)
    folder = file.parent
    software = record.get("software") if isinstance(record.get("software"), dict) else {}
    artifact = record.get("artifact") if isinstance(record.get("artifact"), dict) else {}
    return {
        "id": ident,
        "kind": record["kind"],
        "file": str(file),
        "artifact": _shown(
            folder if artifact.get("type") == "folder" else folder / str(artifact.get("path"))
        ),
        "finished": record.get("finished"),
        "weightsmith": software.get("weightsmith"),
        "git": software.get("git"),
        "device": software.get("device"),
        "metrics": record.get("metrics") if isinstance(record.get("metrics"), dict) else {},
        "config": record.get("config") if isinstance(record.get("config"), dict) else {},
        "outputs": [_output(walk, folder, o) for o in record["outputs"]],
        "inputs": [_input(walk, folder, entry, stack) for entry in record["inputs"]],
    }


def _shown(path: Path) -> str:
    """`path` relative to the current folder when it is inside it (as people typed it)."""
    here = Path.cwd()
    return os.path.relpath(path, here) if is_inside(path, here) else str(path)


def _output(walk: _Walk, folder: Path, o: dict[str, Any]) -> dict[str, Any]:
    path = folder / o["path"]
    result = {"path": o["path"], "sha256": o["sha256"]}
    if not is_inside(path, folder) or not walk.allowed(path):
        walk.problems.append(f"{folder}: output {o['path']!r} is outside the artifact's folder")
        return {**result, "status": "outside"}
    if not path.is_file():
        walk.problems.append(f"{path}: output missing (recorded sha256 {o['sha256'][:12]})")
        return {**result, "status": "missing"}
    try:
        now = file_sha256(path)
    except OSError as e:
        walk.problems.append(f"{path}: cannot be read ({e.strerror or e})")
        return {**result, "status": "missing"}
    if now != o["sha256"]:
        walk.problems.append(
            f"{path}: changed since it was written (sha256 {o['sha256'][:12]}, now {now[:12]})"
        )
        return {**result, "status": "changed", "now": now}
    return {**result, "status": "ok"}


def _input(walk: _Walk, folder: Path, entry: dict[str, Any], stack: list[tuple[str, Path]]) -> dict[str, Any]:
    result: dict[str, Any] = {"role": entry["role"], "spec": entry.get("spec"), "sha256": entry.get("sha256")}
    if isinstance(entry.get("model"), dict):
        result["model_facts"] = entry["model"]  # what the store and catalog said (source, license)
    for flag, status in (("endpoint", "endpoint"), ("builtin", "builtin"), ("missing", "unrecorded")):
        if entry.get(flag):
            return {**result, "status": status}
    path = _where(folder, entry)
    result["path"] = str(path)
    if not walk.allowed(path):
        return {**result, "status": "outside"}
    label = f"{folder}: input {entry['role']} {path}"
    if not path.exists():
        walk.problems.append(f"{label}: missing")
        return {**result, "status": "missing"}
    parent = find_parent(path, within=walk.roots)
    try:
        now = input_hash(path, parent)
    except (OSError, WeightsmithError) as e:
        walk.problems.append(f"{label}: cannot be hashed ({e})")
        return {**result, "status": "missing"}
    result["status"] = "ok" if now == entry.get("sha256") else "changed"
    if result["status"] == "changed":
        result["now"] = now
        walk.problems.append(
            f"{label}: changed since it was used (sha256 {str(entry.get('sha256'))[:12]}, now {now[:12]})"
        )
    recorded = entry.get("lineage")
    if parent is None:
        if recorded:
            walk.problems.append(f"{label}: its lineage record is gone (was {recorded['id'][:12]})")
        return result
    result["parent"] = _parent(walk, label, entry, parent, stack)
    return result


def _where(folder: Path, entry: dict[str, Any]) -> Path:
    """Where an input is now: beside the artifact as recorded (a moved workspace), else its path."""
    rel = entry.get("relpath")
    if rel and (folder / rel).exists():
        return (folder / rel).resolve()
    return Path(entry.get("path") or rel or "").resolve()


def _parent(
    walk: _Walk, label: str, entry: dict[str, Any], parent: tuple[Path, dict, str], stack: list
) -> dict[str, Any]:
    pfile, _, part = parent
    try:
        record = read_record(pfile)
    except LineageError as e:
        walk.problems.append(f"{label}: {e}")
        return {"file": str(pfile), "error": str(e)}
    recorded = entry.get("lineage")
    if recorded and recorded["id"] != record["id"]:
        walk.problems.append(
            f"{label}: rebuilt since it was used (lineage id {recorded['id'][:12]}, now {record['id'][:12]})"
        )
    elif not recorded:
        walk.problems.append(f"{label}: was used without a lineage record; one was written since")
    expected = expected_hash(record, part)
    if expected is not None and entry.get("sha256") != expected:
        walk.problems.append(f"{label}: differs from what {pfile} recorded when it was written")
    if record["id"] in walk.shown and not any(record["id"] == i for i, _ in stack):
        return {"id": record["id"], "kind": record["kind"], "file": str(pfile), "shown_above": True}
    return _node(walk, pfile, record, stack)
