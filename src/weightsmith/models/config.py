"""ModelConfig: the architecture of a decoder-only transformer, in config.json's words.

Field names are exactly the ones in a Hugging Face `config.json` (`hidden_size`,
`num_key_value_heads`, `rope_theta`, ...), so a config is read with no key map and
written back in a form transformers loads. The family (`model_type`) only chooses
defaults from the plain `FAMILIES` dict below; the model itself is one class.

Not here: reading files (see `weightsmith.checkpoint`), the model (see `model.py`),
RoPE math (see `rope.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from weightsmith.errors import ConfigError
from weightsmith.models.activations import ACTIVATIONS


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
    #: RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    #: Gemma's block: RMSNorm scales by (1 + weight), the embedding is multiplied by
    #: sqrt(hidden_size), and the attention and feed-forward outputs are normed again
    #: (`post_attention_layernorm`, `pre_/post_feedforward_layernorm`) before the residual.
    gemma: bool = False
    #: Gemma, without `layer_types`: every this-many-th layer is global, the others slide
    #: (transformers' `sliding_window_pattern` default: 2 in Gemma 2, 6 in Gemma 3).
    global_every: int = 6
    #: Gemma 3: sliding layers turn RoPE with their own base (`rope_local_base_freq`).
    local_rope: bool = False
    #: Checkpoint tensors that hold several of our projections stacked by rows (Phi-3's
    #: `qkv_proj`, `gate_up_proj`): split when loading, stacked again when saving.
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: config.json's name for `hidden_act` in transformers' class for the family.
    act_key: str = "hidden_act"

    @property
    def moe_block(self) -> str:
        """The layer's attribute holding its experts (`block_sparse_moe` or `mlp`)."""
        return MOE_LAYOUTS[self.moe][0]

    @property
    def expert_names(self) -> tuple[str, str, str]:
        """An expert's (gate, up, down) projection names in the checkpoint."""
        return MOE_LAYOUTS[self.moe][1]


#: Where a layer keeps its experts and an expert's (gate, up, down) names, by layout:
#: Mixtral's `block_sparse_moe.experts.3.w1`, Qwen-MoE's `mlp.experts.3.gate_proj`. The router
#: is `gate` in both. Qwen-MoE also has fields of its own (`moe_intermediate_size`,
#: `norm_topk_prob`, dense layers by `mlp_only_layers` and `decoder_sparse_step`).
MOE_LAYOUTS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
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
    "phi3": Family(
        "Phi3ForCausalLM",
        hf_absent=("layer_types", "attention_bias", "mlp_bias", "head_dim"),
        fused=(
            ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
        ),
    ),
}

