"""Save and load weight-only quantized checkpoints (int8 / int4) as HF-style directories.

Layout (format_version 2; version 1, which had fp32 int4 scales and zeros, still loads:
its scales and zeros are rounded to fp16 on loading). A directory like any HF checkpoint (config.json,
generation_config.json, model.safetensors or shards with an index, tokenizer files),
where config.json also holds

    "quantization_config": {"quant_method": "weightsmith", "bits": 8 | 4,
                            "group_size": G | null, "format_version": 2,
                            "modules_not_quantized": ["lm_head", ...]}

and each quantized module `<m>` (e.g. `model.layers.0.self_attn.q_proj`) is stored as
  * `<m>.qweight`: int8 (N, K) for bits 8; uint8 (N, K/2) for bits 4, two 4-bit codes
    per byte, low nibble first (byte j of a row: code 2j in bits 0-3, 2j+1 in bits 4-7).
    This is a portable layout, not any kernel's packed one; kernels repack at load.
  * `<m>.scales`: fp32 (N,) for bits 8 (w = q * scale, q in -127..127);
    fp16 (N, K/G) for bits 4.
  * `<m>.zeros`: bits 4 only, fp16 (N, K/G): w = q * scale + zero, q in 0..15.
  * `<m>.bias` if the projection has one, in full precision.
An optional `"lm_head": {"bits": 8 | 4, "group_size": G | null}` entry gives the LM head
its own setting (int4 projections with an int8 head, as GGUF Q4 files have).
Every other tensor (embeddings, norms, an unquantized LM head) is stored as usual.
A quantized LM head unties it from the embedding (config `tie_word_embeddings: false`).

Loading builds Int8Linear / Int4Linear modules from these tensors directly: no
full-precision weight of a quantized module is ever materialised, and nothing is
requantized. Not here: the layers and the arithmetic (weight_only.py), GGUF.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.checkpoint.build import IGNORED_SUFFIXES, assign_parameter
from weightsmith.checkpoint.save import check_out_dir, write_hf_dir
from weightsmith.errors import CheckpointError
from weightsmith.models import CausalLM, ModelConfig
from weightsmith.quant.weight_only import (
    GROUP_SIZES,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    quantizable_modules,
    set_submodule,
)
from weightsmith.tokenizer import Tokenizer

QUANT_METHOD = "weightsmith"
FORMAT_VERSION = 2
#: Versions this loader reads (1: int4 scales and zeros in fp32).
READS_VERSIONS = (1, 2)


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The config.json entry describing `model`'s quantized modules."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not quantized:
        raise CheckpointError("the model has no quantized modules; call quantize_model first")
    blocks = [n for n, m in quantized.items() if not isinstance(m, (Int8Linear, Int4Linear))]
    if blocks:
        raise CheckpointError(
            f"{blocks[0]} holds a GGUF file's blocks (loaded with keep_quantized): this folder format "
            "has no place for them; load the file without --keep-quantized and use `weightsmith quantize`"
        )
    kinds = {n: (m.bits, getattr(m, "group_size", None)) for n, m in quantized.items()}
    body = {k for n, k in kinds.items() if n != "lm_head"} or set(kinds.values())
    if len(body) != 1:
        raise CheckpointError(
            f"mixed quantization settings {sorted(body)} cannot be saved: only the LM head may differ"
        )
    bits, group = body.pop()
    skipped = [n for n in quantizable_modules(model, lm_head=True) if n not in quantized]
    qcfg: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "bits": bits,
        "group_size": group,
        "format_version": FORMAT_VERSION,
        "modules_not_quantized": skipped,
    }
    if "lm_head" in kinds and kinds["lm_head"] != (bits, group):
        qcfg["lm_head"] = {"bits": kinds["lm_head"][0], "group_size": kinds["lm_head"][1]}
    return qcfg


def save_quantized(
    model: CausalLM,
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    generation_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (after quantize_model) to `out` atomically: a temp sibling, fsync, rename."""
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    qcfg = quantization_config(model)
    cfg = model.config.to_hf()
    cfg["quantization_config"] = qcfg
    return write_hf_dir(out, cfg, _state(model), tokenizer, generation_config, 2 * 1024**3)


def _state(model: CausalLM) -> dict[str, torch.Tensor]:
    """Parameters and the quantized modules' buffers, contiguous on CPU; a tied head once."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):  # its state dict: the portable layout, tiled or not
            for b, t in module.state_dict().items():
                state[f"{name}.{b}"] = t.cpu().contiguous()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def read_quantization_config(data: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The validated `quantization_config` of a config.json dict if it is ours, else None."""
    q = data.get("quantization_config")
    if (
        not q
        or isinstance(q, dict)
        and q.get("quant_method") == "mxfp4"
        and data.get("model_type") == "gpt_oss"
    ):
        return None  # gpt-oss's MXFP4 experts are decoded as they load (models/merged_experts.py)
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(
            f"{source}: quantization_config quant_method {method!r} is not supported; "
            f"weightsmith loads only its own ({QUANT_METHOD!r}) quantized checkpoints"
        )
    if q.get("format_version") not in READS_VERSIONS:
        raise CheckpointError(
            f"{source}: quantization_config format_version {q.get('format_version')!r} is not supported "
            f"(this weightsmith reads versions {READS_VERSIONS}); upgrade weightsmith"
        )
    for where, entry in (("", q), (".lm_head", q.get("lm_head", {"bits": 8}))):
        bits, group = (
            (entry.get("bits"), entry.get("group_size")) if isinstance(entry, dict) else (None, None)
        )
        if bits not in (4, 8) or (bits == 4 and group not in GROUP_SIZES):
            raise CheckpointError(
                f"{source}: quantization_config{where} has bits {bits!r}, group_size {group!r}; "
                "expected bits 8, or bits 4 with group_size 32, 64 or 128"
            )
    return q


