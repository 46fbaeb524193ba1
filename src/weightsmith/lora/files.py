"""LoRA adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

`save_adapter` writes one adapter of a model (keys `base_model.model.<module>.lora_A.weight`,
each file replaced atomically); `load_adapter` reads a PEFT adapter directory into a model,
checking the config, every tensor's name and shape and that nothing is missing before the
model is touched, so adapters move between weightsmith and transformers + peft unchanged.
DoRA adapters carry each module's `lora_magnitude_vector` too.
Pickle adapters (`adapter_model.bin`) are refused: they can run code. Models whose checkpoint
fuses projections (Phi-3) keep the checkpoint's names in the file (lora/fused.py); LoRA on a MoE
layer's experts and router is read and written as PEFT's `target_parameters` (lora/experts.py).

Not here: the layers, targeting and merging (weightsmith.lora.layers); PEFT's config
schema (lora_config.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.files import atomic_file, read_json, write_json_atomic
from weightsmith.lora.experts import fuse_parameters, parameter_modules, unfuse_parameters
from weightsmith.lora.fused import AdapterTensors, fuse_adapter, unfuse_adapter
from weightsmith.lora.layers import apply_lora, layers_with, lora_layers, resolve_targets
from weightsmith.lora_config import CONFIG_FILE, KEY_PREFIX, MAGNITUDE, SCORE_HEAD, WEIGHTS_FILE, LoraConfig
from weightsmith.models.model import SparseMoE

if TYPE_CHECKING:
    from weightsmith.models import ModelConfig


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys (`base_model.model.<module>.lora_A.weight`)."""
    state = {}
    for module_name, layer in layers_with(model, name).items():
        state[f"{KEY_PREFIX}{module_name}.lora_A.weight"] = layer.lora_A[name].weight.detach()
        state[f"{KEY_PREFIX}{module_name}.lora_B.weight"] = layer.lora_B[name].weight.detach()
        if name in layer.lora_magnitude_vector:  # DoRA, under PEFT's file key (no ".weight")
            magnitude = layer.lora_magnitude_vector[name].weight
            state[f"{KEY_PREFIX}{module_name}.{MAGNITUDE}"] = magnitude.detach()
    return state


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    cfg: LoraConfig,
    *,
    name: str = "default",
    base_model: str | None = None,
    head: torch.Tensor | None = None,
) -> Path:
    """Write adapter `name` as a PEFT adapter directory (each file replaced atomically); with
    `head`, a reward model's: its score head weight too, as PEFT saves a SEQ_CLS adapter's
    `modules_to_save`."""
    directory = Path(directory)
    layers = layers_with(model, name)
    via = parameter_modules(model, cfg)
    for module_name, layer in layers.items():
        r, expected = layer.lora_A[name].out_features, cfg.rank_for(via.get(module_name, module_name))
        if r != expected:
            raise ConfigError(
                f"{module_name}: adapter {name!r} has rank {r} but the LoraConfig gives "
                f"{expected}; pass the config the adapter was created with"
            )
    state = {k: t.to("cpu").contiguous() for k, t in lora_state_dict(model, name).items()}
    outside_moe = [n for n in layers if not _in_moe(model, n)]
    peft = cfg.to_peft_dict(base_model, module_names=outside_moe)
    state, peft = fuse_adapter(model, cfg, state, peft)  # Phi-3: qkv_proj, gate_up_proj as PEFT has them
    state, peft = fuse_parameters(model, layers, name, state, peft)  # MoE: target_parameters
    if head is not None:
        state[KEY_PREFIX + "score.weight"] = head.detach().to("cpu").contiguous()
        peft.update(task_type="SEQ_CLS", modules_to_save=list(SCORE_HEAD))
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_FILE, peft)
    return directory


def _in_moe(model: nn.Module, module_name: str) -> bool:
    """Whether a module sits inside a MoE layer (an expert or the router)."""
    parent = module_name.rpartition(".")[0]
    while parent:
        if isinstance(model.get_submodule(parent), SparseMoE):
            return True
        parent = parent.rpartition(".")[0]
    return False