#: RoPE scaling types we implement (see rope.py). "default" means no scaling.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (config.json fields)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    #: HF rope scaling dict (`{"rope_type": "llama3", "factor": 8.0, ...}`) or None.
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    #: Per-layer attention kind: "full_attention" or "sliding_attention".
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    #: Qwen-MoE: each expert's intermediate size (None: intermediate_size, as in Mixtral).
    moe_intermediate_size: int | None = None
    #: Whether the chosen experts' softmax weights are renormalised to sum to 1 (Mixtral: always).
    norm_topk_prob: bool = True
    #: Qwen-MoE: layers with a dense MLP instead of experts: those listed, and all but every
    #: `decoder_sparse_step`-th.
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    #: Gemma: attention scores are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim).
    query_pre_attn_scalar: float | None = None
    #: Gemma 2: logits (and attention scores) pass through cap * tanh(x / cap) (None: off).
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    #: Gemma 3: the RoPE base of sliding-window layers (None: rope_theta, as full layers).
    rope_local_base_freq: float | None = None

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def architecture(self) -> str:
        return self.family.architecture

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def num_parameters(self) -> int:
        """Parameter count implied by the config (tied embeddings counted once)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        per_layer = attn + (4 if self.family.gemma else 2) * h
        if self.family.qk_norm:
            per_layer += 2 * self.head_dim
        experts = self.num_local_experts * (3 * h * (self.moe_intermediate_size or i) + h)
        sparse = sum(self.sparse_layer(n) for n in range(self.num_hidden_layers))
        mlp = sparse * experts + (self.num_hidden_layers - sparse) * 3 * h * i
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + mlp + embed + h

    def sparse_layer(self, index: int) -> bool:
        """Whether layer `index` routes through experts (else it has a dense MLP)."""
        return (
            self.num_local_experts > 0
            and index not in self.mlp_only_layers
            and (index + 1) % self.decoder_sparse_step == 0
        )

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_hf(cls, data: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Build from a config.json dict; errors name `source` and the field."""
        model_type = data.get("model_type")
        if model_type not in FAMILIES:
            supported = ", ".join(FAMILIES)
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: {supported}); "
                "use a checkpoint of one of these families"
            )
        for name in REQUIRED_FIELDS:
            if not isinstance(data.get(name), int) or data[name] <= 0:
                raise ConfigError(
                    f"{source}: field {name!r} must be a positive integer, got {data.get(name)!r}"
                )
        fam = FAMILIES[model_type]
        heads = data["num_attention_heads"]
        kv_heads = data.get("num_key_value_heads") or heads
        head_dim = data.get("head_dim") or data["hidden_size"] // heads
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads}) for grouped-query attention"
            )
        rope_theta, rope_scaling, local_theta = _read_rope(data, fam, source)
        n_layers = data["num_hidden_layers"]
        _refuse_unsupported(data, source)
        cfg = cls(
            model_type=model_type,
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=data.get("max_position_embeddings") or 2048,
            rms_norm_eps=float(data.get("rms_norm_eps") or 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            hidden_act=data.get(fam.act_key) or data.get("hidden_act") or "silu",
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bool(data.get("attention_bias", fam.attention_bias)),
            mlp_bias=bool(data.get("mlp_bias", False)),
            layer_types=_read_layer_types(data, fam, n_layers, source),
            sliding_window=data.get("sliding_window"),
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=data.get("eos_token_id"),
            pad_token_id=data.get("pad_token_id"),
            torch_dtype=str(data.get("torch_dtype") or data.get("dtype") or "float32"),
            rope_local_base_freq=local_theta,
            **_gemma_fields(data, fam, source),
            **_moe_fields(data, fam, source),
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Reject combinations the model cannot run, naming the conflicting fields."""
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"{source}: hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope_scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim {self.head_dim} must be even for rotary embeddings")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError(
                f"{source}: layer_types has sliding_attention layers but sliding_window is not set"
            )
        if self.family.moe and not (0 < self.num_experts_per_tok <= self.num_local_experts):
            raise ConfigError(
                f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"num_local_experts ({self.num_local_experts})"
            )
        if any(not 0 <= n < self.num_hidden_layers for n in self.mlp_only_layers):
            raise ConfigError(
                f"{source}: mlp_only_layers {self.mlp_only_layers} must list layer indices below "
                f"num_hidden_layers ({self.num_hidden_layers})"
            )

    # ------------------------------------------------------------------ writing
    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (v4 and v5) and we both read back."""
        d = dataclasses.asdict(self)
        d["architectures"] = [self.architecture]
        if not self.family.moe:
            for key in ("num_local_experts", "num_experts_per_tok", *QWEN_MOE_FIELDS):
                d.pop(key)
        elif self.family.moe == "qwen":  # config.json's own name, which transformers v4 and v5 read
            d["num_experts"] = d.pop("num_local_experts")
        if self.family.sliding_window_needs_flag:
            d["use_sliding_window"] = "sliding_attention" in self.layer_types
        if not self.rope_scaling:
            d["rope_scaling"] = None
        if self.family.act_key != "hidden_act":
            d[self.family.act_key] = d.pop("hidden_act")
        if not self.family.gemma:
            for key in ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"):
                d.pop(key)
        if not self.family.local_rope:
            d.pop("rope_local_base_freq")
        # What transformers assumes for a key its config class lacks (then the key can go).
        assumed = {
            "layer_types": _read_layer_types(
                {k: v for k, v in d.items() if k != "layer_types"},
                self.family,
                self.num_hidden_layers,
                "config",
            ),
            "sliding_window": None,
            "attention_bias": self.family.attention_bias,
            "mlp_bias": False,
            "head_dim": self.hidden_size // self.num_attention_heads,
            **QWEN_MOE_FIELDS,
        }
        for key in self.family.hf_absent:
            if d.get(key) == assumed[key]:
                d.pop(key, None)
        return d


def _read_rope(
    data: dict[str, Any], fam: Family, source: str
) -> tuple[float, dict[str, Any] | None, float | None]:
    """RoPE base, scaling and (Gemma 3) sliding layers' base from either the v4 (`rope_theta`,
    `rope_scaling`, `rope_local_base_freq`) or v5 (`rope_parameters`, per layer type for
    Gemma 3) layout of config.json."""
    params = data.get("rope_parameters") or {}
    local = data.get("rope_local_base_freq")
    if isinstance(params.get("full_attention"), dict):  # v5, one entry per layer type
        sliding = params.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{source}: rope_parameters.sliding_attention: rope_type {sliding['rope_type']!r} is not "
                "supported for sliding layers (supported: default)"
            )
        local = sliding.get("rope_theta", local)
        params = params["full_attention"]
    scaling = data.get("rope_scaling") or None
    theta = data.get("rope_theta") or params.get("rope_theta") or fam.default_rope_theta
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object, got {scaling!r}")
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
        elif scaling["rope_type"] in ("llama3", "yarn"):
            scaling.setdefault("original_max_position_embeddings", data.get("max_position_embeddings", 2048))
    if not fam.local_rope:
        local = None
    elif local is None:
        local = 10000.0  # transformers' Gemma 3 default for sliding layers
    return float(theta), scaling, None if local is None else float(local)


def _gemma_fields(data: dict[str, Any], fam: Family, source: str) -> dict[str, float | None]:
    """Gemma's own fields (transformers' defaults when absent); other families have none."""
    if not fam.gemma:
        return {}
    return {
        "query_pre_attn_scalar": _number(data, "query_pre_attn_scalar", 256, source),
        "final_logit_softcapping": _number(data, "final_logit_softcapping", None, source),
        "attn_logit_softcapping": _number(data, "attn_logit_softcapping", None, source),
    }


def _moe_fields(data: dict[str, Any], fam: Family, source: str) -> dict[str, Any]:
    """The experts' fields; Qwen-MoE names its expert count `num_experts` (transformers v5 writes
    `num_local_experts`) and defaults norm_topk_prob to false, as transformers does."""
    if not fam.moe:
        return {}
    count_key = "num_experts" if fam.moe == "qwen" and "num_experts" in data else "num_local_experts"
    fields = {
        "num_local_experts": _count(data, count_key, 0, source),
        "num_experts_per_tok": _count(data, "num_experts_per_tok", 0, source),
    }
    if fam.moe != "qwen":
        return fields
    only = data.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(isinstance(n, bool) or not isinstance(n, int) for n in only):
        raise ConfigError(f"{source}: field 'mlp_only_layers' must be a list of layer indices, got {only!r}")
    return {
        **fields,
        "moe_intermediate_size": _count(data, "moe_intermediate_size", 1, source, required=True),
        "norm_topk_prob": bool(data.get("norm_topk_prob", False)),
        "mlp_only_layers": sorted(set(only)),
        "decoder_sparse_step": _count(data, "decoder_sparse_step", 1, source) or 1,
    }


def _count(data: dict[str, Any], key: str, least: int, source: str, required: bool = False) -> int:
    """An integer field of at least `least` (0 when absent, unless required)."""
    value = data.get(key)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < max(least, 0):
        raise ConfigError(f"{source}: field {key!r} must be an integer of at least {least}, got {value!r}")
    return value


def _number(data: dict[str, Any], key: str, default: float | None, source: str) -> float | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{source}: field {key!r} must be a positive number or null, got {value!r}")
    return value  # an int stays an int: transformers' strict config checks the type on reading


def _refuse_unsupported(data: dict[str, Any], source: str) -> None:
    """Fields whose non-default values change the model in ways it does not implement."""
    params = data.get("rope_parameters") or {}
    partial = data.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(
            f"{source}: partial_rotary_factor {partial} is not supported (RoPE over the whole head only)"
        )
    if data.get("use_bidirectional_attention"):
        raise ConfigError(
            f"{source}: use_bidirectional_attention (an embedding model) is not supported; "
            "weightsmith runs causal language models"
        )


def _read_layer_types(data: dict[str, Any], fam: Family, n_layers: int, source: str) -> list[str]:
    """Which layers use sliding-window attention, following each family's rule."""
    given = data.get("layer_types")
    if given:
        if len(given) != n_layers or any(t not in ("full_attention", "sliding_attention") for t in given):
            raise ConfigError(
                f"{source}: layer_types must list {n_layers} entries of full_attention/sliding_attention"
            )
        return list(given)
    window = data.get("sliding_window")
    if not window:
        return ["full_attention"] * n_layers
    if fam.gemma:  # every `sliding_window_pattern`-th layer is global
        every = data.get("sliding_window_pattern") or data.get("_sliding_window_pattern") or fam.global_every
        return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]
    if fam.sliding_window_needs_flag:
        if not data.get("use_sliding_window", False):
            return ["full_attention"] * n_layers
        # Qwen2 and Qwen3 window the layers from max_window_layers on; Qwen3-MoE every layer.
        first = 0 if fam.moe else data.get("max_window_layers", n_layers)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return ["sliding_attention"] * n_layers
