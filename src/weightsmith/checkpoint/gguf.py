"""Read GGUF checkpoints (llama.cpp's single-file format) as HF-named config, tokenizer and weights.

What it does:
- `read_gguf` turns the file's metadata into the fields of an HF `config.json` and
  `tokenizer_config.json`, and summarises how the weights are stored.
- `gguf_tokenizer.build_gguf_tokenizer` rebuilds a `tokenizers.Tokenizer` from the vocabulary, merges and
  special tokens in the metadata (byte-level BPE "gpt2" and SentencePiece-style "llama").
- `unpermute_qk` undoes llama.cpp's Q/K row permutation; `plan_tensors` maps every tensor to
  its HF parameter name (gguf_tensors.py's `iter_gguf_tensors` yields them dequantized).

Supported architectures: llama, mistral (llama.cpp writes it as llama), qwen2, mixtral
(llama with experts), qwen3, qwen3moe, gemma2, gemma3 (text), phi3 and smollm3 (name maps in
gguf_names.py; what the Gemma graphs fix in code, gguf_gemma.py). The
file is parsed and memory-mapped by `gguf_reader.GGUFFile`. Nothing here imports torch: reading a
file's metadata (`weightsmith info`) stays fast.

What it does not do: write GGUF files (see `gguf_write.py`), keep weights quantized for compute
(gguf_quants.py does, for `load(..., keep_quantized=True)` and `quantize`), run other architectures. Llama 3.1-style rope scaling is stored by llama.cpp only as a
`rope_freqs` tensor of per-frequency factors; it is mapped back to HF's `llama3` rope_scaling
when Meta's published parameters reproduce those factors, and refused otherwise.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import dequantize

from weightsmith.checkpoint.gguf_gemma import gemma_config
from weightsmith.checkpoint.gguf_meta import check_value_type
from weightsmith.checkpoint.gguf_names import (  # noqa: F401  (BLOCK_TENSORS, GLOBAL_TENSORS: re-exported)
    ARCHITECTURE_MODEL_TYPES,
    BLOCK_TENSORS,
    GEMMA_ARCHITECTURES,
    GLOBAL_TENSORS,
    HF_ARCHITECTURES,
    LONGROPE_TENSORS,
    NORM_SHIFTED,
    PERMUTED_QK,
    SKIPPED_TENSORS,
    SMOLLM3_NO_ROPE_EVERY,
    SUPPORTED_ARCHITECTURES,
    hf_tensor_name,
)
from weightsmith.checkpoint.gguf_reader import GGUFFile, GGUFTensor
from weightsmith.errors import CheckpointError

logger = logging.getLogger(__name__)

# GGUF `{arch}.rope.scaling.*` key suffix -> HF `rope_scaling` dict key.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}


@dataclass
class GGUFCheckpoint:
    """What a GGUF file says about its model, without its weights."""

    path: Path
    config: dict  # HF config.json fields
    tokenizer_config: dict  # HF tokenizer_config.json fields: special tokens, add_bos/eos, chat_template
    file_type: str  # general.file_type ("Q4_K_M"), else the matrices' most common type
    tensor_types: dict[str, int]  # GGML type name -> number of tensors stored in it


# ---------------------------------------------------------------------------------------------
# Opening the file and reading metadata


def open_gguf(path: str | Path) -> GGUFFile:
    """Memory-map a GGUF file, turning every way it can be broken into one `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file; check the path")
    try:
        # Raises CheckpointError itself for a bad magic, a cut or corrupt header, metadata or
        # tensor directory, and tensor data that runs past the end of the file.
        return GGUFFile.open(path)
    except OSError as error:  # unreadable: permissions, I/O error, cannot map
        raise CheckpointError(f"{path}: cannot read the GGUF file ({error}); check the file") from error


def as_reader(path_or_reader: str | Path | GGUFFile) -> GGUFFile:
    return path_or_reader if isinstance(path_or_reader, GGUFFile) else open_gguf(path_or_reader)


def reader_path(reader: GGUFFile) -> Path:
    return Path(reader.data.filename)


def meta(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """One metadata value as a Python object, or `default` when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    check_value_type(field, reader_path(reader))  # a string block_count is one clear error
    if field.types == [GGUFValueType.FLOAT32]:
        # float32 -> the shortest decimal that round-trips, so 1e-5 reads back as 1e-05 and not
        # 9.999999747378752e-06: the value the model's config.json had before conversion.
        return float(str(np.float32(field.contents())))
    return field.contents()


def require(reader: GGUFFile, key: str) -> Any:
    value = meta(reader, key)
    if value is None and key == "general.architecture" and meta(reader, "general.type") == "imatrix":
        raise CheckpointError(
            f"{reader_path(reader)}: is an importance matrix (llama.cpp's imatrix file), not a model; "
            "pass it to `weightsmith export --imatrix` or `weightsmith quantize --imatrix`"
        )
    if value is None:
        raise CheckpointError(
            f"{reader_path(reader)}: GGUF metadata key '{key}' is missing; the file is incomplete "
            "or was written by a converter weightsmith does not know"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Config


def _model_type(reader: GGUFFile) -> str:
    """Our model_type for the file, or a CheckpointError naming the unsupported architecture."""
    arch = require(reader, "general.architecture")
    if arch in ARCHITECTURE_MODEL_TYPES and arch != "llama":
        return ARCHITECTURE_MODEL_TYPES[arch]
    if arch != "llama":
        raise CheckpointError(
            f"{reader_path(reader)}: GGUF architecture '{arch}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    # llama.cpp has no mixtral or mistral architecture: both are written as llama. Experts mark
    # mixtral; for mistral the model's name is the only trace left.
    if (meta(reader, "llama.expert_count") or 0) > 0:
        return "mixtral"
    name = f"{meta(reader, 'general.basename', '')} {meta(reader, 'general.name', '')}"
    return "mistral" if "mistral" in name.lower() else "llama"


def _rope_scaling(reader: GGUFFile, arch: str) -> dict | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*`, or from the older `rope.scale_linear`."""
    kind = meta(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        linear = meta(reader, f"{arch}.rope.scale_linear")
        return {"rope_type": "linear", "factor": linear} if linear else None
    scaling: dict[str, Any] = {"rope_type": kind}
    for suffix, hf_key in _ROPE_SCALING_KEYS.items():
        value = meta(reader, f"{arch}.rope.scaling.{suffix}")
        if value is not None:
            scaling[hf_key] = value
    return scaling


def _longrope_from_factors(reader: GGUFFile, arch: str) -> dict | None:
    """LongRoPE's rope_scaling (Phi-3.5, Phi-4-mini) from llama.cpp's `rope_factors_long` and
    `rope_factors_short` tensors, its original context and attention factor. (llama.cpp takes the
    long set for a whole run whose context passes the original one; we switch as transformers does,
    when the sequence passes it.)"""
    found = {t.name: t for t in reader.tensors if t.name in LONGROPE_TENSORS.values()}
    if not found:
        return None
    if len(found) != len(LONGROPE_TENSORS):
        missing = set(LONGROPE_TENSORS.values()) - set(found)
        raise CheckpointError(
            f"{reader_path(reader)}: GGUF has {' and '.join(found)} without {' and '.join(missing)}; "
            "re-convert the file"
        )
    scaling: dict[str, Any] = {"rope_type": "longrope"}
    for key, name in LONGROPE_TENSORS.items():
        scaling[key] = np.asarray(found[name].data, dtype=np.float32).reshape(-1).tolist()
    scaling["original_max_position_embeddings"] = require(
        reader, f"{arch}.rope.scaling.original_context_length"
    )
    attention = meta(reader, f"{arch}.rope.scaling.attn_factor")
    if attention is not None:  # checked with the rest of rope_scaling (ModelConfig)
        scaling["attention_factor"] = attention
    return scaling


#: Meta's llama3 rope parameters besides `factor`, the same in every published Llama 3.1-3.3.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_from_rope_freqs(reader: GGUFFile, arch: str, default_head_dim: int) -> dict | None:
    """HF llama3 `rope_scaling` whose per-frequency factors equal the file's `rope_freqs`.

    llama.cpp's converter stores only the factors (inv_freq / scaled inv_freq); the
    parameters are recovered as factor = max(factors) plus Meta's fixed band edges, and
    checked by recomputing every factor."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    import torch  # only for a file with rope_freqs (`weightsmith info` imports no torch otherwise)

    from weightsmith.models.rope import llama3_scaled

    stored = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).reshape(-1).copy())
    dim = meta(reader, f"{arch}.rope.dimension_count") or meta(reader, f"{arch}.attention.key_length")
    dim = dim or default_head_dim
    theta = float(meta(reader, f"{arch}.rope.freq_base", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), **LLAMA3_ROPE}
    if stored.shape == inv_freq.shape:
        rebuilt = inv_freq / llama3_scaled(inv_freq, scaling)
        if torch.allclose(rebuilt, stored, rtol=1e-4, atol=1e-6):
            return scaling
    raise CheckpointError(
        f"{reader_path(reader)}: rope_freqs.weight does not match llama3 rope scaling with "
        f"factor {scaling['factor']:g}, low/high freq factors 1/4 and original context 8192; "
        "this rope variant is not supported"
    )


