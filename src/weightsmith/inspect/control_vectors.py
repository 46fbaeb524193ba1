"""llama.cpp's control vectors (`llama-cli --control-vector FILE`, repeng's and llama.cpp's
`cvector-generator`'s files), both ways, as steering directions.

The format: a GGUF file with `general.architecture = "controlvector"`, `controlvector.model_hint`
(the model's llama.cpp architecture) and `controlvector.layer_count`, and one F32 vector of the
model's width per steered layer, `direction.N` (N >= 1). llama.cpp adds `direction.N` (times the
strength asked for) to layer N's output, at every position: the stream entering layer N + 1, or
for the last layer the final stream before the norm, the points `--steer FILE:layer=L` adds at
(L = N + 1). Layer 0's output has no tensor in llama.cpp's loader, so the stream entering layers 0
and 1 cannot be steered through such a file.

- `read_control_vector` turns a file into a `Direction` whose vectors hold each steered layer's
  direction (zero elsewhere), marked as a control vector: `--steer FILE.gguf[:scale=S]` adds every
  layer's at once, as llama.cpp does (strength S, default 1), and `serve --direction NAME=FILE.gguf`
  offers it per request. The file carries no weights fingerprint: its width and depth are checked.
- `write_control_vector` writes the additions of `--steer`-style specs on weightsmith direction
  files (`inspect direction`) as one such file: `export MODEL --steer SPEC --out FILE.gguf`.

Not here: difference-of-means directions and their files (directions.py), applying them (steering.py).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from weightsmith.checkpoint.gguf import meta, open_gguf
from weightsmith.checkpoint.gguf_write import write_out
from weightsmith.errors import CheckpointError
from weightsmith.files import atomic_file
from weightsmith.inspect.directions import Direction
from weightsmith.inspect.hooks import InspectError

ARCH = "controlvector"
#: `Direction.meta["format"]` of a direction read from a control vector file.
FORMAT = "llama.cpp-control-vector"


def is_control_vector_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def read_control_vector(path: str | Path, *, hidden_size: int, num_layers: int) -> Direction:
    """A control vector file checked against a model's width and depth; one line if it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise InspectError(f"no control vector file at {path}")
    try:
        reader = open_gguf(path)
    except CheckpointError as e:
        raise InspectError(str(e)) from None
    arch = meta(reader, "general.architecture")
    if arch != ARCH:
        raise InspectError(
            f"{path}: general.architecture is {arch!r}, not {ARCH!r}; it is not a control vector file"
        )
    vectors = torch.zeros(num_layers + 1, hidden_size)
    for tensor in reader.tensors:
        stem, _, index = tensor.name.partition(".")
        if stem != "direction" or not index.isdigit() or int(index) < 1:
            raise InspectError(
                f"{path}: tensor {tensor.name!r} is not direction.N with N >= 1, as llama.cpp reads them"
            )
        n = int(index)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise InspectError(f"{path}: {tensor.name} must be a 1-D F32 tensor, as llama.cpp reads them")
        if int(tensor.shape[0]) != hidden_size:
            raise InspectError(
                f"{path}: {tensor.name} has width {int(tensor.shape[0])} but this model's hidden size is {hidden_size}"
            )
        if n >= num_layers:
            raise InspectError(
                f"{path}: {tensor.name} steers layer {n}'s output but this model has {num_layers} layers (0-{num_layers - 1})"
            )
        values = np.asarray(tensor.data, dtype=np.float32)
        if not np.isfinite(values).all():
            raise InspectError(f"{path}: {tensor.name} holds NaN or infinite values")
        vectors[n + 1] += torch.from_numpy(
            values.copy()
        )  # several tensors for one layer add up, as in llama.cpp
    if not reader.tensors:
        raise InspectError(f"{path}: holds no direction tensors")
    hint = meta(reader, f"{ARCH}.model_hint")
    return Direction(vectors, layer=-1, meta={"format": FORMAT, "model_hint": str(hint or "")})


def is_control_vector(direction: Direction) -> bool:
    return direction.meta.get("format") == FORMAT


def steered_layers(direction: Direction) -> list[int]:
    """The stream indices a control vector adds at (those with a nonzero vector)."""
    return [i for i in range(direction.vectors.shape[0]) if float(direction.vectors[i].norm()) > 0]


def write_control_vector(
    path: str | Path, additions: list[tuple[int, torch.Tensor]], *, num_layers: int, model_hint: str
) -> dict:
    """Write (stream index L, vector to add there) pairs as a control vector file at `path`,
    atomically: `direction.(L-1)`, pairs at one index summed. L must be 2 to num_layers."""
    path = Path(path)
    summed: dict[int, torch.Tensor] = {}
    for layer, vector in additions:
        if not 2 <= layer <= num_layers:
            raise InspectError(
                f"layer {layer}: llama.cpp steers layer N's output for N >= 1, the stream entering layer N + 1 "
                f"(the final stream: layer {num_layers}); pick a layer from 2 to {num_layers}"
            )
        summed[layer] = summed.get(layer, torch.zeros_like(vector)) + vector.float()
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_int32(f"{ARCH}.layer_count", len(summed))
        for layer in sorted(summed):
            writer.add_tensor(f"direction.{layer - 1}", summed[layer].numpy().astype(np.float32))
        write_out(writer)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "layers": [layer - 1 for layer in sorted(summed)],
    }
