"""A GGUF file's quantized matrices kept quantized: its blocks as weightsmith's layers.

What it does:
- `gguf_block_layers` reads every matrix stored in a type `GGMLLinear` runs (Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, IQ1_S-IQ4_XS, TQ1_0, TQ2_0, MXFP4) as its raw blocks, rows in HF
  order (llama.cpp's Q/K row permutation undone on whole rows), with no float detour; a merged
  expert tensor (`ffn_gate_exps`, ...: one matrix per expert, stacked) as one matrix per expert.
- `build_block_model` builds the model with those matrices as `GGMLLinear` layers (the LM
  head too, from the embedding's blocks when the file ties them, as llama.cpp computes it);
  Q4_1 matrices become Int4Linear layers with groups of 32 instead, the same bytes and values
  (`q4_1_as_int4`), so that decoding runs them on the int4 tile kernels
  and every other tensor (embeddings, norms, biases, F32/F16 and other-type matrices, the
  routers) dequantized as `iter_gguf_tensors` yields it.
- `gguf_int4_layers` reads Q4_0 / Q4_1 matrices as Int4Linear's (codes, scales, zeros),
  for `weightsmith quantize --to int4 --group-size 32` (its saved folder format).

Not here: the layer and its kernels (weightsmith.quant.ggml_linear, quant/cpu_ggml.c),
metadata and float tensors (gguf.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from weightsmith.checkpoint.build import build_model
from weightsmith.checkpoint.gguf import (
    as_reader,
    gguf_config,
    plan_tensors,
    reader_path,
    require,
    unpermute_qk,
)
from weightsmith.checkpoint.gguf_reader import GGUFFile, GGUFTensor
from weightsmith.checkpoint.gguf_tensors import iter_gguf_tensors
from weightsmith.errors import CheckpointError
from weightsmith.models import CausalLM, ModelConfig
from weightsmith.models.fused import split_name
from weightsmith.quant.ggml_linear import GGML_TYPES, GGMLLinear, row_bytes
from weightsmith.quant.weight_only import Int4Linear, pack_nibbles, quantizable_modules, set_submodule

log = logging.getLogger(__name__)


def _row_order(reader: GGUFFile):
    """A function (HF name, rows) -> rows in HF order: llama files' q/k rows un-permuted."""
    config = gguf_config(reader)
    permuted = require(reader, "general.architecture") == "llama"
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def order(hf_name: str, rows: np.ndarray) -> np.ndarray:
        proj = hf_name.rsplit(".", 2)[-2]
        return unpermute_qk(rows, heads[proj]) if permuted and proj in heads else rows

    return order


def _fused_rows(reader: GGUFFile) -> Callable[[str], list[tuple[str, slice]]]:
    """For an HF weight name: (our name, its rows) per part of a fused tensor (Phi-3's qkv_proj,
    gate_up_proj, stacked by rows in order), or the name itself with all rows."""
    cfg = ModelConfig.from_hf(gguf_config(reader), source=reader_path(reader))
    with torch.device("meta"):
        rows = {n: p.shape[0] for n, p in CausalLM(cfg).named_parameters()}

    def split(name: str) -> list[tuple[str, slice]]:
        parts, start, out = split_name(cfg, name) or [name], 0, []
        for part in parts:
            n = rows.get(part, 0) if len(parts) > 1 else None
            out.append((part, slice(start, None if n is None else start + n)))
            start += n or 0
        return out

    return split


