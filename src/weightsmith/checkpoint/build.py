"""Build a model from named tensors: on the meta device first, then each tensor checked
against its parameter's shape, converted and assigned in place, so building never holds
two copies of the weights.

Shared by every full-precision source (safetensors, GGUF) and by the quantized-checkpoint
builder (weightsmith.checkpoint.quantized), which uses `assign_parameter` and
`IGNORED_SUFFIXES` for the tensors it keeps in full precision.

Not here: opening files or picking a builder (load.py), file formats (safetensors.py, gguf.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from weightsmith.errors import CheckpointError
from weightsmith.models import CausalLM, ModelConfig
from weightsmith.models.fused import split_name
from weightsmith.models.merged_experts import split_experts

#: Tensors some checkpoints carry that the model recomputes instead of loading.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

#: Called with the model and a tensor name right after that tensor is loaded.
TensorHook = Callable[[CausalLM, str], None]


def build_model(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor, str]],
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    decode_layout: bool = True,
    on_tensor: TensorHook | None = None,
    skeleton: CausalLM | None = None,
) -> CausalLM:
    """Build on meta, assign each `(name, tensor, source)` in place, verify nothing is missing.

    skeleton: the model on meta to fill instead of a new one, with some modules already
    replaced (GGUF blocks kept quantized, gguf_quants.py); their weights are not expected."""
    if skeleton is not None:
        model = skeleton
    else:
        with torch.device("meta"):
            model = CausalLM(cfg)
    params = dict(model.named_parameters())
    # A skeleton's kept blocks (gpt-oss's MXFP4 experts of an HF folder, keep_quantized) come as
    # their layers' `qweight` buffers.
    blocks = {n: b for n, b in model.named_buffers() if n.endswith(".qweight") and b.is_meta}
    tied = cfg.tie_word_embeddings
    for name, tensor, source in _split_fused(cfg, split_experts(cfg, tensors, bool(blocks)), params):
        if name in blocks:
            _assign_blocks(model, name, tensor, tuple(blocks.pop(name).shape), source, device)
            continue
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in params:
            raise CheckpointError(
                f"{source}: unexpected tensor {name!r} for a {cfg.model_type} model; "
                "the checkpoint does not match its config.json"
            )
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected} "
                "from config.json; the weights and config do not match"
            )
        assign_parameter(model, name, tensor.to(device=device, dtype=dtype))
        if on_tensor is not None:
            on_tensor(model, name)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta] + sorted(blocks)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{cfg.architecture}: checkpoint is missing tensors {shown}; re-download it")
    model.reset_rope()
    return model.eval()


def _split_fused(
    cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor, str]], params: dict[str, nn.Parameter]
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """The tensors with each fused one (Phi-3's `qkv_proj`, `gate_up_proj`) split by rows into
    the model's separate projections (models/fused.py)."""
    for name, tensor, source in tensors:
        parts = split_name(cfg, name)
        if parts is None or any(p not in params for p in parts):
            yield name, tensor, source  # unfused, or unexpected: reported by the caller
            continue
        rows = [params[p].shape[0] for p in parts]
        if tensor.ndim < 1 or tensor.shape[0] != sum(rows):
            raise CheckpointError(
                f"{source}: tensor {name!r} has {tuple(tensor.shape)[:1]} rows, expected {sum(rows)} "
                f"({' + '.join(map(str, rows))} for {', '.join(p.rsplit('.', 2)[-2] for p in parts)}) "
                "from config.json; the weights and config do not match"
            )
        for part, piece in zip(parts, tensor.split(rows), strict=True):
            yield part, piece.clone(), source  # own storage: views would be shared to safetensors


def _assign_blocks(
    model: nn.Module, name: str, value: torch.Tensor, shape: tuple[int, ...], source: str, device
) -> None:
    """Put a layer's quantized blocks (uint8 rows) in place of its meta `qweight` buffer."""
    if tuple(value.shape) != shape or value.dtype != torch.uint8:
        raise CheckpointError(
            f"{source}: tensor {name!r} holds {tuple(value.shape)} {value.dtype} blocks, expected {shape} "
            "uint8 from config.json; the weights and config do not match"
        )
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._buffers[attr] = value.to(device)


def assign_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of parameter `name` (e.g. a meta placeholder) as a frozen Parameter."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
