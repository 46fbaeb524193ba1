"""The forks a merge combines, each as its task vector: its weights minus the base's, per tensor.

A fork is one of:

- a LoRA adapter folder (ours or PEFT's) trained on the base: loaded onto the base model as
  its own named adapter, so its delta is `scaling * B @ A` of each layer it adapts (zero
  elsewhere) and nothing but the small A and B is held;
- a full checkpoint of the same architecture (a full fine-tune, another fine-tune of the same
  pre-trained model): an HF folder whose safetensors hold every base tensor under the base's
  name and shape is read one tensor at a time from its memory-mapped files; anything else (a
  .gguf file, merged expert tensors, pickle weights with --allow-pickle) is loaded whole;
- the base itself (the same file or folder): a zero delta, for SLERP from the base to a fork.

Everything is opened and checked (architecture, tied embeddings, every tensor's shape) before
any weight changes: a fork that does not fit is one line naming it and the tensor.

Not here: the merge methods (methods.py) or the walk over the model (merge.py).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from weightsmith.checkpoint import safetensors as st
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.pull import resolve
from weightsmith.errors import CheckpointError
from weightsmith.files import read_json
from weightsmith.lora import LoRALinear, load_adapter, lora_layers
from weightsmith.models import ModelConfig

log = logging.getLogger(__name__)


class Fork(ABC):
    """A fork's delta for each base tensor name (None: the fork leaves it as the base has it)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    @abstractmethod
    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """The fork's value of tensor `name` minus `base` (the base's, fp32), in fp32."""


class BaseFork(Fork):
    """The base model itself: no delta anywhere."""

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        return None


class AdapterFork(Fork):
    """A LoRA adapter loaded onto the base model under its own name."""

    def __init__(self, spec: str, layers: dict[str, LoRALinear], adapter: str) -> None:
        super().__init__(spec)
        self.layers = {
            f"{module}.weight": layer for module, layer in layers.items() if adapter in layer.lora_A
        }
        self.adapter = adapter

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        layer = self.layers.get(name)
        return None if layer is None else layer.delta_weight(self.adapter)

    def is_dora(self) -> bool:
        return any(self.adapter in layer.lora_magnitude_vector for layer in self.layers.values())


class TensorFork(Fork):
    """A full checkpoint: tensors read on demand from its files, or held after a whole load."""

    def __init__(self, spec: str, read: dict[str, object]) -> None:
        super().__init__(spec)
        self.read = read  # name -> a safetensors handle, or the tensor itself

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        source = self.read[name]
        t = source if isinstance(source, torch.Tensor) else source.get_tensor(name)  # type: ignore[attr-defined]
        return t.to(base.device, torch.float32) - base


def is_adapter(path: Path) -> bool:
    """A PEFT adapter folder, or llama.cpp's GGUF LoRA file."""
    from weightsmith.lora.gguf_files import is_adapter_file

    return (path.is_dir() and (path / "adapter_config.json").is_file()) or is_adapter_file(path)


def open_forks(
    specs: list[str],
    model: nn.Module,
    base_path: Path,
    shapes: dict[str, torch.Size],
    stack: ExitStack,
    *,
    allow_pickle: bool = False,
) -> list[Fork]:
    """Open each `--fork` spec against the base `model` (loaded from `base_path`, whose
    parameters have `shapes`). Adapters are loaded onto `model` as `fork1`, `fork2`, ...;
    file handles stay open in `stack`."""
    forks: list[Fork] = []
    for i, spec in enumerate(specs, 1):
        path = resolve(spec)
        if is_adapter(path):
            try:
                load_adapter(model, path, name=f"fork{i}")
            except CheckpointError as e:
                raise CheckpointError(f"--fork {spec}: {e}") from None
            forks.append(AdapterFork(spec, lora_layers(model), f"fork{i}"))
        elif path.resolve() == base_path.resolve():
            forks.append(BaseFork(spec))
        else:
            forks.append(TensorFork(spec, _tensors(spec, path, model.config, shapes, stack, allow_pickle)))
    return forks


def _tensors(
    spec: str,
    path: Path,
    base: ModelConfig,
    shapes: dict[str, torch.Size],
    stack: ExitStack,
    allow_pickle: bool,
) -> dict[str, object]:
    """name -> where to read it, for every base tensor, after checking the fork fits the base."""
    if path.is_dir() and (path / "config.json").is_file():
        data = read_json(path / "config.json")
        if not data.get("quantization_config"):
            _check_config(spec, ModelConfig.from_hf(data, source=str(path / "config.json")), base)
            handles = _lazy(path, shapes, stack, allow_pickle)
            if handles is not None:
                return _checked(spec, {n: _shape(h, n) for n, h in handles.items()}, shapes, handles)
    log.info("--fork %s: loading it whole (its tensors are not stored under the base's names)", spec)
    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    _check_config(spec, ckpt.config, base)
    held = {n: p.detach() for n, p in ckpt.model.named_parameters()}
    return _checked(spec, {n: t.shape for n, t in held.items()}, shapes, held)


def _lazy(
    path: Path, shapes: dict[str, torch.Size], stack: ExitStack, allow_pickle: bool
) -> dict[str, object] | None:
    """name -> an open safetensors handle holding it, if every base tensor is stored by name."""
    files = st.weight_files(path, allow_pickle=allow_pickle)
    if any(f.suffix != ".safetensors" for f in files):
        return None
    where: dict[str, object] = {}
    for f in files:
        try:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{f}: not a readable safetensors file ({e}); re-download or re-save it"
            ) from e
        where.update(dict.fromkeys(handle.keys(), handle))
    return where if all(n in where for n in shapes) else None


def _shape(handle: object, name: str) -> torch.Size:
    return torch.Size(handle.get_slice(name).get_shape())  # type: ignore[attr-defined]


def _check_config(spec: str, fork: ModelConfig, base: ModelConfig) -> None:
    for key in ("model_type", "tie_word_embeddings"):
        mine, theirs = getattr(base, key), getattr(fork, key)
        if mine != theirs:
            raise CheckpointError(
                f"--fork {spec}: {key} is {theirs!r}, the base's is {mine!r}; forks must be fine-tunes of the "
                "same architecture as the base model"
            )


def _checked(
    spec: str, found: dict[str, torch.Size], shapes: dict[str, torch.Size], read: dict[str, object]
) -> dict[str, object]:
    for name, shape in shapes.items():
        if name not in found:
            raise CheckpointError(
                f"--fork {spec}: no tensor {name}, which the base model has; forks must be full-precision "
                "fine-tunes of the same architecture as the base"
            )
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(
                f"--fork {spec}: tensor {name} has shape {tuple(found[name])}, the base's is {tuple(shape)}; forks "
                "must be fine-tunes of the same model (same vocabulary and sizes)"
            )
    return {n: read[n] for n in shapes}
