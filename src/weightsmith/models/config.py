"""ModelConfig: the architecture of a decoder-only transformer, in config.json's words.

Field names are exactly the ones in a Hugging Face `config.json` (`hidden_size`,
`num_key_value_heads`, `rope_theta`, ...), so a config is read with no key map and
written back in a form transformers loads. The family (`model_type`) only chooses
defaults from the plain `FAMILIES` dict (families.py); the model itself is one class.

Not here: reading files (see `weightsmith.checkpoint`), the model (see `model.py`),
RoPE math (see `rope.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from weightsmith.errors import ConfigError
from weightsmith.models.activations import NAMES as ACTIVATION_NAMES
from weightsmith.models.families import (
    FAMILIES,
    GPT_OSS_FIELDS,
    QWEN_MOE_FIELDS,
    Family,
    periodic_layer_types,
    periodic_rope_layers,
)

__all__ = ["FAMILIES", "Family", "ModelConfig"]


#: RoPE scaling types we implement (see rope.py). "default" means no scaling.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")

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
    #: gpt-oss: each expert's SwiGLU is gate * sigmoid(alpha gate) * (up + 1), gate clamped
    #: above at `swiglu_limit` and up to +-limit (None: the plain SwiGLU of other families).
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
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
    #: SmolLM3: per layer, 1 where queries and keys turn with RoPE, 0 where not (empty: all turn).
    no_rope_layers: list[int] = field(default_factory=list)
    #: Phi-3 (Phi-4-mini): RoPE turns only the first `rotary_dim` of each head's dimensions.
    partial_rotary_factor: float = 1.0

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
        if self.attention_bias:  # the output projection's too, but in Qwen2
            attn += q + 2 * kv + (h if self.model_type != "qwen2" else 0)
        per_layer = attn + (4 if self.family.gemma else 2) * h
        if self.family.qk_norm_whole:
            per_layer += q + kv
        elif self.family.qk_norm:
            per_layer += 2 * self.head_dim
        width = self.moe_intermediate_size or i
        experts = self.num_local_experts * (3 * h * width + h)
        if self.family.moe == "gpt_oss":  # the experts' and router's biases, the sinks
            experts += self.num_local_experts * (2 * width + h + 1)
            per_layer += self.num_attention_heads
        sparse = sum(self.sparse_layer(n) for n in range(self.num_hidden_layers))
        dense = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        mlp = sparse * experts + (self.num_hidden_layers - sparse) * dense
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + mlp + embed + h

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions RoPE turns (all but with a partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def rope_layer(self, index: int) -> bool:
        """Whether layer `index` turns its queries and keys with RoPE (all but SmolLM3's NoPE layers)."""
        return not self.no_rope_layers or bool(self.no_rope_layers[index])

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
        partial = _read_partial_rotary(data, fam, source)
        no_rope = _read_no_rope_layers(data, fam, n_layers, source)
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
            layer_types=_read_layer_types(data, fam, n_layers, source, no_rope),
            sliding_window=data.get("sliding_window"),
            bos_token_id=data.get("bos_token_id"),
            eos_token_id=data.get("eos_token_id"),
            pad_token_id=data.get("pad_token_id"),
            torch_dtype=str(data.get("torch_dtype") or data.get("dtype") or "float32"),
            rope_local_base_freq=local_theta,
            no_rope_layers=no_rope,
            partial_rotary_factor=partial,
            **_gemma_fields(data, fam, source),
            **_moe_fields(data, fam, source),
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Reject combinations the model cannot run, naming the conflicting fields."""
        if self.hidden_act not in ACTIVATION_NAMES:
            raise ConfigError(
                f"{source}: hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATION_NAMES)})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope_scaling type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        if self.head_dim % 2 or self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ConfigError(
                f"{source}: head_dim {self.head_dim} times partial_rotary_factor {self.partial_rotary_factor} "
                f"must be a positive even number of rotary dimensions, got {self.rotary_dim}"
            )
        if self.rope_type == "longrope":
            _check_longrope(self.rope_scaling or {}, self.rotary_dim // 2, source)
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
        if self.family.moe != "gpt_oss":
            for key in GPT_OSS_FIELDS:
                d.pop(key)
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
        if not self.family.nope:
            d.pop("no_rope_layers")
        if self.partial_rotary_factor == 1.0:  # every family's default
            d.pop("partial_rotary_factor")
        if self.rope_type == "longrope":  # also where transformers v4 reads it
            d["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]  # type: ignore[index]
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
        elif scaling["rope_type"] == "longrope":  # Phi-3 keeps it beside rope_scaling
            original = data.get("original_max_position_embeddings") or data.get(
                "max_position_embeddings", 2048
            )
            scaling.setdefault("original_max_position_embeddings", original)
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
    if fam.moe == "gpt_oss":
        return {**fields, **{k: _number(data, k, v, source) for k, v in GPT_OSS_FIELDS.items()}}
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


def _read_partial_rotary(data: dict[str, Any], fam: Family, source: str) -> float:
    """The share of each head RoPE turns: below 1 only in Phi-3 (Phi-4-mini), where transformers
    applies it; elsewhere refused, since the model would compute something else."""
    params = data.get("rope_parameters") or {}
    partial = data.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if partial is None:
        partial = 1.0
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ConfigError(f"{source}: partial_rotary_factor must be a number in (0, 1], got {partial!r}")
    if partial != 1 and fam.architecture != "Phi3ForCausalLM":
        raise ConfigError(
            f"{source}: partial_rotary_factor {partial} is not supported for {fam.architecture} "
            "(RoPE over part of each head: Phi-3 models only)"
        )
    return float(partial)


def _refuse_unsupported(data: dict[str, Any], source: str) -> None:
    """Fields whose non-default values change the model in ways it does not implement."""
    if data.get("use_bidirectional_attention"):
        raise ConfigError(
            f"{source}: use_bidirectional_attention (an embedding model) is not supported; "
            "weightsmith runs causal language models"
        )


def _check_longrope(scaling: dict[str, Any], n: int, source: str) -> None:
    """LongRoPE's two factor lists, one factor per rotary frequency (rotary_dim / 2 of them), an
    original context of 2 or more positions (its log divides the attention factor) and, where
    given, a positive attention factor and factor."""
    original = scaling.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original < 2:
        raise ConfigError(
            f"{source}: rope_scaling original_max_position_embeddings must be an integer of at least 2, "
            f"got {original!r}"
        )
    for key in ("attention_factor", "factor"):
        value = scaling.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        ):
            raise ConfigError(f"{source}: rope_scaling {key} must be a positive number, got {value!r}")
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if (
            not isinstance(factors, list)
            or len(factors) != n
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0 for f in factors)
        ):
            raise ConfigError(
                f"{source}: rope_scaling {key} must list {n} positive numbers (one per frequency)"
            )


def _read_no_rope_layers(data: dict[str, Any], fam: Family, n_layers: int, source: str) -> list[int]:
    """SmolLM3's per-layer RoPE flags: as listed, or 0 for every `no_rope_layer_interval`-th layer."""
    if not fam.nope:
        return []
    given = data.get("no_rope_layers")
    if given is None:
        every = data.get("no_rope_layer_interval") or 4
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(
                f"{source}: field 'no_rope_layer_interval' must be a positive integer, got {every!r}"
            )
        return periodic_rope_layers(every, n_layers)
    if not isinstance(given, list) or len(given) != n_layers or any(v not in (0, 1) for v in given):
        raise ConfigError(f"{source}: no_rope_layers must list {n_layers} entries of 0 or 1")
    return [int(v) for v in given]


def _read_layer_types(
    data: dict[str, Any], fam: Family, n_layers: int, source: str, no_rope: list[int] | None = None
) -> list[str]:
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
        return periodic_layer_types(every, n_layers)
    if fam.sliding_window_needs_flag:
        if not data.get("use_sliding_window", False):
            return ["full_attention"] * n_layers
        if fam.nope:  # SmolLM3 windows its NoPE layers
            return ["full_attention" if rope else "sliding_attention" for rope in no_rope or [1] * n_layers]
        # Qwen2 and Qwen3 window the layers from max_window_layers on; Qwen3-MoE every layer.
        first = 0 if fam.moe else data.get("max_window_layers", n_layers)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return ["sliding_attention"] * n_layers
