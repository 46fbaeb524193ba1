"""Small file primitives every writer shares: JSON reading with errors that name the
file and line, and the one way weightsmith replaces a file or a directory atomically.

Atomic writing, for every writer in the package: build the new content beside the target
(a hidden temp file or directory in the same folder, so the rename stays on one filesystem),
fsync it, rename it over the target, fsync the folder. Readers see the old content or the
whole new one, never half; a failure leaves the old content and no temp file behind.

  write_text_atomic / write_json_atomic   a whole text or JSON file at once
  atomic_file(path)                       a temp path any writer fills (safetensors, GGUF, PNG)
  atomic_dir(path) / replace_dir(...)     a directory built in a temp sibling, then swapped in

Not here: anything format-specific (safetensors, GGUF, YAML), or the layout under
`weightsmith_home()` (the model store is checkpoint/store.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, UsageError, WeightsmithError


def weightsmith_home() -> Path:
    """`$WEIGHTSMITH_HOME`, or ``~/.cache/weightsmith``."""
    env = os.environ.get("WEIGHTSMITH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "weightsmith"


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
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for any writer to fill; on success it replaces `path`.

    The temp file exists (empty) when yielded, in the same directory, named `.NAME.*.tmp`.
    When the block ends it is made world-readable, fsynced and renamed over `path`, and the
    directory is fsynced. When the block raises, the temp file is removed and `path` is left
    as it was; an OSError becomes a WeightsmithError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise WeightsmithError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; what weightsmith writes is not secret
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise WeightsmithError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: Path, *, markers: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; on success it replaces `path` (`replace_dir`).

    An existing `path` is checked first (`check_replaceable` with `markers`) so that nothing
    is built for an output that may not be replaced. When the block raises, the temp
    directory is removed and `path` is left as it was. OSErrors pass through unchanged.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        check_replaceable(path, markers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(path: Path, markers: tuple[str, ...] = (), flag: str = "--out") -> None:
    """Refuse to replace `path` unless it looks like an output weightsmith wrote.

    Never the root, the home folder, the current folder or a folder holding it (`--out .`
    or `..` would empty them); never a file or a symlink; and a non-empty folder only when
    it holds one of `markers` (e.g. config.json for a checkpoint). UsageError otherwise."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    why = None
    if real == Path(real.anchor) or real == Path(os.path.realpath(Path.home())):
        why = "is the root or home folder"
    elif is_inside(Path.cwd(), path):
        why = "is or holds the current folder"
    elif path.is_symlink() or not path.is_dir():
        why = "is not a folder"
    elif markers and any(path.iterdir()) and not any((path / m).is_file() for m in markers):
        why = f"does not look like a weightsmith output (no {' or '.join(markers)})"
    if why:
        raise UsageError(
            f"{path}: refusing to replace it with {flag} ... --overwrite: it {why}; choose a new "
            f"{flag} folder, or remove the old one yourself"
        )


def replace_dir(staged: Path, target: Path) -> None:
    """Rename the complete directory `staged` to `target` (same filesystem), replacing any old one.

    Everything under `staged` is fsynced first, and `target`'s folder after the rename. An
    existing `target` is moved aside (to a `.tmp-old-*` sibling) and deleted only once the
    rename has succeeded; if the rename fails it is put back, so the old or the new directory
    is always there. A target that is or holds the current folder, the home folder or the
    root is refused (UsageError) whoever the caller is.
    """
    if target.exists() or target.is_symlink():
        check_replaceable(target)
    fsync_tree(staged)
    old: Path | None = None
    if target.exists() or target.is_symlink():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=target.parent)) / target.name
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous directory back rather than lose it
            old.parent.rmdir()
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


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


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (and `root`): a rename of `root` is durable
    only once what it holds is on disk."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            fsync_dir(path)
        else:
            fsync_file(path)


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it once every symlink and `..` in both is resolved.

    The one containment check for paths a shared file names (task data, shard names, output
    names): a path that cannot be resolved (a NUL byte, a symlink loop) is not inside."""
    try:
        real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
    return real == root or root in real.parents


def is_plain_file_name(name: object) -> bool:
    """Whether `name` is one file name with no folder part: not empty, '.', '..', and no separator."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def builtin_file(spec: str, folder: Path, suffixes: tuple[str, ...], what: str) -> Path | None:
    """The shipped file a `builtin:NAME` spec names (None for any other spec).

    `folder` holds the built-in files of one kind (`what`, e.g. "policy"); an unknown name
    raises a UsageError with a did-you-mean and the list of built-in names."""
    import difflib

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
