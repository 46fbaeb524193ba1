"""Steering a model with a direction file while it generates: activation addition and
directional ablation, for a whole process or per batch row.

A spec is `FILE:layer=L:scale=S` (add S times the layer-L difference of means to the stream
entering layer L, at every position: Turner et al. 2023, Arditi et al. 2024 eq. 3; L = the
number of layers means the final stream; scale is in units of the difference of means, so 1
moves the negative set's mean onto the positive one's) or `FILE:ablate` (remove the layer's
direction, made unit length, from everything written into the stream, the embedding and every
attention and MLP output, at every position, so the stream never holds it: Arditi et al.'s
directional ablation, equivalent to their weight orthogonalisation). `FILE:ablate:layer=L`
picks which layer's direction to ablate; without it the file's recommended layer.
`FILE:add` adds the direction the way `inspect direction --select` chose for addition (its own
prompt position's directions, layer and scale, from the file); `:layer=L`/`:scale=S` override.
`FILE.gguf[:scale=S]` is llama.cpp's control vector (control_vectors.py): every layer it holds
added at strength S (default 1), as llama.cpp adds it. `additions` gives an adding spec's
(layer, vector, scale) triples, which `export --steer` writes as such a file.

`Steering(model, specs).start()` keeps the hooks on until `stop()`: every forward, prefill and
decode, runs the hooked (PyTorch) path. `row_edits` makes edits that steer only some rows of
a batch (the server's per-request `steer` field). Every file is read and checked against the
model (width, layers, weights fingerprint) before any of it is applied.

Not here: directions and their files (directions.py), hook points (hooks.py).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightsmith.inspect.control_vectors import (
    is_control_vector,
    is_control_vector_path,
    read_control_vector,
    steered_layers,
)
from weightsmith.inspect.directions import Direction, check_layer, read_direction
from weightsmith.inspect.hooks import Edit, HookState, InspectError, hooked
from weightsmith.inspect.interventions import Add, ProjectOut
from weightsmith.models.fingerprint import model_fingerprint
from weightsmith.models.model import CausalLM

_OPTION = re.compile(r"ablate|add|(layer|scale)=.*")


@dataclass(frozen=True)
class SteerSpec:
    """One `--steer` value, parsed."""

    path: Path
    ablate: bool
    layer: int | None = None
    scale: float | None = None
    text: str = field(default="", compare=False)
    add: bool = False  # the file's recommended addition (its add_directions, layer and scale)


def parse_steer(spec: str) -> SteerSpec:
    """`FILE:layer=L:scale=S` or `FILE:ablate[:layer=L]` -> SteerSpec; a bad one -> one line."""
    parts = spec.split(":")
    i = len(parts)
    while i > 1 and _OPTION.fullmatch(parts[i - 1]):
        i -= 1
    path, options = ":".join(parts[:i]), parts[i:]
    if not path:
        raise InspectError(
            f"--steer {spec!r}: give the direction file first, e.g. dirs/refusal.safetensors:ablate"
        )
    values: dict[str, str] = dict(o.split("=", 1) for o in options if "=" in o)
    try:
        layer = int(values["layer"]) if "layer" in values else None
        scale = float(values["scale"]) if "scale" in values else None
    except ValueError:
        raise InspectError(f"--steer {spec!r}: layer must be an integer and scale a number") from None
    ablate, add = "ablate" in options, "add" in options
    if not options and is_control_vector_path(path):  # llama.cpp's control vector: at strength 1
        return SteerSpec(Path(path), False, None, None, spec)
    if ablate == (scale is not None or add):
        raise InspectError(
            f"--steer {spec!r}: give either scale=S or add (add the direction) or ablate (remove it), "
            "e.g. FILE:layer=12:scale=2, FILE:add or FILE:ablate"
        )
    return SteerSpec(Path(path), ablate, layer, scale, spec, add)


def edits_for(spec: SteerSpec, direction: Direction, n_layers: int) -> dict[str, list[Edit]]:
    """The hook edits that carry out one spec."""
    if spec.ablate and not is_control_vector(direction):
        check_layer(spec.layer, n_layers, f"--steer {spec.text}: layer")
        layer = direction.layer if spec.layer is None else spec.layer
        return ablation_edits(_nonzero(spec, direction.vectors, layer), n_layers)
    edits: dict[str, list[Edit]] = {}
    for layer, vector, scale in additions(spec, direction, n_layers):
        for name, fns in addition_edits(vector, layer, scale, n_layers).items():
            edits.setdefault(name, []).extend(fns)
    return edits


def additions(spec: SteerSpec, direction: Direction, n_layers: int) -> list[tuple[int, torch.Tensor, float]]:
    """(stream index, vector, scale) for each addition an adding spec makes: one for a direction
    file, every layer a control vector holds (at `scale`, default 1) for a control vector."""
    if is_control_vector(direction):
        if spec.ablate or spec.add or spec.layer is not None:
            raise InspectError(
                f"--steer {spec.text}: a control vector adds at every layer it holds, as llama.cpp does; "
                "give FILE or FILE:scale=S"
            )
        scale = 1.0 if spec.scale is None else float(spec.scale)
        return [(layer, direction.vectors[layer], scale) for layer in steered_layers(direction)]
    check_layer(spec.layer, n_layers, f"--steer {spec.text}: layer")
    if spec.ablate:
        raise InspectError(
            f"--steer {spec.text}: removes a direction, which a control vector cannot (it only adds)"
        )
    if spec.add:
        return [_recommended_addition(spec, direction, n_layers)]
    layer = direction.layer if spec.layer is None else spec.layer
    return [(layer, _nonzero(spec, direction.vectors, layer), float(spec.scale))]  # type: ignore[arg-type]


def _nonzero(spec: SteerSpec, vectors: torch.Tensor, layer: int) -> torch.Tensor:
    if float(vectors[layer].norm()) == 0.0:
        raise InspectError(
            f"--steer {spec.text}: the direction at layer {layer} is zero (the sets do not differ there); pick another layer"
        )
    return vectors[layer]


def _recommended_addition(
    spec: SteerSpec, direction: Direction, n_layers: int
) -> tuple[int, torch.Tensor, float]:
    """`FILE:add[:layer=L][:scale=S]`: the file's addition choice, its layer and scale unless given."""
    try:
        rec = json.loads(direction.meta.get("recommended_add") or "null")
        layer, scale = int(rec["layer"]), float(rec["scale"])
    except (ValueError, TypeError, KeyError):
        raise InspectError(
            f"--steer {spec.text}: the file has no recommended addition (make it with `inspect direction "
            "--select`); give FILE:layer=L:scale=S instead"
        ) from None
    layer = layer if spec.layer is None else spec.layer
    check_layer(layer, n_layers, f"--steer {spec.text}: layer")
    vectors = direction.vectors if direction.add_vectors is None else direction.add_vectors
    return layer, _nonzero(spec, vectors, layer), scale if spec.scale is None else float(spec.scale)


