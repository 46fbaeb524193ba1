"""Write a loaded model as a GGUF file llama.cpp (and Ollama) can load, plus an Ollama Modelfile.

What it does:
- `export_gguf` writes one .gguf file: llama.cpp's hyperparameter keys, the vocabulary (byte-level
  BPE as llama.cpp's "gpt2" model, SentencePiece-style BPE as its "llama" model: gguf_vocab.py),
  special token ids, BOS/EOS flags, the chat template, and every weight under llama.cpp's tensor
  names, with Q/K rows permuted for llama's rope (`permute_qk`, the inverse of `gguf.unpermute_qk`).
- Matrices are stored as F32, F16, or a llama.cpp file type's mix of quantized types (Q8_0, Q6_K,
  Q5_K_M/S, Q5_1, Q5_0, Q4_K_M/S, Q4_1, Q4_0), each tensor in the type `llama-quantize` would pick
  (gguf_mix.py); norms, biases and routers as F32.
- The file appears atomically (temp file in the same directory, fsync, rename); on any error no
  file is left behind. An Ollama `Modelfile` is written beside it (checkpoint/modelfile.py).

Architectures: llama, mistral and mixtral (written as llama, as llama.cpp's converter does), qwen2,
qwen3, qwen3moe (experts stacked into merged `ffn_*_exps` tensors, gguf_experts.py), gemma2 and
gemma3 (norms stored as 1 + w; gemma2's two soft-caps written; refused unless the model has what
llama.cpp's graph fixes in code, gguf_gemma.py), phi3 (q/k/v and gate/up stacked back into
attn_qkv and ffn_up) and smollm3 (Q/K permuted as llama's; every 4th layer without RoPE, as its
graph fixes). gemma2, gemma3 and phi3 files carry the sliding window; for llama and qwen2, whose
llama.cpp graphs have none, the context length is capped at the window instead, so the file
computes exactly what the model does within it.

With an importance matrix (checkpoint/imatrix.py) the quantizer's fits are weighted by it.

What it does not do: Unigram vocabularies, dense layers among experts, yarn or dynamic rope
scaling, and streaming: the converted tensors are held in memory until the file is written.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from weightsmith.checkpoint.gguf import LLAMA3_ROPE
from weightsmith.checkpoint.gguf_experts import (
    add_expert_hparams,
    check_experts,
    check_gpt_oss,
    stack_experts,
)
from weightsmith.checkpoint.gguf_gemma import check_gemma
from weightsmith.checkpoint.gguf_mix import QUANTS, Mix
from weightsmith.checkpoint.gguf_names import (
    GEMMA_ARCHITECTURES,
    GLOBAL_TENSORS,
    LONGROPE_TENSORS,
    NORM_SHIFTED,
    PERMUTED_QK,
    SMOLLM3_NO_ROPE_EVERY,
    block_tensors,
    expert_tensors,
)
from weightsmith.checkpoint.gguf_vocab import GGUFWriter, add_tokenizer
from weightsmith.checkpoint.modelfile import modelfile_path, modelfile_text
from weightsmith.checkpoint.pooling import POOLING_IDS
from weightsmith.checkpoint.quantized import float_state
from weightsmith.errors import CheckpointError, UsageError
from weightsmith.files import atomic_file, write_text_atomic
from weightsmith.models.families import periodic_rope_layers
from weightsmith.models.fused import fuse_state
from weightsmith.models.rope import longrope_attention_factor

if TYPE_CHECKING:
    from weightsmith.checkpoint.load import Checkpoint
    from weightsmith.models import ModelConfig

logger = logging.getLogger(__name__)

#: Our model_type -> llama.cpp architecture. Mistral has no architecture of its own in llama.cpp.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "smollm3": "smollm3",
    "olmo2": "olmo2",
    "gpt_oss": "gpt-oss",
}
#: llama.cpp architectures whose graph has sliding-window attention (from the file's window).
_SWA_ARCHITECTURES = ("gemma2", "gemma3", "phi3", "gpt-oss")

# Reverse of gguf_names.py's map: HF module name (inside a layer, or global) -> GGUF name.
_HF_GLOBAL = {hf: name for name, hf in GLOBAL_TENSORS.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for a llama-family q_proj/k_proj weight or bias.

    HF's rope pairs dimension i with i + head_dim/2 of each head; ggml's llama rope pairs 2i with
    2i+1. Reordering each head's rows halves-to-pairs makes ggml compute what HF computes. This is
    the inverse of `gguf.unpermute_qk`; `n_head` is num_key_value_heads for k_proj.
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    # (n_head, 2, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...) -> (n_head * head_dim, ...)
    return w.reshape(n_head, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str | None:
    """llama.cpp's tensor name for an HF parameter name (inverse of `gguf.hf_tensor_name`)."""
    module, _, suffix = hf_name.rpartition(".")
    if module in _HF_GLOBAL and suffix in ("weight", "bias"):
        return f"{_HF_GLOBAL[module]}.{suffix}"
    block = {hf: name for name, hf in block_tensors(arch).items()}
    block.update({hf: f"{kind}_exps" for kind, hf in expert_tensors(arch).items()})  # stacked experts
    match = _HF_LAYER.fullmatch(hf_name)
    if match is None and hf_name.endswith(".self_attn.sinks"):  # a parameter, not a module's weight
        match = _HF_LAYER.fullmatch(f"{hf_name}.weight")
    if match is None or match.group(2) not in block:
        return None
    layer, module, suffix = match.groups()
    return f"blk.{layer}.{block[module]}.{suffix}"


