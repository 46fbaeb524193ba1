"""Small file primitives every writer shares: JSON reading with errors that name the
file and line, atomic text writes (temp file in the same directory, fsync, rename)
and directory fsync. Not here: anything format-specific (safetensors, GGUF, YAML)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, WeightsmithError


def read_json(path: Path, *, required: bool = True) -> dict[str, Any] | None:
    """Parse a JSON object; a missing required file or bad JSON names the file (and line).
    A missing optional file gives None."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file not found; an HF checkpoint directory needs it")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix or re-download the file"
        ) from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason}); re-download the file") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WeightsmithError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; these files are not secret
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WeightsmithError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def fsync_file(path: Path) -> None:
    """Flush a file's contents to disk (before renaming it into place)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable where the platform allows it."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def builtin_file(spec: str, folder: Path, suffixes: tuple[str, ...], what: str) -> Path | None:
    """The shipped file a `builtin:NAME` spec names (None for any other spec).

    `folder` holds the built-in files of one kind (`what`, e.g. "policy"); an unknown name
    raises a UsageError with a did-you-mean and the list of built-in names."""
    import difflib

    from weightsmith.errors import UsageError

    if not spec.strip().startswith("builtin:"):
        return None
    name = spec.strip()[len("builtin:") :]
    for suffix in suffixes:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    names = sorted({p.name[: -len(s)] for s in suffixes for p in folder.glob(f"*{s}")})
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean 'builtin:{close[0]}'?" if close else f"built-in: {', '.join(names)}"
    raise UsageError(f"unknown built-in {what} {spec.strip()!r}; {hint}")


def json_object_line(line: str, where: str, what: str, error: type[Exception]) -> dict[str, Any]:
    """One line of a JSON-lines file as a dict; else `error` naming `where` (FILE:LINE)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(
            f"{where}: invalid JSON ({e.msg} at column {e.colno}); write one {what} per line as a JSON object"
        ) from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object ({what}), got {type(obj).__name__}")
    return obj
