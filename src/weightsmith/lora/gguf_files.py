"""LoRA adapters as GGUF files: llama.cpp's adapter format (`llama-cli --lora`, Ollama's ADAPTER), both ways.

The format (llama.cpp's `convert_lora_to_gguf.py` writes it, `llama-adapter.cpp` reads it):
metadata `general.type = "adapter"`, `general.architecture` = the base model's llama.cpp
architecture, `adapter.type = "lora"` and `adapter.lora.alpha`; for each adapted matrix two
tensors named after the base tensor, `blk.0.attn_q.weight.lora_a` (PEFT's A, rank x in) and
`.lora_b` (PEFT's B, out x rank). llama.cpp adds `scale * B (A x)` with scale = alpha / rank,
the rank read from each B, or 1 when alpha is 0.

- `write_gguf_adapter` writes a PEFT adapter folder (ours or PEFT's) for a base model's config.
  B's rows are permuted as the base's q/k rows are for llama's rope (gguf_write.permute_qk).
  Where every module's scale times its rank is one number (plain LoRA, and rsLoRA at one rank)
  that number is the file's alpha; otherwise (rank/alpha patterns that differ, rsLoRA at mixed
  ranks) each B carries its own scale and alpha is 0, so llama.cpp computes PEFT's delta either
  way. llama.cpp's own converter writes `lora_alpha` whatever the patterns and rsLoRA say.
  Phi-3's fused `qkv_proj`/`gate_up_proj` adapters map to its `attn_qkv`/`ffn_up` as they are.
- `read_gguf_adapter` turns such a file back into adapter_config.json contents and tensors under
  HF module names, for `load_adapter` (files.py), which checks them against the model as it
  checks a folder: `--adapter x.gguf` works wherever an adapter folder does.

Refused, in one line: DoRA (llama.cpp has no magnitudes; merge it first), LoRA on a mixture of
experts' experts or router, embedding adapters, activated LoRA (aLoRA), a file for another architecture
(an adapter on a tied lm_head is refused by `load_adapter`'s checks, which `export` runs first). Norm vectors that
mergekit puts into adapters are skipped with a warning, as llama.cpp skips them.

Not here: model GGUF files (checkpoint/gguf_write.py), the export command (commands/export.py).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from weightsmith.checkpoint.gguf import PERMUTED_QK, meta, open_gguf, require, unpermute_qk
from weightsmith.checkpoint.gguf_names import hf_tensor_name
from weightsmith.checkpoint.gguf_tensors import dequantized
from weightsmith.checkpoint.gguf_write import (
    ARCHITECTURES,
    check_supported,
    gguf_tensor_name,
    permute_qk,
    write_out,
)
from weightsmith.errors import CheckpointError, UsageError
from weightsmith.files import atomic_file
from weightsmith.lora_config import LoraConfig

if TYPE_CHECKING:
    from weightsmith.lora.fused import AdapterTensors
    from weightsmith.models import ModelConfig

logger = logging.getLogger(__name__)

#: Storage types an adapter is written in (llama.cpp's converter: f32 by default, or f16).
ADAPTER_QUANTS = {"f32": (QT.F32, gguf.LlamaFileType.ALL_F32), "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16)}
_PARTS = {"lora_a": "lora_A", "lora_b": "lora_B"}
_ALORA_KEY = gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS


def is_adapter_file(path: str | Path) -> bool:
    """Whether `path` is a GGUF file whose metadata says it is an adapter (`general.type`)."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return False
    return meta(open_gguf(path), "general.type") == "adapter"


def _heads(config: ModelConfig) -> dict[str, int]:
    return {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}


# ---------------------------------------------------------------------------------------------
# Reading


