"""The supported families (`model_type`) and what differs between them, as a closed set of flags.

Each `Family` holds config defaults, transformers' class name and the flags the one model class
reads (QK-norm, Gemma's block, layers without RoPE, the experts' layout, fused checkpoint
tensors, ...). Adding a family that only differs by these flags is one entry in `FAMILIES`.

Not here: reading and writing config.json (config.py), the model (model.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What differs between supported families, as config defaults and HF class names."""

    architecture: str
    attention_bias: bool = False
    default_rope_theta: float = 10000.0
    #: Whether `sliding_window` applies to every layer when set (Mistral, Mixtral) or
    #: only when `use_sliding_window` is true, from `max_window_layers` on (Qwen2).
    sliding_window_needs_flag: bool = False
    #: A sparse mixture of experts in the layout named in `MOE_LAYOUTS` ("": a dense MLP).
    moe: str = ""
    #: Our fields that transformers' config class for the family does not define: `to_hf`
    #: leaves them out while they hold what that class assumes (an unknown key can break
    #: transformers, e.g. `layer_types` in a Llama config breaks its static-cache generate).
    hf_absent: tuple[str, ...] = ()
    #: RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3); with
    #: `qk_norm_whole`, over each projection's whole output, all heads at once (OLMo 2).
    qk_norm: bool = False
    qk_norm_whole: bool = False
    #: OLMo 2's block: no norm before attention or MLP; their outputs are normed
    #: (`post_attention_layernorm`, `post_feedforward_layernorm`) before the residual, and its
    #: norms multiply by their weight in fp32 before casting back.
    post_norm: bool = False
    #: Gemma's block: RMSNorm scales by (1 + weight), the embedding is multiplied by
    #: sqrt(hidden_size), and the attention and feed-forward outputs are normed again
    #: (`post_attention_layernorm`, `pre_/post_feedforward_layernorm`) before the residual.
    gemma: bool = False
    #: Gemma, without `layer_types`: every this-many-th layer is global, the others slide
    #: (transformers' `sliding_window_pattern` default: 2 in Gemma 2, 6 in Gemma 3).
    global_every: int = 6
    #: Gemma 3: sliding layers turn RoPE with their own base (`rope_local_base_freq`).
    local_rope: bool = False
    #: SmolLM3: some layers attend without RoPE ("NoPE"), listed by `no_rope_layers`.
    nope: bool = False
    #: Checkpoint tensors that hold several of our projections stacked by rows (Phi-3's
    #: `qkv_proj`, `gate_up_proj`): split when loading, stacked again when saving.
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: config.json's name for `hidden_act` in transformers' class for the family.
    act_key: str = "hidden_act"
    #: gpt-oss: a learned logit per query head ("attention sink") joins each softmax over the
    #: keys, taking a share of the probability that no value carries.
    sinks: bool = False

    @property
    def moe_block(self) -> str:
        """The layer's attribute holding its experts (`block_sparse_moe` or `mlp`)."""
        return MOE_LAYOUTS[self.moe][0]

    @property
    def expert_names(self) -> tuple[str, str, str]:
        """An expert's (gate, up, down) projection names in the checkpoint."""
        return MOE_LAYOUTS[self.moe][1]

    @property
    def router_name(self) -> str:
        """The MoE block's router module (`gate`; gpt-oss's `router`, which has a bias)."""
        return MOE_LAYOUTS[self.moe][2]


#: Where a layer keeps its experts, an expert's (gate, up, down) names and the router's name, by
#: layout: Mixtral's `block_sparse_moe.experts.3.w1`, Qwen-MoE's `mlp.experts.3.gate_proj`, routed
#: by `gate`. Qwen-MoE also has fields of its own (`moe_intermediate_size`, `norm_topk_prob`, dense
#: layers by `mlp_only_layers` and `decoder_sparse_step`). gpt-oss: experts with biases and a
#: clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`), routed by `router` (with a bias); its
#: checkpoints hold each layer's experts merged (models/fused.py splits them).
MOE_LAYOUTS: dict[str, tuple[str, tuple[str, str, str], str]] = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), "gate"),
    "qwen": ("mlp", ("gate_proj", "up_proj", "down_proj"), "gate"),
    "gpt_oss": ("mlp", ("gate_proj", "up_proj", "down_proj"), "router"),
}
#: gpt-oss's clamped SwiGLU: its config fields and transformers' defaults.
GPT_OSS_FIELDS = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
#: Qwen-MoE's config fields and the values a Mixtral model has (transformers' Mixtral lacks them).
QWEN_MOE_FIELDS = {
    "moe_intermediate_size": None,
    "norm_topk_prob": True,
    "mlp_only_layers": [],
    "decoder_sparse_step": 1,
}


