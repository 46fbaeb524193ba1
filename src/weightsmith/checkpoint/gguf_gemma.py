"""Gemma in GGUF files: what llama.cpp's gemma2 and gemma3 graphs fix in code rather than read
from the file, filled in when a file is read and checked before one is written.

llama.cpp's graphs (llama-model.cpp) take from the file only the window and, in gemma2, the two
soft-caps. In code: which layers slide (gemma2 every other one, gemma3 all but every 6th), the
RoPE base of gemma3's sliding layers (10000), the query scale (head_dim ** -0.5, or (hidden /
heads) ** -0.5 for the 27B models: 46 layers in Gemma 2, 62 in Gemma 3), that gemma2 always caps
its attention scores and logits (50 and 30 where the file says nothing) and reads its LM head
from the embedding, and that gemma3 caps neither. A model that differs would compute something
else there, so its export is refused.

Not here: the tensor names (gguf_names.py), the rest of reading and writing (gguf.py,
gguf_write.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from weightsmith.errors import CheckpointError
from weightsmith.models.families import periodic_layer_types

if TYPE_CHECKING:
    from weightsmith.models import ModelConfig

#: What llama.cpp's gemma2 graph takes where the file has no value (llama-hparams.h, llama-model.cpp).
GEMMA2_DEFAULTS = {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window": 4096}
_CAPS = ("final_logit_softcapping", "attn_logit_softcapping")


def gemma_fixed(arch: str, layers: int, hidden_per_head: int, head_dim: int) -> dict[str, Any]:
    """The config fields llama.cpp's `arch` graph fixes for a model of this shape."""
    gemma2 = arch == "gemma2"
    big = layers == (46 if gemma2 else 62)
    return {
        "sliding_window_pattern": 2 if gemma2 else 6,
        "rope_local_base_freq": None if gemma2 else 10000.0,
        "query_pre_attn_scalar": hidden_per_head if big else head_dim,
    }


def gemma_config(arch: str, config: dict[str, Any], meta: Callable[[str, Any], Any]) -> dict[str, Any]:
    """A Gemma file's config fields beyond the common ones: those fixed in code, the caps and
    (gemma2's default) window from the file's metadata, read by `meta(key, default)`."""
    heads = config["num_attention_heads"]
    fields = gemma_fixed(
        arch, config["num_hidden_layers"], config["hidden_size"] // heads, config["head_dim"]
    )
    defaults = GEMMA2_DEFAULTS if arch == "gemma2" else {}
    for key in _CAPS:
        fields[key] = meta(f"{arch}.{key}", defaults.get(key))
    if config["sliding_window"] is None:
        fields["sliding_window"] = defaults.get("sliding_window")
    return fields


def check_gemma(cfg: ModelConfig, arch: str, source: str) -> None:
    """Refuse a Gemma model that llama.cpp's `arch` graph would compute differently."""
    fixed = gemma_fixed(arch, cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads, cfg.head_dim)
    every = fixed["sliding_window_pattern"]
    pattern = periodic_layer_types(every, cfg.num_hidden_layers)
    capped = arch == "gemma2"
    checks = [
        (
            "layer_types",
            cfg.layer_types == pattern,
            f"every {'other' if every == 2 else f'{every}th'} layer global",
        ),
        ("rope_local_base_freq", cfg.rope_local_base_freq == fixed["rope_local_base_freq"], "10000"),
        (
            "query_pre_attn_scalar",
            cfg.query_pre_attn_scalar == fixed["query_pre_attn_scalar"],
            str(fixed["query_pre_attn_scalar"]),
        ),
        *((key, (getattr(cfg, key) is not None) == capped, "a cap" if capped else "none") for key in _CAPS),
    ]
    if capped:
        checks.append(("tie_word_embeddings", cfg.tie_word_embeddings, "the embedding as the LM head"))
    for field, ok, words in checks:
        if not ok:
            raise CheckpointError(
                f"{source}: {field} {getattr(cfg, field)!r} cannot be exported; "
                f"llama.cpp's {arch} graph assumes {words}"
            )