def read_steer_file(path: Path, *, hidden_size: int, num_layers: int, fingerprint: str | None) -> Direction:
    """A direction file (`inspect direction`), or llama.cpp's control vector (`.gguf`), checked against a model."""
    if is_control_vector_path(path):
        return read_control_vector(path, hidden_size=hidden_size, num_layers=num_layers)
    return read_direction(path, hidden_size=hidden_size, num_layers=num_layers, fingerprint=fingerprint)


def ablation_edits(vector: torch.Tensor, n_layers: int) -> dict[str, list[Edit]]:
    """Remove `vector`'s direction from everything written into the stream (the embedding and
    every attention and MLP output), at every position."""
    ablate = ProjectOut(vector)
    names = ["hook_embed"] + [
        f"blocks.{i}.{h}" for i in range(n_layers) for h in ("hook_attn_out", "hook_mlp_out")
    ]
    return {name: [ablate] for name in names}


def addition_edits(vector: torch.Tensor, layer: int, scale: float, n_layers: int) -> dict[str, list[Edit]]:
    """Add `scale * vector` to the stream entering `layer` (n_layers: the final stream), at every position."""
    name = f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
    return {name: [Add(vector, scale)]}


def load_steering(
    model: CausalLM, specs: Sequence[str | SteerSpec], fingerprint: str | None = None
) -> dict[str, list[Edit]]:
    """Every spec parsed, its file read and checked against `model`, merged into one edit table."""
    parsed = [s if isinstance(s, SteerSpec) else parse_steer(s) for s in specs]
    if not parsed:
        return {}
    fingerprint = fingerprint or model_fingerprint(model)
    n_layers = len(model.model.layers)
    edits: dict[str, list[Edit]] = {}
    for spec in parsed:
        direction = read_steer_file(
            spec.path, hidden_size=model.config.hidden_size, num_layers=n_layers, fingerprint=fingerprint
        )
        for name, fns in edits_for(spec, direction, n_layers).items():
            edits.setdefault(name, []).extend(fns)
    return edits


class Steering:
    """Hooks that steer `model` from `start()` to `stop()` (see the module doc)."""

    def __init__(
        self, model: CausalLM, specs: Sequence[str | SteerSpec], fingerprint: str | None = None
    ) -> None:
        self.model = model
        self.specs = [s if isinstance(s, SteerSpec) else parse_steer(s) for s in specs]
        self.edits = load_steering(model, self.specs, fingerprint)
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> Steering:
        if self._stack is None and self.edits:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(hooked(self.model, HookState(self.edits)))
        return self

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __enter__(self) -> Steering:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> list[str]:
        return [s.text for s in self.specs]


def row_edits(per_row: Sequence[dict[str, list[Edit]] | None]) -> dict[str, list[Edit]]:
    """One edit table for a batch whose row r gets `per_row[r]`'s edits (None: left alone)."""
    names = {name for table in per_row if table for name in table}

    def for_name(name: str) -> Edit:
        def edit(x: torch.Tensor, _: str) -> torch.Tensor:
            rows = []
            for r in range(x.shape[0]):
                row = x[r : r + 1]
                for fn in (per_row[r] or {}).get(name, ()) if r < len(per_row) else ():
                    row = fn(row, name)
                rows.append(row)
            return torch.cat(rows)

        return edit

    return {name: [for_name(name)] for name in names}
