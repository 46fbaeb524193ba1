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
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model\.embed_tokens\.weight"):
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