def gguf_block_layers(
    path: str | Path | GGUFFile, names: set[str] | None = None
) -> dict[str, tuple[torch.Tensor, int]]:
    """{HF weight name: (blocks uint8 (N, row bytes), ggml type id)} for every 2-D matrix of the
    file in a type GGMLLinear runs (a merged expert tensor as each expert's matrix), rows in HF
    order; only those in `names` when given (the others are not read)."""
    reader = as_reader(path)
    order, split = _row_order(reader), _fused_rows(reader)
    out = {}
    for tensor, hf_name in plan_tensors(reader):
        qtype, merged = int(tensor.tensor_type), "{expert}" in hf_name
        if qtype not in GGML_TYPES or len(tensor.shape) != (3 if merged else 2):
            continue
        # Phi-3's attn_qkv / ffn_up: each part's rows; merged experts: each expert's matrix.
        count = int(tensor.shape[2]) if merged else 0
        parts = [(hf_name.format(expert=e), slice(None)) for e in range(count)] if merged else split(hf_name)
        if names is not None and not any(part in names for part, _ in parts):
            continue
        n, k = (int(x) for x in reversed(tensor.shape[:2].tolist()))
        size = row_bytes(qtype, k)
        raw = np.asarray(tensor.data, dtype=np.uint8)
        if size is None or raw.size != max(count, 1) * n * size:
            raise CheckpointError(
                f"{reader_path(reader)}: tensor '{tensor.name}' ({tensor.tensor_type.name}, {n} x {k}) "
                f"holds {raw.size} bytes, not whole {GGML_TYPES[qtype][0]} rows; the file is damaged"
            )
        rows = raw.reshape(count, n, size) if merged else order(hf_name, raw.reshape(n, size))
        for i, (part, sl) in enumerate(parts):
            if names is None or part in names:  # owned, not the map
                held = rows[i] if merged else rows[sl]
                out[part] = (torch.from_numpy(np.array(held, dtype=np.uint8, copy=True)), qtype)
    return out


def build_block_model(
    reader: GGUFFile, cfg: ModelConfig, device: torch.device, dtype: torch.dtype
) -> tuple[CausalLM, str]:
    """The model with its block-typed projections and LM head as GGMLLinear layers (see the
    module doc); returns it and a label of what was kept, e.g. "GGUF blocks: Q4_K x7, Q6_K x2"."""
    path = reader_path(reader)
    types = {hf_name: int(tensor.tensor_type) for tensor, hf_name in plan_tensors(reader)}
    # The LM head's blocks: output.weight's, or the embedding's when the file ties them (then
    # the head is a layer of its own and the model is untied).
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    untie = cfg.tie_word_embeddings and types.get(head_name) in GGML_TYPES
    model_cfg = dataclasses.replace(cfg, tie_word_embeddings=False) if untie else cfg
    with torch.device("meta"):
        skeleton = CausalLM(model_cfg)
    wanted = {f"{n}.weight" for n in quantizable_modules(skeleton, lm_head=True) if n != "lm_head"}
    blocks = gguf_block_layers(reader, wanted | {head_name})  # only these are read
    head = blocks.get(head_name)
    kept: Counter[str] = Counter()
    skip = set()
    for name in quantizable_modules(skeleton, lm_head=True):
        entry = head if name == "lm_head" else blocks.get(f"{name}.weight")
        if entry is None:
            continue
        linear = skeleton.get_submodule(name)
        q, qtype = entry
        if q.shape[0] != linear.out_features or q.shape[1] != row_bytes(qtype, linear.in_features):
            raise CheckpointError(
                f"{path}: tensor {name}.weight holds {q.shape[0]} rows of {q.shape[1]} bytes of "
                f"{GGML_TYPES[qtype][0]}; the file's metadata wants {linear.out_features} x "
                f"{linear.in_features} weights; the file is inconsistent"
            )
        if qtype == GGMLQuantizationType.Q4_1:  # exactly an int4 g32 layer: the decode tiles run it
            layer = q4_1_as_int4(q, linear.out_features, linear.in_features).to(device)
        else:
            layer = GGMLLinear(q.to(device), qtype, linear.in_features)
        if linear.bias is not None:
            layer.bias = linear.bias  # still meta: assigned from the file below
        set_submodule(skeleton, name, layer)
        kept[GGML_TYPES[qtype][0]] += 1
        if not (name == "lm_head" and cfg.tie_word_embeddings):  # the embedding is still needed
            skip.add(f"{name}.weight")
    # A merged expert tensor is skipped whole once every expert of it is kept.
    for tensor, hf_name in plan_tensors(reader):
        experts = int(tensor.shape[-1]) if "{expert}" in hf_name else 0
        if experts and all(hf_name.format(expert=e) in skip for e in range(experts)):
            skip.add(hf_name)
    tensors = ((n, t, str(path)) for n, t in iter_gguf_tensors(reader, torch.float32, frozenset(skip)))
    model = build_model(model_cfg, tensors, device, dtype, skeleton=skeleton)
    label = "GGUF blocks: " + ", ".join(f"{t} x{c}" for t, c in kept.most_common()) if kept else None
    log.info("kept %d matrices as GGUF blocks (%s)", sum(kept.values()), label)
    return model, label or "GGUF blocks: none (no matrix in a type the kernels run)"