def build_quantized_model(
    cfg: ModelConfig,
    qcfg: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor, str]],
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    decode_layout: bool = True,
) -> CausalLM:
    """Build on meta, put empty quantized layers in place of the quantized projections, fill
    every tensor from `tensors`, and check nothing is missing."""
    model, expected = _quantized_skeleton(cfg, qcfg, device)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor, source in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name in expected:
            want = expected[name]
        elif name in params:
            want = (tuple(params[name].shape), dtype)
        else:
            raise CheckpointError(
                f"{source}: unexpected tensor {name!r} for this quantized {cfg.model_type} model"
            )
        if tuple(tensor.shape) != want[0]:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want[0]}; "
                "the weights and config.json do not match"
            )
        if name in expected:
            module_name, _, attr = name.rpartition(".")
            # Copied into the layer's own (allocator-aligned) buffer: a tensor read from the file
            # can sit at any offset, and the packed CPU kernels crash on unaligned weights.
            buffer = model.get_submodule(module_name)._buffers[attr]
            if buffer.dtype == torch.float16 and tensor.dtype != torch.float16:  # a version-1 file
                _check_fits_fp16(tensor, name, source)
            buffer.copy_(tensor)
            filled.add(name)
        else:
            assign_parameter(model, name, tensor.to(device=device, dtype=dtype))
    model.tie_weights()
    missing = [n for n in expected if n not in filled] + [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{cfg.architecture}: quantized checkpoint is missing tensors {shown}")
    return _finish(model, cfg, device, decode_layout)


def _check_fits_fp16(tensor: torch.Tensor, name: str, source: str) -> None:
    """A version-1 int4 scale or zero (fp32) must round to a finite fp16 value."""
    t = tensor.float()
    if bool((torch.isfinite(t) & ~torch.isfinite(t.half())).any()):
        raise CheckpointError(
            f"{source}: tensor {name!r} holds values beyond fp16's range (|x| > 65504), which int4 "
            "scales and zeros are held in; requantize the model from its original weights"
        )


def _quantized_skeleton(
    cfg: ModelConfig, qcfg: dict[str, Any], device: torch.device | str
) -> tuple[CausalLM, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The model on meta with empty quantized layers in place, and {buffer name: (shape, dtype)}."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    skipped = set(qcfg.get("modules_not_quantized") or [])
    names = [n for n in quantizable_modules(model, lm_head=True) if n not in skipped]
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in names:
        linear = model.get_submodule(name)
        n, k = linear.out_features, linear.in_features
        own = qcfg.get("lm_head", qcfg) if name == "lm_head" else qcfg
        layer = _empty_layer(own["bits"], own["group_size"], n, k, device)
        if linear.bias is not None:
            layer.bias = linear.bias  # still meta: loaded as a plain parameter
        set_submodule(model, name, layer)
        expected.update({f"{name}.{b}": (tuple(t.shape), t.dtype) for b, t in layer.named_buffers()})
    return model, expected


def _finish(model: CausalLM, cfg: ModelConfig, device: torch.device | str, decode_layout: bool) -> CausalLM:
    model.reset_rope()
    return model.eval()


def _empty_layer(bits: int, group: int | None, n: int, k: int, device: torch.device | str) -> QuantizedLinear:
    if bits == 8:
        return Int8Linear(torch.empty(n, k, dtype=torch.int8, device=device), torch.empty(n, device=device))
    if k % group:
        raise CheckpointError(
            f"quantized checkpoint: input dimension {k} is not divisible by group size {group}"
        )
    g = k // group
    return Int4Linear(
        torch.empty(n, k // 2, dtype=torch.uint8, device=device),
        torch.empty(n, g, dtype=torch.float16, device=device),
        torch.empty(n, g, dtype=torch.float16, device=device),
        group,
    )


def describe(qcfg: dict[str, Any] | None) -> str | None:
    """A short label: "int8", "int4-g32", "int4-g32, LM head int8"."""
    if not qcfg:
        return None

    def label(entry: dict[str, Any]) -> str:
        return "int8" if entry["bits"] == 8 else f"int4-g{entry['group_size']}"

    head = qcfg.get("lm_head")
    return label(qcfg) + (f", LM head {label(head)}" if head else "")


def float_state(model: nn.Module, cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Every weight of `model` in float by its HF name, the int8/int4 (and GGUF block) layers
    dequantized (GGUF export then quantizes them to its own types); a weight that is still missing (another kind
    of layer) raises before anything is written."""
    state = {n: p.detach() for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                state[f"{name}.bias"] = module.bias.detach()
    with torch.device("meta"):
        expected = [n for n, _ in CausalLM(cfg).named_parameters()]
    for n in expected:
        if n not in state:
            kind = type(model.get_submodule(n.rsplit(".", 1)[0])).__name__
            raise CheckpointError(
                f"{source}: {n} is not a float weight ({kind}); export the unquantized model"
            )
    return {n: state[n] for n in expected}