# ---------------------------------------------------------------------------------------------
# Hyperparameters


def _context_length(cfg: ModelConfig, arch: str) -> int:
    if "sliding_attention" not in cfg.layer_types or not cfg.sliding_window or arch in _SWA_ARCHITECTURES:
        return cfg.max_position_embeddings
    if cfg.sliding_window >= cfg.max_position_embeddings:
        return cfg.max_position_embeddings
    # llama.cpp's llama/qwen2 graphs attend to the whole context; within the window that equals
    # sliding-window attention, so a context capped at the window keeps the model exact.
    logger.warning(
        "GGUF export: sliding window %d is not expressible for llama.cpp's %s graph; writing "
        "context_length %d (the window) instead of %d",
        cfg.sliding_window,
        cfg.model_type,
        cfg.sliding_window,
        cfg.max_position_embeddings,
    )
    return cfg.sliding_window


def check_supported(cfg: ModelConfig, source: str) -> str:
    """llama.cpp's architecture for the model, or a CheckpointError saying why it cannot be exported."""
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None:
        raise CheckpointError(
            f"{source}: GGUF export of {cfg.model_type} models is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    act = "gelu_pytorch_tanh" if arch in GEMMA_ARCHITECTURES else "silu"
    if cfg.hidden_act != act:
        raise CheckpointError(
            f"{source}: hidden_act {cfg.hidden_act!r} cannot be exported; llama.cpp's {arch} uses {act}"
        )
    if arch in GEMMA_ARCHITECTURES:
        check_gemma(cfg, arch, source)
    if arch == "smollm3":
        every = SMOLLM3_NO_ROPE_EVERY
        if cfg.no_rope_layers != periodic_rope_layers(every, cfg.num_hidden_layers):
            raise CheckpointError(
                f"{source}: no_rope_layers {cfg.no_rope_layers} cannot be exported; llama.cpp's smollm3 "
                f"graph leaves every {every}th layer without RoPE"
            )
    check_experts(cfg, source)
    if arch == "gpt-oss":
        check_gpt_oss(cfg, source)
    elif cfg.rope_type not in ("default", "linear", "llama3", "longrope"):
        raise CheckpointError(
            f"{source}: {cfg.rope_type} rope scaling cannot be exported to GGUF yet "
            "(supported: none, linear, llama3, longrope)"
        )
    if cfg.rope_type == "llama3" and arch != "llama":
        raise CheckpointError(f"{source}: llama3 rope scaling is only exported for llama models")
    if cfg.rope_type == "longrope" and arch != "phi3":
        raise CheckpointError(f"{source}: longrope scaling is only exported for phi3 models")
    return arch


def _llama3_rope_factors(cfg: ModelConfig, source: str) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor (inv_freq / scaled inv_freq) for Llama 3.1 rope scaling.

    Only Meta's published band edges are written: the reader recovers the scaling from the
    factors by assuming them, so any other values would not survive a round trip.
    """
    from weightsmith.models.rope import llama3_scaled

    scaling = dict(cfg.rope_scaling or {})
    for key, value in LLAMA3_ROPE.items():
        if float(scaling.get(key, value)) != float(value):
            raise CheckpointError(
                f"{source}: llama3 rope scaling with {key}={scaling.get(key)} cannot be exported "
                f"(only Meta's {key}={value} is supported)"
            )
    scaling = {**LLAMA3_ROPE, **scaling}
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (inv_freq / llama3_scaled(inv_freq, scaling)).numpy().astype(np.float32)


def _add_hparams(
    writer: gguf.GGUFWriter, cfg: ModelConfig, name: str, file_type: int, pooling: str | None = None
) -> None:
    writer.add_name(name)
    if pooling in POOLING_IDS:  # an embedding model's pooling, for llama.cpp's --embedding
        writer.add_pooling_type(gguf.PoolingType(POOLING_IDS[pooling]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter writes
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(_context_length(cfg, writer.arch))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.rotary_dim)  # Phi-3's partial rotary: fewer than head_dim
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        # llama.cpp assumes hidden/heads unless told otherwise.
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if writer.arch in _SWA_ARCHITECTURES and "sliding_attention" in cfg.layer_types and cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    if writer.arch == "gemma2":  # its graph caps both; _check_gemma made sure the model has caps
        writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))  # type: ignore[arg-type]
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))  # type: ignore[arg-type]
    if cfg.rope_type == "longrope":  # the factors are tensors (_add_tensors)
        original = int(cfg.rope_scaling["original_max_position_embeddings"])  # type: ignore[index]
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(cfg))
        writer.add_rope_scaling_orig_ctx_len(original)
    if cfg.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))  # type: ignore[index]
    if cfg.rope_type == "yarn":  # gpt-oss (check_gpt_oss)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))  # type: ignore[index]
        writer.add_rope_scaling_orig_ctx_len(int(cfg.rope_scaling["original_max_position_embeddings"]))  # type: ignore[index]
    add_expert_hparams(writer, cfg)


# ---------------------------------------------------------------------------------------------
# Tensors


def _check_layout(model: torch.nn.Module, cfg: ModelConfig, source: str) -> None:
    """Refuse a model whose parameters are not in plain HF layout (e.g. CPU decode layout)."""
    from weightsmith.models import CausalLM

    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in CausalLM(cfg).named_parameters()}
    for name, p in model.named_parameters():
        if expected.get(name) != tuple(p.shape):
            raise UsageError(
                f"{source}: parameter {name} is not in HF layout; load the model with "
                "load_checkpoint(..., decode_layout=False) before exporting"
            )


def _add_tensors(
    writer: gguf.GGUFWriter,
    model: torch.nn.Module,
    cfg: ModelConfig,
    arch: str,
    mix: Mix,
    source: str,
    tick: Any,
) -> Counter[str]:
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    counts: Counter[str] = Counter()
    # Phi-3: q/k/v and gate/up stacked into llama.cpp's attn_qkv and ffn_up, as in the checkpoint;
    # each layer's experts stacked into (n_expert, out, in) tensors.
    state = stack_experts(fuse_state(cfg, float_state(model, cfg, source)))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent
    for done, (hf_name, p) in enumerate(state.items(), 1):
        name = gguf_tensor_name(hf_name, arch)
        if name is None:
            raise CheckpointError(f"{source}: parameter {hf_name} has no llama.cpp tensor name")
        w = p.to(device="cpu", dtype=torch.float32).numpy()
        if not np.isfinite(w).all():
            raise CheckpointError(f"{source}: {hf_name} holds NaN or infinite values; it cannot be exported")
        proj = hf_name.rsplit(".", 2)[-2]
        # ggml's llama rope needs the pair-interleaved row order; the others use NEOX rope (HF order).
        if arch in PERMUTED_QK and proj in heads:
            w = permute_qk(w, heads[proj])
        if arch in NORM_SHIFTED and hf_name.endswith("norm.weight"):
            w = w + 1.0  # llama.cpp's Gemma norms scale by the stored weight: store 1 + w
        stored_type = mix.tensor_type(name, w.shape)
        data = mix.encode(name, w, stored_type)
        if stored_type in (QT.F32, QT.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=stored_type)
        counts[stored_type.name] += 1
        if tick is not None:
            tick(done, len(state))
    if cfg.rope_type == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg, source))
        counts["F32"] += 1
    if cfg.rope_type == "longrope":
        for key, name in LONGROPE_TENSORS.items():
            writer.add_tensor(name, np.asarray(cfg.rope_scaling[key], dtype=np.float32))  # type: ignore[index]
            counts["F32"] += 1
    if mix.fallbacks:
        logger.warning(
            "GGUF export: %d tensors have rows their type's blocks do not divide and took another type: %s",
            len(mix.fallbacks),
            ", ".join(f"{k} ({v})" for k, v in list(mix.fallbacks.items())[:5])
            + (" ..." if len(mix.fallbacks) > 5 else ""),
        )
    return counts


# ---------------------------------------------------------------------------------------------
# Export


def _load(path: str | Path, allow_pickle: bool) -> Checkpoint:
    from weightsmith.checkpoint.load import load_checkpoint

    return load_checkpoint(
        path, device="cpu", dtype=torch.float32, allow_pickle=allow_pickle, decode_layout=False
    )


def _mix(cfg: ModelConfig, arch: str, quant: str, imatrix: Any) -> Mix:
    """What the type rules read of the model (gguf_mix.py)."""
    gqa, layers = cfg.num_attention_heads // max(cfg.num_key_value_heads, 1), cfg.num_hidden_layers
    big = arch == "llama" and layers == 80 and gqa > 1  # llama.cpp's LLM_TYPE_70B
    return Mix(quant, layers, cfg.num_local_experts, not cfg.tie_word_embeddings, gqa, big, imatrix)


def write_out(writer: gguf.GGUFWriter) -> None:
    """Write what was added to `writer` (header, metadata, tensors) to its file, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_export_args(out: str | Path, quant: str, *, overwrite: bool = False) -> Path:
    """Refuse a bad quant or output path before any model is loaded; returns `out` as a Path."""
    out = Path(out)
    if quant not in QUANTS:
        raise UsageError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    if out.suffix.lower() != ".gguf":
        raise UsageError(f"{out}: the output file name must end in .gguf; pass --out NAME.gguf")
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; pass --out NAME.gguf")
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")
    return out


def export_gguf(
    checkpoint_or_path: Checkpoint | str | Path,
    out: str | Path,
    quant: str = "f16",
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    name: str | None = None,
    on_tensor: Any = None,
    imatrix: Any = None,
) -> dict[str, Any]:
    """Write the model as a GGUF file at `out` and an Ollama Modelfile beside it.

    checkpoint_or_path: a Checkpoint loaded with decode_layout=False, or an HF directory / .gguf
    file (loaded on CPU in fp32). `on_tensor(done, total)` is called as each tensor is converted;
    `imatrix` (a `checkpoint.imatrix.Imatrix`) weighs the quantizer's fits. Returns a summary.
    """
    out = check_export_args(out, quant, overwrite=overwrite)
    if isinstance(checkpoint_or_path, (str, Path)):
        source_path = Path(checkpoint_or_path)
        if source_path.exists() and out.exists() and source_path.resolve() == out.resolve():
            raise UsageError(f"{out}: is the model being exported; choose another --out")
        ckpt = _load(source_path, allow_pickle)
    else:
        ckpt = checkpoint_or_path
    cfg, source = ckpt.config, str(ckpt.path)
    arch = check_supported(cfg, source)
    _check_layout(ckpt.model, cfg, source)
    mix = _mix(cfg, arch, quant, imatrix)
    model_name = name or (ckpt.path.stem if ckpt.path.is_file() else ckpt.path.name)
    # Everything that can fail on the model's own data runs before the GGUF file is written.
    modelfile_body = modelfile_text(out.name, ckpt.tokenizer, ckpt.generation_config)

    with atomic_file(out) as tmp:
        writer = GGUFWriter(tmp, arch)
        _add_hparams(writer, cfg, model_name, int(QUANTS[quant][1]), ckpt.pooling)
        mix.add_imatrix_metadata(writer)
        pre = add_tokenizer(writer, ckpt.tokenizer, cfg, source)
        counts = _add_tensors(writer, ckpt.model, cfg, arch, mix, source, on_tensor)
        write_out(writer)
    modelfile = modelfile_path(out)
    write_text_atomic(modelfile, modelfile_body)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "format": "gguf",
        "quant": quant,
        "architecture": arch,
        "model_type": cfg.model_type,
        "tokenizer_pre": pre,
        "tensors": dict(sorted(counts.items())),
        "f16_fallbacks": [name for name, how in mix.fallbacks.items() if how.endswith("F16")],
        "fallbacks": mix.fallbacks,
        "imatrix": None if imatrix is None else {"weighted": mix.weighted, "without": mix.unweighted},
        "modelfile": str(modelfile),
    }
