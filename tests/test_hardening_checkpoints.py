"""Hostile checkpoints (issue 16): an index that points outside its folder, overwriting a
folder that is not ours, malformed metadata, GGUF metadata that costs memory, kernels planted
in the cache, names shadowed by folders. Every refusal is one WeightsmithError line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from weightsmith.checkpoint import safetensors as st
from weightsmith.errors import CheckpointError


def _sharded(tiny_hf_dir: Path, tmp_path: Path, weight_map: dict) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_hf_dir, ckpt)
    index = {"metadata": {}, "weight_map": weight_map}
    (ckpt / st.INDEX_FILE).write_text(json.dumps(index))
    return ckpt


# -- item 17: the index names plain files inside the checkpoint folder ---------------------


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "", ".", 7, None]
)
def test_index_shard_outside_the_folder_is_refused(tiny_hf_dir, tmp_path, shard):
    (tmp_path / "outside.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes())
    ckpt = _sharded(tiny_hf_dir, tmp_path, {"model.embed_tokens.weight": shard})
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json.*model\.embed_tokens\.weight"
    ):
        st.weight_files(ckpt)


def test_index_shard_symlinked_outside_the_folder_is_refused(tiny_hf_dir, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes())
    ckpt = _sharded(tiny_hf_dir, tmp_path, {"model.embed_tokens.weight": "link.safetensors"})
    (ckpt / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match="link.safetensors.*not a file name inside"):
        st.weight_files(ckpt)


def test_index_with_plain_shard_names_loads(tiny_hf_dir, tmp_path):
    ckpt = _sharded(tiny_hf_dir, tmp_path, {"model.embed_tokens.weight": "model.safetensors"})
    assert st.weight_files(ckpt) == [ckpt / "model.safetensors"]


# -- item 3: --overwrite replaces only our own outputs, and never loses the old one --------


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    from weightsmith.checkpoint.load import load_checkpoint

    return load_checkpoint(tiny_hf_dir)


def test_overwrite_refuses_the_current_folder_and_its_parents(tiny, tmp_path, monkeypatch):
    from weightsmith.checkpoint.save import save_hf_dir
    from weightsmith.errors import UsageError

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(UsageError, match="--overwrite"):
            save_hf_dir(tiny.model, tiny.tokenizer, out, overwrite=True)
    assert (work / "notes.txt").read_text() == "keep me"


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tiny, tmp_path):
    from weightsmith.checkpoint.save import save_hf_dir
    from weightsmith.errors import UsageError

    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(UsageError, match=r"photos.*not look like"):
        save_hf_dir(tiny.model, tiny.tokenizer, out, overwrite=True)
    assert (out / "cat.jpg").read_bytes() == b"meow"


def test_quantize_overwrite_refuses_before_loading(tmp_path, monkeypatch):
    from weightsmith.commands.quantize import QuantizeConfig, check_quantize_args
    from weightsmith.errors import UsageError

    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--overwrite"):
        check_quantize_args(QuantizeConfig(model="x", to="int8", out=".", overwrite=True))


def test_overwrite_keeps_the_old_checkpoint_until_the_new_one_is_in(tiny, tmp_path, monkeypatch):
    from weightsmith import files
    from weightsmith.checkpoint.save import save_hf_dir

    out = save_hf_dir(tiny.model, tiny.tokenizer, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    real_replace = files.os.replace

    def crash_on_swap_in(src, dst):
        if Path(dst) == out and ".tmp-old-" not in str(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", crash_on_swap_in)
    with pytest.raises(OSError):
        save_hf_dir(tiny.model, tiny.tokenizer, out, overwrite=True)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_hf_dir(tiny.model, tiny.tokenizer, out, overwrite=True)  # a checkpoint of ours: replaced
    assert (out / "config.json").is_file()


# -- item 12: malformed metadata is one error line; export writes nothing it cannot finish ----


def _gguf_with(path: Path, **overrides) -> Path:
    """A tiny llama GGUF (metadata only) with some keys written with the wrong value type."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    keys = {
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.feed_forward_length": 128,
        "llama.context_length": 256,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        **overrides,
    }
    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((320, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("llama.block_count", "two"),
        ("llama.attention.layer_norm_rms_epsilon", "tiny"),
        ("llama.expert_count", "many"),
        ("llama.rope.freq_base", [1, 2]),
        ("tokenizer.ggml.tokens", [1, 2, 3]),
        ("tokenizer.ggml.bos_token_id", "<s>"),
        ("tokenizer.chat_template", 7),
    ],
)
def test_gguf_metadata_of_the_wrong_type_is_one_error(tmp_path, key, value):
    from weightsmith.checkpoint.gguf import read_gguf

    path = _gguf_with(tmp_path / "bad.gguf", **{key: value})
    with pytest.raises(CheckpointError, match=rf"bad\.gguf: GGUF metadata '{key}' .* expected"):
        read_gguf(path)


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", "hot"), ("top_k", [1]), ("do_sample", "yes"), ("top_p", True)]
)
def test_generation_config_of_the_wrong_type_is_one_error(tiny_hf_dir, tmp_path, field, value):
    from weightsmith.checkpoint.load import load_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_hf_dir, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, field: value}))
    with pytest.raises(CheckpointError, match=rf"generation_config\.json: {field}: expected"):
        load_checkpoint(ckpt)


