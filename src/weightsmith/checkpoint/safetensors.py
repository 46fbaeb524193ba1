"""Read Hugging Face checkpoint directories: config.json, generation_config.json (typed) and
weights in single or sharded safetensors files (memory-mapped, one tensor at a time).

Pickle weights (`pytorch_model.bin`, `*.pt`) can run arbitrary code when unpickled,
so they are refused unless the caller opts in, and even then loaded with
`torch.load(weights_only=True)`. Not here: building the model (load.py) or the
tokenizer (weightsmith.tokenizer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from weightsmith.errors import CheckpointError
from weightsmith.files import is_inside, is_plain_file_name, read_json

INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "consolidated*.pth")


#: generation_config.json fields weightsmith reads, and the JSON kind each must have.
GENERATION_FIELDS = {
    "temperature": "number",
    "top_p": "number",
    "min_p": "number",
    "repetition_penalty": "number",
    "top_k": "integer",
    "max_new_tokens": "integer",
    "do_sample": "boolean",
    "bos_token_id": "token id",
    "eos_token_id": "token id",
    "pad_token_id": "token id",
}


def _is_kind(value: object, kind: str) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return is_int or isinstance(value, float)
    if kind == "integer":
        return is_int
    if kind == "boolean":
        return isinstance(value, bool)
    ids = value if isinstance(value, list) else [value]  # "token id": one or a list of them
    return all(isinstance(v, int) and not isinstance(v, bool) for v in ids)


def read_generation_config(path: Path) -> dict:
    """The checkpoint's generation_config.json ({} when absent), each field weightsmith reads
    checked for its JSON type (null means unset), so a bad value fails before any work."""
    file = path / "generation_config.json"
    data = read_json(file, required=False) or {}
    for key, kind in GENERATION_FIELDS.items():
        value = data.get(key)
        if value is not None and not _is_kind(value, kind):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
            raise CheckpointError(f"{file}: {key}: expected a {kind}, got {shown}; fix or remove the field")
    return data


def weight_files(path: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint directory, in load order."""
    index = path / INDEX_FILE
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        return _index_shards(index, weight_map)
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted({p for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]}: pickle weights can run code when loaded; pass --allow-pickle to load them "
                "anyway (with weights_only=True), or convert the checkpoint to safetensors"
            )
        return pickles
    raise CheckpointError(f"{path}: no weights found (expected *.safetensors or {INDEX_FILE})")


def _index_shards(index: Path, weight_map: dict) -> list[Path]:
    """The shard files an index names: plain file names inside its folder (symlinks resolved),
    each checked to exist; an index is shared data and must not reach other files."""
    shards: dict[str, str] = {}
    for tensor, name in weight_map.items():
        if not is_plain_file_name(name) or not is_inside(index.parent / name, index.parent):
            raise CheckpointError(
                f"{index}: weight_map.{tensor}: shard {name!r} is not a file name inside the checkpoint "
                "folder; an index may only name shard files beside it"
            )
        shards.setdefault(name, tensor)
    files = [index.parent / name for name in sorted(shards)]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing; re-download the checkpoint")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield `(name, tensor, file)` for every tensor, one at a time (mmap'd for safetensors)."""
    for f in files:
        if f.suffix == ".safetensors":
            yield from _iter_safetensors(f)
        else:
            yield from _iter_pickle(f)


def _iter_safetensors(f: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    try:
        handle = safe_open(str(f), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{f}: not a readable safetensors file ({_first_line(e)}); the file may be truncated, re-download it"
        ) from e
    with handle:
        for name in handle.keys():
            try:
                tensor = handle.get_tensor(name)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(
                    f"{f}: tensor {name!r} cannot be read ({_first_line(e)}); the file may be truncated"
                ) from e
            yield name, tensor, f


def _iter_pickle(f: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{f}: cannot be loaded with weights_only=True ({_first_line(e)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: expected a state dict of tensors, got {type(state).__name__}")
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield name, tensor, f


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