#: The score head's tensor in a reward model's adapter file, as PEFT saves `modules_to_save`.
SCORE_KEYS = {KEY_PREFIX + "score.weight", "score.weight"}


def head_weight(directory: str | Path) -> torch.Tensor:
    """A reward model adapter's score head weight (1, hidden)."""
    path = Path(directory) / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        found = [k for k in f.keys() if k in SCORE_KEYS]
        if not found:
            raise CheckpointError(
                f"{path}: no score head ({KEY_PREFIX}score.weight); is it a reward model's adapter?"
            )
        return f.get_tensor(found[0])


_FILE_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?:(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight|(?P<mag>lora_magnitude_vector)(?:\.[^.]+\.weight)?)"
)


def _read_adapter_tensors(path: Path) -> AdapterTensors:
    """{(module, "lora_A"|"lora_B"|MAGNITUDE): (file key, tensor)}; keys with or without PEFT's
    prefix and with or without an adapter-name infix (`lora_A.default.weight`). A reward model's
    score head (`SCORE_KEYS`) is left to `head_weight`."""
    out: AdapterTensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in SCORE_KEYS:
                    continue
                m = _FILE_KEY.fullmatch(key)
                if m is None:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} is not a LoRA linear weight; weightsmith loads LoRA and DoRA "
                        "on linear layers (no LoRA biases or embedding adapters); retrain without them"
                    )
                slot = (m["module"], m["part"] or MAGNITUDE)
                if slot in out:
                    raise CheckpointError(
                        f"{path}: tensors {out[slot][0]!r} and {key!r} are the same weight; keep one"
                    )
                out[slot] = (key, f.get_tensor(key))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); re-save or re-download it"
        ) from e
    return out


def _check_tensors(
    tensors: AdapterTensors,
    targets: dict[str, nn.Module],
    cfg: LoraConfig,
    path: Path,
    ranks: dict[str, tuple[int, float]],
) -> None:
    for (module_name, part), (key, t) in tensors.items():
        module = targets.get(module_name)
        if module is None:
            raise CheckpointError(
                f"{path}: tensor {key!r} is for {module_name}, which {CONFIG_FILE}'s target_modules do not "
                "select in this model; is this adapter for another base model?"
            )
        r = ranks[module_name][0] if module_name in ranks else cfg.rank_for(module_name)
        expected = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}.get(
            part, (module.out_features,)
        )
        if part == MAGNITUDE and not cfg.use_dora:
            raise CheckpointError(
                f"{path}: tensor {key!r} is a DoRA magnitude but {CONFIG_FILE} has no use_dora: true; "
                "set it, or drop the magnitudes"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"{path}: tensor {key!r} holds NaN or infinite values; the adapter is broken, retrain or re-save it"
            )
        if tuple(t.shape) != expected:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {expected} (rank {r} from "
                f"{CONFIG_FILE}); is this adapter for another base model?"
            )
    parts = ("lora_A", "lora_B", MAGNITUDE) if cfg.use_dora else ("lora_A", "lora_B")
    missing = [f"{m}.{p}" for m in targets for p in parts if (m, p) not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: no tensor for {missing[0]} ({len(missing)} missing in all), which {CONFIG_FILE} "
            "targets; the adapter file is incomplete, re-save it"
        )