def test_export_writes_nothing_when_the_modelfile_cannot_be_made(tiny, tmp_path, monkeypatch):
    from weightsmith.checkpoint import gguf_write, modelfile

    def broken(*args, **kwargs):
        raise CheckpointError("boom")

    monkeypatch.setattr(modelfile, "modelfile_text", broken)
    monkeypatch.setattr(gguf_write, "modelfile_text", broken, raising=False)
    with pytest.raises(CheckpointError, match="boom"):
        gguf_write.export_gguf(tiny, tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


# -- item 13: GGUF metadata costs memory bounded by what is read, not by the file ----------


def _raw_gguf(path: Path, *pairs: bytes) -> Path:
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(pairs)) + b"".join(pairs))
    return path


def _key(name: str, value_type: int) -> bytes:
    import struct

    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", value_type)


def _hostile_arrays(n: int) -> list[bytes]:
    import struct

    from gguf import GGUFValueType as VT

    shorts = _key("a.shorts", VT.ARRAY) + struct.pack("<IQ", VT.UINT16, n) + struct.pack("<H", 999) * n
    strings = (
        _key("a.strings", VT.ARRAY) + struct.pack("<IQ", VT.STRING, n) + (struct.pack("<Q", 1) + b"x") * n
    )
    nested = _key("a.nested", VT.ARRAY) + struct.pack("<IQ", VT.ARRAY, n // 4)
    nested += struct.pack("<IQ", VT.UINT8, 0) * (n // 4)
    return [shorts, strings, nested]


def test_gguf_metadata_memory_is_bounded(tmp_path):
    import tracemalloc

    from weightsmith.checkpoint.gguf_reader import GGUFFile

    path = _raw_gguf(tmp_path / "big.gguf", *_hostile_arrays(200_000))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        reader = GGUFFile.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size // 4, f"opening took {peak / size:.1f}x the file's size"
    assert reader.fields["a.strings"].contents()[:2] == ["x", "x"]  # still readable when asked


def test_gguf_counts_have_a_hard_cap(tmp_path, monkeypatch):
    from weightsmith.checkpoint import gguf_reader

    path = _raw_gguf(tmp_path / "many.gguf", *_hostile_arrays(40))
    monkeypatch.setattr(gguf_reader, "MAX_ARRAY_ITEMS", 20)
    with pytest.raises(CheckpointError, match=r"many\.gguf: .*40 items, more than the 20"):
        gguf_reader.GGUFFile.open(path)
    monkeypatch.setattr(gguf_reader, "MAX_METADATA_KEYS", 2)
    with pytest.raises(CheckpointError, match="3 metadata entries, more than the 2"):
        gguf_reader.GGUFFile.open(path)


# -- item 15: a folder in the current directory never shadows a store or catalog name -------


def test_a_bare_name_is_never_a_local_folder(tmp_path, monkeypatch):
    from weightsmith.checkpoint import pull, store
    from weightsmith.checkpoint.store import StoreEntry
    from weightsmith.errors import ModelNotFoundError

    stored = tmp_path / "store-copy"
    stored.mkdir()
    entry = StoreEntry("smollm2-135m-instruct", "hf", stored, "pypi:x", None, None, None, "")
    monkeypatch.setattr(store, "get_entry", lambda name: entry if name == entry.name else None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()  # a hostile or accidental folder of that name
    assert pull.resolve("smollm2-135m-instruct") == stored
    assert pull.resolve("./smollm2-135m-instruct") == Path("smollm2-135m-instruct")
    (tmp_path / "mine").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"write it as a path: \./mine"):
        pull.resolve("mine")


# -- item 16: text from files and paths is printed as text, never as rich markup ------------


def test_rich_markup_in_a_registered_path_is_printed_as_text(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    from weightsmith.cli.main import main

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    odd = tmp_path / "[bold]" / "[" / "x]"
    shutil.copytree(tiny_hf_dir, odd)
    assert main(["pull", str(odd), "--name", "odd"]) == 0
    assert main(["models"]) == 0
    assert main(["info", "odd"]) == 0
    out = capsys.readouterr().out
    assert "[bold]" in out and "[/x]" in out.replace("\n", "")


# -- item 11: only a kernel library we built and recorded is loaded --------------------------


@pytest.fixture
def kernel_home(tmp_path, monkeypatch):
    """A store whose kernel folder holds the library and sidecar as a build leaves them (copied
    from the user's store, where the suite builds it once, rather than built again here)."""
    from conftest import user_store_home

    from weightsmith.quant import cpu_kernels

    monkeypatch.delenv("WEIGHTSMITH_CPU_KERNELS", raising=False)
    built = cpu_kernels._build(user_store_home() / "kernels")
    if built is None:
        pytest.skip("no working C compiler: the kernels cannot be built here")
    home = tmp_path / "home" / "kernels"
    home.mkdir(mode=0o700, parents=True)
    for path in (built, cpu_kernels._sidecar(built)):
        shutil.copy2(path, home / path.name)
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    copied = (home / built.name).stat().st_mtime_ns
    assert cpu_kernels.library() is not None
    assert (home / built.name).stat().st_mtime_ns == copied  # loaded as it was: verified, not rebuilt
    monkeypatch.setattr(cpu_kernels, "_state", {})
    return home


def test_a_planted_kernel_library_is_rebuilt_not_loaded(kernel_home, monkeypatch):
    import subprocess

    from weightsmith.quant import cpu_kernels

    built = next(kernel_home.glob("cpu_kernels-*.so"))
    assert oct(kernel_home.stat().st_mode & 0o777) == oct(0o700)
    good = built.read_bytes()
    builds: list[Path] = []

    def compile_good(flags, tmp, out):  # the compiler's output, as a build of these sources gave it
        builds.append(out)
        out.write_bytes(good)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(cpu_kernels, "_compile", compile_good)
    built.unlink()  # a new file, not a write into the library this process has mapped
    built.write_bytes(b"\x7fELF planted by someone else")  # what a load would run
    assert cpu_kernels.library() is not None  # rebuilt: the sidecar's sha256 did not match
    assert built.read_bytes() == good and [b.name for b in builds] == [built.name]
    assert builds[0].parent != kernel_home  # written aside, then moved over the planted file


def test_a_changed_build_recipe_builds_a_library_of_its_own(tmp_path, monkeypatch):
    """The library's key covers each source's compile flags, not only the link's: a build made
    by an older recipe from the same sources is not loaded in place of the current one."""
    import subprocess

    from weightsmith.quant import cpu_kernels

    monkeypatch.setenv("CC", "cc")
    asked: list[str] = []

    def refuse(flags, tmp, out):  # record the library each attempt would write; build nothing
        asked.append(out.name)
        return subprocess.CompletedProcess([], 1, "", "not built in this test")

    monkeypatch.setattr(cpu_kernels, "_compile", refuse)
    assert cpu_kernels._build(tmp_path / "k") is None
    jobs = cpu_kernels._jobs
    monkeypatch.setattr(cpu_kernels, "_jobs", lambda flags: [([*f, "-O1"], s) for f, s in jobs(flags)])
    assert cpu_kernels._build(tmp_path / "k") is None
    half = len(asked) // 2
    assert half == 2 and not set(asked[:half]) & set(asked[half:])  # with and without OpenMP, each new


def test_a_kernel_folder_others_can_write_is_not_used(kernel_home, caplog):
    import logging
    import os

    from weightsmith.quant import cpu_kernels

    os.chmod(kernel_home, 0o777)
    with caplog.at_level(logging.WARNING, logger="weightsmith.quant.cpu_kernels"):
        assert cpu_kernels.library() is None
    assert "writable by other users" in caplog.text
