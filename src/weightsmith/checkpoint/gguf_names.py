"""llama.cpp's names for what GGUF files hold: architectures and tensors, mapped to ours (HF's).

What it does: says which `general.architecture` values weightsmith reads and the model_type
and HF class each becomes, and maps every GGUF tensor name (`blk.3.attn_q.weight`) to the HF
parameter name (`model.layers.3.self_attn.q_proj.weight`), per architecture where llama.cpp
reuses a name for another tensor (Gemma 3's `ffn_norm` is the pre-feed-forward norm, Phi-3's
`ffn_up` holds gate and up stacked). Fused tensors (Phi-3's `attn_qkv`, `ffn_up`) map to the
fused HF name, which the model builder splits (checkpoint/build.py).

Not here: reading files or metadata (gguf.py, gguf_reader.py), writing them (gguf_write.py).
"""

from __future__ import annotations

import re

#: GGUF `general.architecture` -> our model_type. mistral and mixtral files say "llama".
ARCHITECTURE_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "mixtral", "qwen3", "gemma3", "phi3")

# model_type -> the HF class name that goes into config["architectures"].
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

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
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
#: Architectures whose converter stores norm weights w as 1 + w (llama.cpp's Gemma converters).
NORM_SHIFTED = ("gemma3",)
# Mixtral's HF names for an expert's three matrices: w1 = gate, w3 = up, w2 = down.
_EXPERT_TENSORS = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
# Tensors llama.cpp computes for its own kernels, not weights of the HF model.
SKIPPED_TENSORS = {"rope_freqs.weight"}

# blk.{layer}.{kind}[.{expert}].{weight|bias}; merged experts are kind "ffn_gate_exps" etc.
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)(?:\.(\d+))?\.(weight|bias)")


def block_tensors(arch: str = "llama") -> dict[str, str]:
    """GGUF block tensor kind -> HF module name inside a layer, for one architecture."""
    return {**BLOCK_TENSORS, **ARCH_BLOCK_TENSORS.get(arch, {})}


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
    if expert is not None and kind in _EXPERT_TENSORS:
        return f"{prefix}.block_sparse_moe.experts.{expert}.{_EXPERT_TENSORS[kind]}.{suffix}"
    if expert is None and kind.endswith("_exps") and kind[: -len("_exps")] in _EXPERT_TENSORS:
        w = _EXPERT_TENSORS[kind[: -len("_exps")]]
        return f"{prefix}.block_sparse_moe.experts.{{expert}}.{w}.{suffix}"
    block = block_tensors(arch)
    if expert is None and kind in block:
        return f"{prefix}.{block[kind]}.{suffix}"
    return None