def read_adapter_folder(
    directory: str | Path, *, reward: bool = False
) -> tuple[dict, AdapterTensors, Path, Path]:
    """A PEFT adapter folder's adapter_config.json contents and tensors (under the file's module
    names), with the two files' paths; refuses a folder that is not an adapter, a pickle adapter,
    and a reward model's adapter unless `reward` (and only it with `reward`)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if directory.is_file():
        raise CheckpointError(
            f"{directory}: a file, not an adapter; pass a PEFT adapter folder or llama.cpp's GGUF LoRA file (.gguf)"
        )
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: not found; a PEFT adapter directory needs {CONFIG_FILE}")
    raw = read_json(config_path)
    if (raw.get("task_type") == "SEQ_CLS") != reward:
        raise CheckpointError(
            f"{directory}: a reward model's adapter (it scores text; use it as a grpo reward, "
            "--reward model:DIR)"
            if not reward
            else f"{directory}: not a reward model's adapter (task_type "
            f"{raw.get('task_type')!r}; train one with weightsmith reward)"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{directory / 'adapter_model.bin'}: pickle adapters are not loaded (they can run code); convert "
                f"it to {WEIGHTS_FILE}, e.g. with peft: PeftModel.from_pretrained(...).save_pretrained(dir)"
            )
        raise CheckpointError(f"{weights}: not found; a PEFT adapter directory needs {WEIGHTS_FILE}")
    return raw, _read_adapter_tensors(weights), config_path, weights


def is_gguf_adapter(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (read as llama.cpp's LoRA adapter format, lora/gguf_files.py)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def read_adapter(
    model: nn.Module, path: str | Path, *, reward: bool = False
) -> tuple[LoraConfig, AdapterTensors, dict[str, tuple[int, float]]]:
    """An adapter's config and tensors under `model`'s module names, every name and shape checked
    against `model` (which is not touched; a model on the meta device will do). `path` is a PEFT
    adapter folder or a llama.cpp GGUF LoRA file. Returns (config, tensors, per-module (rank,
    scale) where the file sets them apart from the config, as MoE experts do)."""
    path = Path(path)
    if is_gguf_adapter(path):
        from weightsmith.lora.gguf_files import read_gguf_adapter

        if reward:
            raise CheckpointError(
                f"{path}: a GGUF LoRA file has no score head; pass the reward model's adapter folder"
            )
        raw, tensors = read_gguf_adapter(path, model.config)
        config_path = weights = path
    else:
        raw, tensors, config_path, weights = read_adapter_folder(path, reward=reward)
    cfg = LoraConfig.from_peft_dict(raw, str(config_path))
    cfg, tensors = unfuse_adapter(model, cfg, tensors)  # Phi-3: one LoRA per part of qkv_proj, gate_up_proj
    tensors, ranks = unfuse_parameters(model, cfg, tensors, weights)  # MoE: one LoRA per expert module
    targets = {n: m for n, m, _ in resolve_targets(model, cfg, str(config_path))}
    _check_tensors(tensors, targets, cfg, weights, ranks)
    return cfg, tensors, ranks


def load_adapter(
    model: nn.Module, path: str | Path, *, name: str = "default", reward: bool = False
) -> LoraConfig:
    """Read a PEFT adapter directory, or a llama.cpp GGUF LoRA file, into `model` as adapter
    `name` (made active). Everything is checked before the model is touched. A reward model's
    adapter (SEQ_CLS, with its score head) loads only with `reward` (its head is read by
    `head_weight`), and only it."""
    cfg, tensors, ranks = read_adapter(model, path, reward=reward)
    apply_lora(model, cfg, name, ranks=ranks)
    layers = lora_layers(model)
    with torch.no_grad():
        for (module_name, part), (_, t) in tensors.items():
            getattr(layers[module_name], part)[name].weight.copy_(t)
    return cfg


def write_gguf_adapter_file(
    folder: str | Path, config: ModelConfig, out: str | Path, quant: str = "f16"
) -> dict:
    """The PEFT adapter folder `folder` as llama.cpp's GGUF LoRA file at `out` for a base with
    `config` (lora/gguf_files.py); check it against the base with `read_adapter` first."""
    from weightsmith.lora.gguf_files import write_gguf_adapter

    raw, tensors, config_path, _ = read_adapter_folder(folder)
    cfg = LoraConfig.from_peft_dict(raw, str(config_path))
    name = Path(folder).resolve().name
    return write_gguf_adapter(cfg, tensors, config, out, quant, name=name, source=str(folder))