def _check_metadata(reader: Any, path: Path, config: ModelConfig) -> tuple[str, float]:
    """The file's architecture and alpha, after checking it is a LoRA adapter for `config`'s family."""
    kind = meta(reader, "general.type")
    if kind != "adapter":
        raise CheckpointError(
            f"{path}: general.type is {kind!r}, not 'adapter'; this GGUF file is not a LoRA adapter "
            "(a model file is passed as MODEL, not as --adapter)"
        )
    adapter_type = meta(reader, gguf.Keys.Adapter.TYPE)
    if adapter_type != "lora":
        raise CheckpointError(
            f"{path}: adapter.type is {adapter_type!r}; weightsmith reads LoRA adapters ('lora')"
        )
    if meta(reader, _ALORA_KEY) is not None:
        raise CheckpointError(
            f"{path}: an activated LoRA (aLoRA: {_ALORA_KEY}), which applies only after its invocation "
            "tokens; weightsmith applies adapters to every token, so it is not loaded"
        )
    arch = str(require(reader, "general.architecture"))
    wanted = ARCHITECTURES.get(config.model_type)
    if arch != wanted:
        raise CheckpointError(
            f"{path}: an adapter for llama.cpp's {arch!r} models, and the base model is {config.model_type} "
            f"({wanted!r}); pass the base model it was made for"
        )
    alpha = meta(reader, gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise CheckpointError(f"{path}: {gguf.Keys.Adapter.LORA_ALPHA} must be a number >= 0 (got {alpha!r})")
    return arch, float(alpha)


def _pairs(reader: Any, path: Path) -> dict[str, dict[str, Any]]:
    """Base tensor name -> {"lora_a": tensor, "lora_b": tensor}."""
    pairs: dict[str, dict[str, Any]] = {}
    skipped = []
    for tensor in reader.tensors:
        base, _, part = tensor.name.rpartition(".")
        if part not in _PARTS:
            if tensor.name.endswith("_norm.weight"):
                skipped.append(tensor.name)
                continue
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} is neither a lora_a nor a lora_b; the file is not a LoRA adapter"
            )
        pairs.setdefault(base, {})[part] = tensor
    if skipped:
        logger.warning(
            "%s: %d norm tensors (%s ...) skipped, as llama.cpp skips them", path, len(skipped), skipped[0]
        )
    for base, parts in pairs.items():
        missing = [p for p in _PARTS if p not in parts]
        if missing:
            raise CheckpointError(f"{path}: {base}.{missing[0]} is missing; the adapter file is incomplete")
    if not pairs:
        raise CheckpointError(f"{path}: holds no LoRA tensors (*.lora_a, *.lora_b)")
    return pairs


def _module(base: str, arch: str, path: Path) -> str:
    """The HF module a GGUF adapter pair adapts (`blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj`)."""
    if base.startswith("token_embd."):
        raise CheckpointError(
            f"{path}: {base} has an adapter; weightsmith loads LoRA on linear layers, not on embeddings"
        )
    hf = hf_tensor_name(base, arch)
    if hf is None or not hf.endswith(".weight") or "{expert}" in hf or hf.endswith("norm.weight"):
        raise CheckpointError(
            f"{path}: {base} has an adapter, which weightsmith does not apply (it adapts attention and MLP "
            "projections and lm_head, not merged experts or norms)"
        )
    return hf[: -len(".weight")]


def read_gguf_adapter(path: str | Path, config: ModelConfig) -> tuple[dict[str, Any], AdapterTensors]:
    """adapter_config.json contents and tensors ({(module, "lora_A"|"lora_B"): (GGUF name, tensor)})
    of a llama.cpp LoRA file for a model with `config`; names and shapes are checked against the
    model by `load_adapter`, as a folder's are."""
    path = Path(path)
    reader = open_gguf(path)
    arch, alpha = _check_metadata(reader, path, config)
    heads = _heads(config)
    tensors: AdapterTensors = {}
    ranks: dict[str, int] = {}
    for base, parts in _pairs(reader, path).items():
        module = _module(base, arch, path)
        try:
            a, b = dequantized(parts["lora_a"]), dequantized(parts["lora_b"])
        except ValueError as error:
            raise CheckpointError(f"{path}: tensor {base}: {error}") from error
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{path}: {base}.lora_a has shape {a.shape} and .lora_b {b.shape}; expected (rank, in) and "
                "(out, rank) in numpy order"
            )
        proj = module.rsplit(".", 1)[-1]
        if arch in PERMUTED_QK and proj in heads:
            rows = heads[proj] * config.head_dim
            if b.shape[0] != rows:
                raise CheckpointError(
                    f"{path}: {base}.lora_b has {b.shape[0]} rows, expected {rows}; is this adapter for another base model?"
                )
            b = unpermute_qk(b, heads[proj])  # llama.cpp's rope row order back to HF's
        tensors[(module, "lora_A")] = (parts["lora_a"].name, torch.from_numpy(np.ascontiguousarray(a)))
        tensors[(module, "lora_B")] = (parts["lora_b"].name, torch.from_numpy(np.ascontiguousarray(b)))
        ranks[module] = int(a.shape[0])
    return _peft_dict(ranks, alpha), tensors