def _vocab_size(reader: GGUFFile, arch: str) -> int:
    size = meta(reader, f"{arch}.vocab_size")
    if size is not None:
        return size
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.contents())
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        require(reader, f"{arch}.vocab_size")  # raises, naming the key
    return int(embed.shape[-1])  # GGUF shapes are in ne order: (hidden, vocab)


def gguf_config(reader: GGUFFile) -> dict:
    """The HF config.json fields this file's metadata determines."""
    model_type = _model_type(reader)
    arch = require(reader, "general.architecture")
    names = {t.name for t in reader.tensors}
    hidden = require(reader, f"{arch}.embedding_length")
    heads = require(reader, f"{arch}.attention.head_count")
    if heads < 1:  # the one divisor taken here; ModelConfig checks every other size
        raise CheckpointError(
            f"{reader_path(reader)}: GGUF metadata '{arch}.attention.head_count' is {heads}; re-convert the file"
        )
    experts = meta(reader, f"{arch}.expert_count") or 0
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [HF_ARCHITECTURES[model_type]],
        "vocab_size": _vocab_size(reader, arch),
        "hidden_size": hidden,
        "intermediate_size": require(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": require(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta(reader, f"{arch}.attention.key_length", hidden // heads),
        # GeGLU (tanh) or SwiGLU
        "hidden_act": "gelu_pytorch_tanh" if arch in GEMMA_ARCHITECTURES else "silu",
        "rms_norm_eps": require(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta(reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader, arch) or _llama3_from_rope_freqs(reader, arch, hidden // heads),
        "max_position_embeddings": require(reader, f"{arch}.context_length"),
        # llama.cpp drops output.weight when it equals the embedding, so its absence means tied.
        "tie_word_embeddings": "output.weight" not in names,
        # qwen2 always has q/k/v biases; elsewhere they exist only if the tensors do.
        "attention_bias": model_type == "qwen2"
        or "blk.0.attn_q.bias" in names
        or "blk.0.attn_qkv.bias" in names,
        "sliding_window": meta(reader, f"{arch}.attention.sliding_window"),
        "bos_token_id": meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",  # iter_gguf_tensors dequantizes to float32 by default
    }
    longrope = _longrope_from_factors(reader, arch)
    if longrope is not None:
        config["rope_scaling"] = longrope
    rotary = meta(reader, f"{arch}.rope.dimension_count")
    if rotary and rotary < config["head_dim"]:  # RoPE on part of each head (ModelConfig: Phi-3 only)
        config["partial_rotary_factor"] = rotary / config["head_dim"]
    if arch in GEMMA_ARCHITECTURES:
        config.update(gemma_config(arch, config, lambda key, default: meta(reader, key, default)))
    if arch == "smollm3":
        config["no_rope_layer_interval"] = SMOLLM3_NO_ROPE_EVERY
    if experts:
        config["num_local_experts"] = experts
        config["num_experts_per_tok"] = require(reader, f"{arch}.expert_used_count")
    if arch == "qwen3moe":  # llama.cpp's qwen3moe graph always renormalises the top-k weights
        config["moe_intermediate_size"] = require(reader, f"{arch}.expert_feed_forward_length")
        config["norm_topk_prob"] = True
    if arch == "gpt-oss":
        config.update(_gpt_oss_config(reader, config))
    return config


def _gpt_oss_config(reader: GGUFFile, config: dict) -> dict:
    """What llama.cpp's gpt-oss graph fixes in code: every other layer slides, the first one
    first; the experts' width is `expert_feed_forward_length`; the clamped SwiGLU's alpha and limit
    are transformers' defaults (1.702, 7.0: ModelConfig). OpenAI's YaRN does not round the ramp's
    ends (transformers' `truncate: false` for gpt-oss)."""
    layers = range(config["num_hidden_layers"])
    fields: dict[str, Any] = {
        "intermediate_size": require(reader, "gpt-oss.expert_feed_forward_length"),
        "layer_types": ["full_attention" if i % 2 else "sliding_attention" for i in layers],
    }
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type") == "yarn":
        fields["rope_scaling"] = {**scaling, "truncate": False}
    return fields


def _tokenizer_config(reader: GGUFFile) -> dict:
    """HF tokenizer_config.json fields: special token strings, BOS/EOS flags, chat template."""
    tokens = meta(reader, "tokenizer.ggml.tokens") or []

    def token(key: str) -> str | None:
        index = meta(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and index < len(tokens) else None

    return {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos_default(reader),
        "add_eos_token": bool(meta(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta(reader, "tokenizer.chat_template"),
    }


def add_bos_default(reader: GGUFFile) -> bool:
    # Without the flag, llama.cpp adds BOS for a SentencePiece vocabulary and not for byte-level BPE.
    default = meta(reader, "tokenizer.ggml.model") == "llama"
    return bool(meta(reader, "tokenizer.ggml.add_bos_token", default))


def declared_file_type(reader: GGUFFile) -> str | None:
    """`general.file_type` by llama.cpp's name ("Q4_K_M", "F16"): it tells the mixes apart
    (Q4_K_M and Q4_K_S both store most matrices in Q4_K); None when absent or unknown."""
    value = meta(reader, "general.file_type")
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        named = LlamaFileType(value)
    except ValueError:
        return None
    if named is LlamaFileType.GUESSED:
        return None
    return named.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_gguf(path: str | Path | GGUFFile) -> GGUFCheckpoint:
    """Config, tokenizer config and storage summary of a GGUF file; reads no tensor data."""
    reader = as_reader(path)
    config = gguf_config(reader)
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    # The file's "quantization" is what its matrices use; norms and biases stay F32 in every file.
    matrix_types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    common = (matrix_types or tensor_types or Counter({"F32": 1})).most_common(1)[0][0]
    file_type = declared_file_type(reader) or common
    return GGUFCheckpoint(
        path=reader_path(reader),
        config=config,
        tokenizer_config=_tokenizer_config(reader),
        file_type=file_type,
        tensor_types=dict(tensor_types),
    )


# ---------------------------------------------------------------------------------------------
# Tensors


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a llama-family q_proj/k_proj weight or bias.

    Why it exists: HF's rotary embedding pairs dimension i with i + head_dim/2 of each head
    (`rotate_half`), while ggml's llama rope pairs adjacent dimensions 2i and 2i+1. llama.cpp's
    converter makes the two agree by reordering the rows of each head, in halves-to-pairs order:
    `w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2)`. This is the inverse, so the
    weight works with HF's rope again. qwen2 files use ggml's NEOX rope (the HF pairing) and are
    not permuted. `n_head` is num_key_value_heads for k_proj.

    w: (n_head * head_dim, in_features) weight or (n_head * head_dim,) bias.
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    # (n_head, head_dim/2, 2, ...) -> (n_head, 2, head_dim/2, ...) -> (n_head * head_dim, ...)
    return w.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


@functools.cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf-py can dequantize this type: try it on one zero block."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def plan_tensors(reader: GGUFFile) -> list[tuple[GGUFTensor, str]]:
    """(tensor, HF name) for every tensor to load; raises before any work if one cannot be."""
    path = reader_path(reader)
    arch = require(reader, "general.architecture")
    plan = []
    for tensor in reader.tensors:
        if tensor.name in SKIPPED_TENSORS:
            continue  # rope_freqs became config (rope_scaling); the model recomputes them
        hf_name = hf_tensor_name(tensor.name, arch)
        if hf_name is None:
            raise CheckpointError(
                f"{path}: tensor '{tensor.name}' has no HF equivalent in weightsmith's name map; "
                "the file may be for an unsupported architecture variant"
            )
        if not _can_dequantize(tensor.tensor_type):
            raise CheckpointError(
                f"{path}: tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, which the "
                "installed gguf package cannot dequantize; upgrade gguf or re-quantize the file"
            )
        plan.append((tensor, hf_name))
    return plan
