"""The atomic writers in weightsmith.files: the new content appears whole or not at all."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from weightsmith import files
from weightsmith.errors import WeightsmithError
from weightsmith.files import atomic_dir, atomic_file, replace_dir, write_json_atomic, write_text_atomic


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_and_json_replace_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"
    write_text_atomic(path, "old\n")
    write_text_atomic(path, "new ü\n")
    assert path.read_text(encoding="utf-8") == "new ü\n"
    write_json_atomic(tmp_path / "b.json", {"k": "ü"})
    assert json.loads((tmp_path / "b.json").read_text(encoding="utf-8")) == {"k": "ü"}
    assert listing(tmp_path) == ["b.json", "sub"] and listing(path.parent) == ["a.txt"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.bin.")
        tmp.write_bytes(b"half of the new")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == ["model.bin"]


def test_os_error_names_the_target(tmp_path: Path) -> None:
    path = tmp_path / "out.gguf"
    with pytest.raises(WeightsmithError, match=f"cannot write {path}: No space left"), atomic_file(path):
        raise OSError(28, "No space left on device")
    assert listing(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsmithError, match="cannot write"):
        write_text_atomic(tmp_path / "file" / "below.txt", "a file is not a folder")


def test_atomic_dir_swaps_in_the_new_directory(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    for text in ["one", "two", "three"]:
        with atomic_dir(out, markers=("config.json",)) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
            (tmp / "config.json").write_text(text)
            (tmp / "nested").mkdir()
        assert listing(out) == ["config.json", "nested"] and (out / "config.json").read_text() == text
        assert listing(tmp_path) == ["ckpt"]


def test_atomic_dir_failure_keeps_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("writer failed")
    assert (out / "config.json").read_text() == "old"
    assert listing(tmp_path) == ["ckpt"]


def test_replace_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    target, staged = tmp_path / "entry", tmp_path / ".staged"
    for d, text in [(target, "old"), (staged, "new")]:
        d.mkdir()
        (d / "manifest.json").write_text(text)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == staged:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError):
        replace_dir(staged, target)
    assert (target / "manifest.json").read_text() == "old"
    monkeypatch.setattr(files.os, "replace", real_replace)
    replace_dir(staged, target)
    assert (target / "manifest.json").read_text() == "new"
    assert listing(tmp_path) == ["entry"]  # the old entry's aside folder is gone too
