"""Mixture-of-experts models in GGUF files written by weightsmith (Mixtral as llama, Qwen3-MoE as
qwen3moe): the expert hyperparameters, the refusal of what llama.cpp's graphs cannot compute,
and each layer's experts stacked into llama.cpp's merged `ffn_{gate,up,down}_exps` tensors.

llama.cpp's MoE graphs (llama.cpp's `build_moe_ffn` as its llama and qwen3moe models call it)
route every layer through experts, by a softmax over the router's logits whose top-k weights
are renormalised to sum to 1. A model with dense layers among sparse ones, or whose top-k
weights are not renormalised (Qwen3-MoE's norm_topk_prob false), would compute something else
there, so it is refused.

Not here: the tensor names (gguf_names.py), the rest of the file (gguf_write.py), reading merged
expert tensors back (gguf.py splits them per expert).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from weightsmith.errors import CheckpointError

if TYPE_CHECKING:
    import gguf

    from weightsmith.models import ModelConfig

#: model.layers.{layer}.{block}.experts.{expert}.{matrix}.weight (gpt-oss: and .bias)
_EXPERT = re.compile(r"(model\.layers\.\d+\.[a-z_]+\.experts)\.(\d+)\.([a-z0-9_]+\.(?:weight|bias))")


def check_experts(cfg: ModelConfig, source: str) -> None:
    """Refuse a mixture of experts llama.cpp's graph would compute differently."""
    if not cfg.family.moe:
        return
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.sparse_layer(i)]
    if dense:
        raise CheckpointError(
            f"{source}: layers {dense} have a dense MLP (mlp_only_layers / decoder_sparse_step) and "
            "cannot be exported; llama.cpp's MoE graphs route every layer through experts"
        )
    if not cfg.norm_topk_prob:
        raise CheckpointError(
            f"{source}: norm_topk_prob false cannot be exported; llama.cpp's MoE graphs renormalise "
            "the chosen experts' weights to sum to 1"
        )


def check_gpt_oss(cfg: ModelConfig, source: str) -> None:
    """Refuse a gpt-oss model whose settings llama.cpp's gpt-oss graph fixes otherwise: every other
    layer sliding from the first, the clamped SwiGLU's alpha 1.702 and limit 7, YaRN or no scaling."""
    pattern = ["full_attention" if i % 2 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    fixed = {"layer_types": pattern, "swiglu_alpha": 1.702, "swiglu_limit": 7.0}
    for key, value in fixed.items():
        if getattr(cfg, key) != value:
            raise CheckpointError(
                f"{source}: {key} {getattr(cfg, key)} cannot be exported; llama.cpp's gpt-oss graph assumes {value}"
            )
    if cfg.rope_type not in ("default", "yarn"):
        raise CheckpointError(
            f"{source}: {cfg.rope_type} rope scaling cannot be exported for gpt-oss (supported: none, yarn)"
        )


def add_expert_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """`{arch}.expert_count`, `expert_used_count` and (Qwen3-MoE, gpt-oss) `expert_feed_forward_length`."""
    if not cfg.family.moe:
        return
    writer.add_expert_count(cfg.num_local_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.moe_intermediate_size or cfg.family.moe == "gpt_oss":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size or cfg.intermediate_size)


def stacked_name(name: str) -> tuple[str, int] | None:
    """(the stacked tensor's name, the expert's index) for one expert's matrix, else None:
    `model.layers.0.mlp.experts.3.down_proj.weight` -> (`...experts.{expert}.down_proj.weight`, 3)."""
    match = _EXPERT.fullmatch(name)
    if match is None:
        return None
    return f"{match.group(1)}.{{expert}}.{match.group(3)}", int(match.group(2))


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each layer's per-expert matrices stacked into one (n_expert, out, in) tensor
    named with an `{expert}` placeholder (`model.layers.0.mlp.experts.{expert}.gate_proj.weight`),
    at the place of its first expert; other tensors unchanged and in order."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor | None] = {}
    for name, tensor in state.items():
        found = stacked_name(name)
        if found is None:
            out[name] = tensor
            continue
        stacked, expert = found
        out.setdefault(stacked, None)
        groups.setdefault(stacked, {})[expert] = tensor
    for stacked, experts in groups.items():
        assert sorted(experts) == list(range(len(experts))), f"{stacked}: experts {sorted(experts)}"
        out[stacked] = torch.stack([experts[e] for e in range(len(experts))])
    return {name: tensor for name, tensor in out.items() if tensor is not None}