def _peft_dict(ranks: dict[str, int], alpha: float) -> dict[str, Any]:
    """adapter_config.json for modules with these ranks and llama.cpp's alpha (0: scale 1)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    apart = {re.escape(m): rank for m, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha if alpha > 0 else r,  # alpha 0: every module's scale is 1, alpha = rank
        "target_modules": sorted(ranks),
        "rank_pattern": apart,
        "alpha_pattern": {} if alpha > 0 else dict(apart),
        "use_rslora": False,
    }


# ---------------------------------------------------------------------------------------------
# Writing


def _refuse(cfg: LoraConfig, source: str) -> None:
    if cfg.use_dora:
        raise UsageError(
            f"{source}: a DoRA adapter; llama.cpp applies plain LoRA only. Fold it into the base with "
            "`weightsmith merge MODEL --adapter DIR --out merged` and export the merged model"
        )
    if cfg.target_parameters:
        raise UsageError(
            f"{source}: adapts a mixture of experts' experts or router (target_parameters), which llama.cpp's "
            "adapters do not reach; merge it with `weightsmith merge` and export the merged model"
        )


def _scales(cfg: LoraConfig, ranks: dict[str, int]) -> tuple[float, dict[str, float]]:
    """(the file's alpha, the factor each B is multiplied by). One alpha when every module's scale x
    rank agrees; otherwise alpha 0 (llama.cpp's scale 1) and each B carries its own scale."""
    products = {m: cfg.scale_for(m) * r for m, r in ranks.items()}
    first = next(iter(products.values()))
    if first > 0 and all(math.isclose(p, first, rel_tol=1e-9) for p in products.values()):
        return first, dict.fromkeys(ranks, 1.0)
    return 0.0, {m: cfg.scale_for(m) for m in ranks}


def _matrices(
    tensors: AdapterTensors,
    config: ModelConfig,
    arch: str,
    factors: dict[str, float],
    dtype: np.dtype,
    source: str,
) -> list[tuple[str, np.ndarray]]:
    """(GGUF tensor name, array in the stored dtype) for every lora_a and lora_b, layer by layer."""
    heads = _heads(config)
    out = []
    for module in sorted({m for m, _ in tensors}, key=_layer_order):
        name = gguf_tensor_name(f"{module}.weight", arch)
        if name is None:
            raise UsageError(
                f"{source}: {module} has no llama.cpp tensor name; llama.cpp cannot apply its adapter"
            )
        a = tensors[(module, "lora_A")][1].to(torch.float32).numpy()
        b = tensors[(module, "lora_B")][1].to(torch.float32).numpy() * np.float32(factors[module])
        proj = module.rsplit(".", 1)[-1]
        if arch in PERMUTED_QK and proj in heads:
            b = permute_qk(b, heads[proj])
        for suffix, w in ((".lora_a", a), (".lora_b", b)):
            stored = np.ascontiguousarray(w.astype(dtype))
            if not np.isfinite(stored).all():
                raise UsageError(
                    f"{source}: {module}'s {suffix[1:]} does not fit in {np.dtype(dtype).name} (or holds NaN); "
                    "pass --quant f32"
                )
            out.append((name + suffix, stored))
    return out


def _layer_order(module: str) -> tuple[int, str]:
    match = re.search(r"\.layers\.(\d+)\.", module)
    return (int(match.group(1)) if match else 1 << 30, module)


def write_gguf_adapter(
    cfg: LoraConfig,
    tensors: AdapterTensors,
    config: ModelConfig,
    out: str | Path,
    quant: str = "f16",
    *,
    name: str,
    source: str,
) -> dict[str, Any]:
    """Write a PEFT adapter (its config and tensors under the file's module names, as
    `files.read_adapter_folder` reads them from `source`) as a llama.cpp LoRA file at `out`,
    atomically. The caller, `export`, checks the adapter against the base model first
    (`read_adapter`). Returns a summary."""
    out = Path(out)
    if quant not in ADAPTER_QUANTS:
        raise UsageError(
            f"--quant {quant}: an adapter is written as {' or '.join(ADAPTER_QUANTS)} (it is small; quantize the "
            "base model instead)"
        )
    arch = check_supported(config, source)
    ranks = {m: int(t.shape[0]) for (m, part), (_, t) in tensors.items() if part == "lora_A"}
    _refuse(cfg, source)
    alpha, factors = _scales(cfg, ranks)
    qtype, file_type = ADAPTER_QUANTS[quant]
    arrays = _matrices(tensors, config, arch, factors, np.float16 if qtype == QT.F16 else np.float32, source)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, array in arrays:
            writer.add_tensor(tensor_name, array)
        write_out(writer)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "format": "gguf-lora",
        "quant": quant,
        "architecture": arch,
        "modules": len(ranks),
        "ranks": sorted(set(ranks.values())),
        "alpha": alpha,
        "scales_in_b": alpha == 0.0,
    }