def q4_1_as_int4(rows: torch.Tensor, n: int, k: int) -> Int4Linear:
    """Q4_1 rows (N, K/32 blocks of 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles, element j low
    and j + 16 high) as an Int4Linear with groups of 32: the same codes, d as its scale and m as
    its zero (fp16 both, as Int4Linear holds them), so it computes d * q + m bit for bit from the
    same 20 bytes a block. (Q4_0 stays a GGMLLinear: its tiles hold no zeros, the kernels take
    -8 d, where an Int4Linear would store them, 2 bytes a block more.)"""
    b = rows.view(n, k // 32, 20)
    scales, zeros = (b[..., at : at + 2].contiguous().view(torch.float16).view(n, k // 32) for at in (0, 2))
    codes = torch.cat([b[..., 4:] & 15, b[..., 4:] >> 4], dim=-1).reshape(n, k)
    return Int4Linear(pack_nibbles(codes), scales, zeros, 32)


# -- Q4_0 / Q4_1 as Int4Linear groups (weightsmith quantize) ------------------------------------

#: GGML types whose blocks are exactly our int4 layer's groups of 32: w = q * scale + zero.
INT4_BLOCK_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def _int4_blocks(tensor: GGUFTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0 / Q4_1 matrix as (codes uint8 (N, K) in 0..15, scales (N, K/32), zeros (N, K/32)).

    Block layout (ggml): an fp16 scale d (Q4_1: then an fp16 minimum m), then 16 bytes whose
    low nibbles are elements 0..15 and high nibbles elements 16..31. Q4_1 reads d * q + m;
    Q4_0 reads d * (q - 8), so its zero is -8 d. Both are exact in our (scale, zero) form.
    """
    q4_1 = tensor.tensor_type == GGMLQuantizationType.Q4_1
    size = 20 if q4_1 else 18
    raw = np.ascontiguousarray(tensor.data, dtype=np.uint8).reshape(-1, size)  # (blocks, bytes)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    zero = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if q4_1 else -8.0 * d
    qs = raw[:, 4:20] if q4_1 else raw[:, 2:18]
    codes = np.concatenate([qs & 15, qs >> 4], axis=1)  # (blocks, 32)
    n, k = (int(x) for x in reversed(tensor.shape.tolist()))
    return codes.reshape(n, k), d.reshape(n, k // 32), zero.reshape(n, k // 32)


def gguf_int4_layers(
    path: str | Path | GGUFFile,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{HF weight name: (codes, scales, zeros)} for every Q4_0 / Q4_1 matrix of the file (not
    merged experts; a fused one split into its parts), rows in HF order: the file's own 4-bit codes, for an Int4Linear with
    groups of 32 that computes exactly what the file stores (no dequantize-requantize)."""
    reader = as_reader(path)
    order, split = _row_order(reader), _fused_rows(reader)
    out = {}
    for tensor, hf_name in plan_tensors(reader):
        if tensor.tensor_type not in INT4_BLOCK_TYPES or "{expert}" in hf_name or len(tensor.shape) != 2:
            continue
        parts = tuple(order(hf_name, p) for p in _int4_blocks(tensor))
        for name, rows in split(hf_name):  # Phi-3's attn_qkv / ffn_up: each part's rows
            out[name] = tuple(torch.from_numpy(np.ascontiguousarray(p[rows])) for p in parts)
    return out