#: Supported families. Adding a family that only differs by these flags is one line here.
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", hf_absent=("layer_types", "sliding_window")),
    "mistral": Family(
        "MistralForCausalLM",
        default_rope_theta=10000.0,
        hf_absent=("layer_types", "attention_bias", "mlp_bias"),
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM",
        attention_bias=True,
        default_rope_theta=10000.0,
        sliding_window_needs_flag=True,
        hf_absent=("attention_bias", "mlp_bias", "head_dim"),
    ),
    "mixtral": Family(
        "MixtralForCausalLM",
        default_rope_theta=1e6,
        moe="mixtral",
        hf_absent=("layer_types", "attention_bias", "mlp_bias", *QWEN_MOE_FIELDS),
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        default_rope_theta=10000.0,
        sliding_window_needs_flag=True,
        hf_absent=("mlp_bias",),
        qk_norm=True,
    ),
    # Qwen3's attention with Qwen-MoE experts: no shared expert, a window (if any) on every layer.
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM",
        default_rope_theta=10000.0,
        sliding_window_needs_flag=True,
        moe="qwen",
        hf_absent=("mlp_bias", "layer_types", "head_dim"),
        qk_norm=True,
    ),
    # Gemma 2: Gemma 3's block without QK-norm, one RoPE base, attention scores soft-capped.
    "gemma2": Family(
        "Gemma2ForCausalLM",
        hf_absent=("mlp_bias",),
        gemma=True,
        global_every=2,
        act_key="hidden_activation",
    ),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        default_rope_theta=1e6,
        hf_absent=("mlp_bias",),
        qk_norm=True,
        gemma=True,
        local_rope=True,
        act_key="hidden_activation",
    ),
    # OLMo 2 (AI2's fully open models): norms after attention and MLP only, QK-norm over all heads.
    "olmo2": Family(
        "Olmo2ForCausalLM",
        hf_absent=("layer_types", "sliding_window", "head_dim", "mlp_bias"),
        qk_norm=True,
        qk_norm_whole=True,
        post_norm=True,
    ),
    # SmolLM3: Llama's block; every `no_rope_layer_interval`-th layer (4) without RoPE.
    "smollm3": Family(
        "SmolLM3ForCausalLM",
        default_rope_theta=2e6,
        sliding_window_needs_flag=True,
        hf_absent=("head_dim",),
        nope=True,
    ),
    "phi3": Family(
        "Phi3ForCausalLM",
        hf_absent=("layer_types", "attention_bias", "mlp_bias", "head_dim"),
        fused=(
            ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
    # gpt-oss (OpenAI's open-weight MoE): biased attention with a sink logit per head, every other
    # layer sliding (`layer_types`), YaRN RoPE, experts with biases and a clamped SwiGLU, top-k
    # then softmax routing (the same weights as Mixtral's renormalised top-k of a softmax).
    "gpt_oss": Family(
        "GptOssForCausalLM",
        attention_bias=True,
        default_rope_theta=150000.0,
        moe="gpt_oss",
        hf_absent=("mlp_bias", *QWEN_MOE_FIELDS),
        sinks=True,
    ),
}


def periodic_layer_types(every: int, n_layers: int) -> list[str]:
    """Gemma's fixed pattern (transformers' and llama.cpp's): every `every`-th layer global, the
    others sliding."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]


def periodic_rope_layers(every: int, n_layers: int) -> list[int]:
    """SmolLM3's fixed pattern (transformers' and llama.cpp's): 0 (no RoPE) for every `every`-th
    layer, 1 for the others."""
    return [int((i + 1) % every != 0) for i in range(n_layers)]
