"""llama.cpp's names for what GGUF files hold: architectures and tensors, mapped to ours (HF's).

What it does: says which `general.architecture` values weightsmith reads and the model_type
and HF class each becomes, and maps every GGUF tensor name (`blk.3.attn_q.weight`) to the HF
parameter name (`model.layers.3.self_attn.q_proj.weight`), per architecture where llama.cpp
reuses a name for another tensor (Gemma's `ffn_norm` is the pre-feed-forward norm, Phi-3's
`ffn_up` holds gate and up stacked). Fused tensors (Phi-3's `attn_qkv`, `ffn_up`) map to the
fused HF name, which the model builder splits (checkpoint/build.py).

Not here: reading files or metadata (gguf.py, gguf_reader.py), writing them (gguf_write.py).
"""

from __future__ import annotations

import re

from weightsmith.models.config import FAMILIES

#: GGUF `general.architecture` -> our model_type. mistral and mixtral files say "llama".
ARCHITECTURE_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "smollm3": "smollm3",
    "olmo2": "olmo2",
    "gpt-oss": "gpt_oss",
}
SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "mixtral", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3", "smollm3",
    "olmo2", "gpt-oss",
)  # fmt: skip
#: Architectures whose Q/K rows llama.cpp's converter permutes for its interleaved ("normal") rope.
PERMUTED_QK = ("llama", "smollm3")
#: llama.cpp's smollm3 graph leaves every 4th layer without RoPE (fixed in its code).
SMOLLM3_NO_ROPE_EVERY = 4
#: llama.cpp's Gemma graphs: GeGLU, norm weights stored as 1 + w, settings fixed in code (gguf.py).
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")

# model_type -> the HF class name that goes into config["architectures"].
HF_ARCHITECTURES = {model_type: family.architecture for model_type, family in FAMILIES.items()}

GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
#: Block tensor names that mean something else in one architecture.
ARCH_BLOCK_TENSORS = {
    **dict.fromkeys(
        ("gemma2", "gemma3"),
        {
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
    ),
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "olmo2": {
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "qwen3moe": {"ffn_gate_inp": "mlp.gate"},
    # gpt-oss: the MLP's input norm is `post_attention_norm`; the router has a bias; a sink per head.
    "gpt-oss": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_gate_inp": "mlp.router",
        "attn_sinks": "self_attn.sinks",
    },
}
#: Block tensors that are a parameter of ours, not a module's weight (`blk.0.attn_sinks.weight` is
#: `model.layers.0.self_attn.sinks`).
PARAMETER_KINDS = ("attn_sinks",)
#: llama.cpp architecture -> our family, for its expert tensors' names.
_EXPERT_FAMILIES = {"qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}
#: Architectures whose converter stores norm weights w as 1 + w (llama.cpp's Gemma converters).
NORM_SHIFTED = GEMMA_ARCHITECTURES
#: llama.cpp's kinds for an expert's gate, up and down matrices.
_EXPERT_KINDS = ("ffn_gate", "ffn_up", "ffn_down")
# Tensors llama.cpp computes for its own kernels, not weights of the HF model: the RoPE factors of
# Llama 3.1 and of LongRoPE (Phi-3.5, Phi-4-mini), read into the config's rope_scaling instead.
LONGROPE_TENSORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
SKIPPED_TENSORS = {"rope_freqs.weight", *LONGROPE_TENSORS.values()}

# blk.{layer}.{kind}[.{expert}].{weight|bias}; merged experts are kind "ffn_gate_exps" etc.
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)(?:\.(\d+))?\.(weight|bias)")


def block_tensors(arch: str = "llama") -> dict[str, str]:
    """GGUF block tensor kind -> HF module name inside a layer, for one architecture."""
    return {**BLOCK_TENSORS, **ARCH_BLOCK_TENSORS.get(arch, {})}


def expert_tensors(arch: str = "llama") -> dict[str, str]:
    """llama.cpp's kind for an expert matrix -> HF module name inside a layer, with an `{expert}`
    placeholder: Mixtral's `block_sparse_moe.experts.{expert}.w1` (llama files), Qwen3-MoE's and
    gpt-oss's `mlp.experts.{expert}.gate_proj` (qwen3moe, gpt-oss files)."""
    family = FAMILIES[_EXPERT_FAMILIES.get(arch, "mixtral")]
    return {
        kind: f"{family.moe_block}.experts.{{expert}}.{name}"
        for kind, name in zip(_EXPERT_KINDS, family.expert_names, strict=True)
    }


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF parameter name for a GGUF tensor name, or None if the name is not one we map.

    A merged expert tensor (`blk.N.ffn_gate_exps.weight`) maps to a name with an `{expert}`
    placeholder, to be filled in per expert when the 3-D tensor is split.
    """
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS and suffix in ("weight", "bias"):
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None:
        return None
    layer, kind, expert, suffix = match.groups()
    prefix = f"model.layers.{layer}"
    experts = expert_tensors(arch)
    if expert is not None and kind in experts:
        return f"{prefix}.{experts[kind].format(expert=expert)}.{suffix}"
    if expert is None and kind.endswith("_exps") and kind[: -len("_exps")] in experts:
        return f"{prefix}.{experts[kind[: -len('_exps')]]}.{suffix}"
    block = block_tensors(arch)
    if expert is None and kind in block:
        if kind in PARAMETER_KINDS:
            return f"{prefix}.{block[kind]}" if suffix == "weight" else None
        return f"{prefix}.{block[kind]}.{suffix}"
    return None
