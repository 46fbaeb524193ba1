"""A GGUF file's weights, dequantized, one tensor at a time under HF parameter names.

What it does: `iter_gguf_tensors` yields every tensor `gguf.plan_tensors` names, as float in HF
layout, with llama.cpp's Q/K row permutation undone and Gemma's stored `1 + w` norms shifted
back; merged expert tensors split per expert. Types GGMLLinear runs dequantize through its
kernels (C where built), the others through gguf-py.

Not here: metadata and names (gguf.py), keeping blocks quantized (gguf_quants.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize

from weightsmith.checkpoint.gguf import (
    NORM_SHIFTED,
    PERMUTED_QK,
    as_reader,
    gguf_config,
    plan_tensors,
    reader_path,
    require,
    unpermute_qk,
)
from weightsmith.checkpoint.gguf_reader import GGUFFile, GGUFTensor
from weightsmith.errors import CheckpointError
from weightsmith.quant.ggml_linear import dequantize_rows, row_bytes


def dequantized(tensor: GGUFTensor) -> np.ndarray:
    """One tensor as float32 in numpy (HF) axis order.

    GGUF records shapes in ggml's ne order (fastest axis first); the reader's numpy view already
    reverses that, so a matrix comes out as (out_features, in_features) and a merged expert
    tensor as (n_expert, out_features, in_features).
    """
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    qtype = int(tensor.tensor_type)
    size = row_bytes(qtype, shape[-1])
    if size is not None:  # a type GGMLLinear runs: its dequantizer (C where built, ~10x gguf-py's)
        blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(-1, size))  # (a copy)
        return dequantize_rows(blocks, qtype, shape[-1]).numpy().reshape(shape)
    values = dequantize(tensor.data, tensor.tensor_type)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
        values = values.copy()
    return values.reshape(shape)


def iter_gguf_tensors(
    path: str | Path | GGUFFile, dtype: torch.dtype = torch.float32, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, dequantized tensor in HF layout), one tensor at a time.

    Every name and storage type is checked before the first tensor is yielded, so a file that
    cannot be loaded fails before any work is done. A tied lm_head is not yielded (the file has
    no output.weight); `read_gguf(...).config["tie_word_embeddings"]` says so. Tensors whose HF
    names are in `skip` are neither read nor yielded (gguf_quants.py keeps them as blocks).
    """
    reader = as_reader(path)
    config = gguf_config(reader)  # also rejects unsupported architectures
    plan = plan_tensors(reader)
    # llama.cpp permutes Q/K rows for its llama rope only; mistral and mixtral are llama files.
    arch = require(reader, "general.architecture")
    permuted = arch in PERMUTED_QK
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for tensor, hf_name in plan:
        if hf_name in skip:
            continue
        try:
            w = dequantized(tensor)
            proj = hf_name.rsplit(".", 2)[-2]
            if permuted and proj in heads:
                w = unpermute_qk(w, heads[proj])
            if arch in NORM_SHIFTED and hf_name.endswith("norm.weight"):
                w = w - 1.0  # the file holds Gemma's 1 + w
        except ValueError as error:  # a shape that contradicts the metadata
            raise CheckpointError(f"{reader_path(reader)}: tensor '{tensor.name}': {error}") from error
        if "{expert}" in hf_name:
            for expert, matrix in enumerate(w):  # (n_expert, out, in) -> n_expert x (out, in)
                # A copy per expert: views into one buffer would be shared storage to safetensors.
                yield hf_name.format(expert=expert), torch.from_numpy(matrix).to(dtype=dtype, copy=True)
        else:
            yield hf_name, torch.from_numpy(w).to(dtype)
