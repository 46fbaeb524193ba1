"""Named hook points on a loaded model (TransformerLens's names), as an explicit, reversible swap.

`hooked(model, state)` changes, for the length of a `with` block, the class of the model, its
layers, attentions, MLPs and norms to subclasses defined here (as weightsmith.cpu_decode does
for its layout: objects, names, parameters and outside references stay), and sets on each the
`HookState` it reports to. Each subclass runs the model's own math written out step by step,
passing every named value through the state, which records it and applies the edits asked
for (`state(name, x) -> x`). When the block ends every class is put back, so a model nobody
hooks runs exactly as before: no extra call, no check, and the fused C decode step (which
only takes a plain `CausalLM`) and the decode layout stay in use.

Hook points, shapes as TransformerLens's (B batch, T tokens, S keys, H heads, D head size):
`hook_embed` (B, T, h); per layer L, `blocks.L.` + `hook_resid_pre`, `hook_attn_out`,
`hook_resid_mid`, `hook_mlp_out`, `hook_resid_post` (B, T, h); `ln1.` / `ln2.` +
`hook_scale` (B, T, 1), `hook_normalized` (B, T, h, before the norm's weight);
`attn.hook_q`, `attn.hook_rot_q` (B, T, H, D), `attn.hook_k`, `attn.hook_v`,
`attn.hook_rot_k` (B, T, Hkv, D), `attn.hook_attn_scores`, `attn.hook_pattern` (B, H, T, S),
`attn.hook_z` (B, T, H, D); `mlp.hook_pre`, `mlp.hook_pre_linear`, `mlp.hook_post`
(B, T, intermediate; dense MLPs only); and `ln_final.hook_scale` / `ln_final.hook_normalized`.
Gemma's blocks norm each output too: `ln1_post.` and `ln2_post.` hooks (before `hook_attn_out`
and `hook_mlp_out`, which are the normed outputs), `ln2.` being its pre-feed-forward norm;
`attn.hook_attn_scores` are Gemma 2's after its cap; `hook_embed` is before Gemma's sqrt(hidden)
scale (`blocks.0.hook_resid_pre` after it). gpt-oss's `attn.hook_pattern` rows sum to less than 1:
its sink's share of each softmax attends to no key.
`hook_q`/`hook_k` are before RoPE: they are recovered from the rotated values by the inverse
rotation (exact up to rounding), so whatever a family does before RoPE is kept.

Not here: the edits themselves (interventions.py), running a prompt (trace.py).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.errors import ConfigError
from weightsmith.models.model import (
    MLP,
    Attention,
    AttentionInputs,
    CausalLM,
    DecoderLayer,
    RMSNorm,
    SparseMoE,
)
from weightsmith.models.rope import apply_rope, undo_rope

#: An edit at a hook point: (value, hook name) -> the value the model goes on with.
Edit = Callable[[torch.Tensor, str], torch.Tensor]

LAYER_HOOKS = (
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
    "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized",
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
)  # fmt: skip
#: The attention hooks that need the attention written out (the others keep the fused kernel).
ATTENTION_INNER = tuple(n.removeprefix("attn.") for n in LAYER_HOOKS if n.startswith("attn."))
MODEL_HOOKS = ("hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized")


class InspectError(ConfigError):
    """A hook name, direction, layer or prompt set the inspect tools cannot use."""


#: Gemma's and OLMo 2's norms on the attention and MLP outputs (TransformerLens's `ln1_post`,
#: `ln2_post`): their hooks, by the hook they come just before.
OUTPUT_NORM_HOOKS = {
    "hook_attn_out": ("ln1_post.hook_scale", "ln1_post.hook_normalized"),
    "hook_mlp_out": ("ln2_post.hook_scale", "ln2_post.hook_normalized"),
}


def _layer_hooks(layer: nn.Module) -> list[str]:
    dense = isinstance(getattr(layer, "mlp", None), MLP)
    normed = hasattr(layer, "post_feedforward_layernorm")  # Gemma, OLMo 2
    pre = hasattr(layer, "input_layernorm")  # OLMo 2 has no norm before attention or MLP
    names: list[str] = []
    for name in LAYER_HOOKS:
        if (dense or not name.startswith("mlp.")) and (pre or not name.startswith(("ln1.", "ln2."))):
            names += [*(OUTPUT_NORM_HOOKS.get(name, ()) if normed else ()), name]
    return names


def hook_names(model: CausalLM) -> list[str]:
    """Every hook point of `model`, in the order a forward pass reaches them."""
    names = ["hook_embed"]
    for i, layer in enumerate(model.model.layers):
        names += [f"blocks.{i}.{n}" for n in _layer_hooks(layer)]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized"]


def check_names(model: CausalLM, names: Collection[str]) -> None:
    """Raise one line naming the first unknown hook name and the closest known ones."""
    known = hook_names(model)
    known_set = set(known)
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise InspectError(
                f"unknown hook point {name!r} (this model has layers 0..{len(model.model.layers) - 1}){hint}"
            )


class HookState:
    """What hooked modules report to: the edits to apply and which values to keep, by hook name.

    edits: name -> edits applied in order. keep: names whose values to record in `cache`
        (detached), or "all".
    """

    def __init__(self, edits: Mapping[str, Sequence[Edit]] | None = None, keep: Collection[str] | str = ()):
        self.edits = {name: list(fns) for name, fns in (edits or {}).items() if fns}
        self.keep_all = keep == "all"
        self.keep = set() if self.keep_all else set(keep)
        self.cache: dict[str, torch.Tensor] = {}

    def names(self) -> set[str]:
        return set(self.edits) | self.keep

    def wants(self, name: str) -> bool:
        return self.keep_all or name in self.keep or name in self.edits

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self.edits.get(name, ()):
            x = fn(x, name)
        if self.keep_all or name in self.keep:
            self.cache[name] = x.detach()
        return x


# -- the hooked subclasses: the model's own math, step by step, through the state -------------


class _Hooked:
    _ws_state: HookState
    _ws_prefix: str

    def _hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._ws_state(self._ws_prefix + name, x)


class HookedLayer(_Hooked):
    def forward(self, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        normed = hasattr(self, "post_feedforward_layernorm")  # Gemma, OLMo 2: outputs normed
        pre = hasattr(self, "input_layernorm")  # not in OLMo 2
        x = self._hook("hook_resid_pre", x)
        attn = self.self_attn(self.input_layernorm(x) if pre else x, a)
        attn_out = self._hook("hook_attn_out", self.post_attention_layernorm(attn) if normed else attn)
        x = self._hook("hook_resid_mid", x + attn_out)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        if not pre:
            mlp = self.post_feedforward_layernorm(ffn(x))
        elif normed:
            mlp = self.post_feedforward_layernorm(ffn(self.pre_feedforward_layernorm(x)))
        else:
            mlp = ffn(self.post_attention_layernorm(x))
        mlp_out = self._hook("hook_mlp_out", mlp)
        return self._hook("hook_resid_post", x + mlp_out)


class HookedNorm(_Hooked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = self._hook("hook_scale", (x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())  # (B, T, 1)
        normalized = self._hook("hook_normalized", x32 / scale)
        if self.offset:  # Gemma's (1 + w), in fp32
            return (normalized * (1.0 + self.weight.float())).to(x.dtype)
        if self.fp32_scale:  # OLMo 2's w, in fp32
            return (normalized * self.weight.float()).to(x.dtype)
        return self.weight * normalized.to(x.dtype)


class HookedMLP(_Hooked):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        gate, up = self._hook("hook_pre", gate), self._hook("hook_pre_linear", up)
        return self.down_proj(self._hook("hook_post", self.act(gate) * up))


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (B, H, T, D) <-> (B, T, H, D)


class HookedAttention(_Hooked):
    def forward(self, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        state, p = self._ws_state, self._ws_prefix
        if not any(state.wants(p + n) for n in ATTENTION_INNER):
            return super().forward(x, a)  # nothing inside asked for: the model's own kernel
        b, t, _ = x.shape
        q, k, v = self.qkv(x, a)  # rotated (B, H, T, D), (B, Hkv, T, D)
        q = self._unrotated("hook_q", q, a)
        k = self._unrotated("hook_k", k, a)
        v = _heads_last(self._hook("hook_v", _heads_last(v)))
        q = _heads_last(self._hook("hook_rot_q", _heads_last(q)))
        k = _heads_last(self._hook("hook_rot_k", _heads_last(k)))
        if a.cache is not None:
            k, v = a.cache.write(self.layer_idx, a.positions, k, v, a.kv_len, a.start)  # (B, Hkv, S, D)
        group = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
        if self.softcap is not None:  # Gemma 2's cap, before the mask (TransformerLens's order too)
            scores = torch.tanh(scores / self.softcap) * self.softcap
        visible = _visible(a.masks[self.layer_type], a.is_causal, t, k.shape[2], x.device)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        scores = self._hook("hook_attn_scores", scores)
        sinks = getattr(self, "sinks", None)
        if sinks is None:
            probs = F.softmax(scores.float(), dim=-1)
        else:  # gpt-oss: the sink's logit joins the softmax, and its share attends to nothing
            sink = sinks.float().view(1, -1, 1, 1).expand(b, -1, t, 1)
            probs = F.softmax(torch.cat((scores.float(), sink), dim=-1), dim=-1)[..., :-1]
        pattern = self._hook("hook_pattern", probs.to(q.dtype))
        z = self._hook("hook_z", _heads_last(pattern @ v))  # (B, T, H, D)
        return self.o_proj(z.reshape(b, t, self.n_heads * self.head_dim))

    def _unrotated(self, name: str, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        """Pass the pre-RoPE value of rotated x (B, H, T, D) through `name`; rotate an edited one back."""
        state = self._ws_state
        if not state.wants(self._ws_prefix + name):
            return x
        if not self.rotary:  # a NoPE layer (SmolLM3): never turned
            return _heads_last(self._hook(name, _heads_last(x)))
        cos, sin = a.cos_sin(self.layer_type)  # Gemma 3's sliding layers have their own base
        plain = undo_rope(x, cos, sin)
        out = self._hook(name, _heads_last(plain))
        return apply_rope(_heads_last(out), cos, sin) if self._ws_prefix + name in state.edits else x


def _visible(
    mask: torch.Tensor | None, causal: bool, t: int, s: int, device: torch.device
) -> torch.Tensor | None:
    """Which keys each query sees, (B or 1, 1, T, S) booleans, or None for all of them."""
    if mask is not None:
        return mask
    if causal:
        return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)
    return None


class HookedModel:
    """A `CausalLM` being traced: the same model (a subclass, so the fused C step steps aside)."""


#: The hooked class for (mixin, original class), made once.
_CLASSES: dict[tuple[type, type], type] = {}


def _hooked_class(mixin: type, cls: type) -> type:
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{mixin.__name__}[{cls.__name__}]", (mixin, cls), {})
    return _CLASSES[key]


def _plan(model: CausalLM) -> list[tuple[nn.Module, type, str]]:
    """(module, mixin, hook prefix) for every module to swap; refuse a layout we cannot write out."""
    if not isinstance(model, CausalLM) or isinstance(model, HookedModel):
        raise InspectError("this model is already being traced; end the other trace first")
    plan: list[tuple[nn.Module, type, str]] = [(model, HookedModel, "")]
    expected = (
        (DecoderLayer, HookedLayer),
        (Attention, HookedAttention),
        (MLP, HookedMLP),
        (RMSNorm, HookedNorm),
    )
    for i, layer in enumerate(model.model.layers):
        parts = [(layer, ""), (layer.self_attn, "attn.")]
        # TransformerLens's names: ln1 and ln2 before attention and MLP, ln1_post and ln2_post on
        # their outputs (Gemma, OLMo 2).
        roles = zip(layer.norms(), ("ln1.", "ln1_post.", "ln2.", "ln2_post."), strict=True)
        parts += [(norm, sub) for norm, sub in roles if norm is not None]
        if hasattr(layer, "mlp") and not isinstance(layer.mlp, SparseMoE):  # experts: no MLP hooks
            parts.append((layer.mlp, "mlp."))
        for module, sub in parts:
            base, mixin = next(((b, m) for b, m in expected if isinstance(module, b)), (None, None))
            if base is None or type(module).forward is not base.forward:
                raise InspectError(
                    f"hook points are not available for {type(module).__name__} in "
                    f"{model.config.model_type} models (blocks.{i}.{sub}); trace a supported family"
                )
            plan.append((module, mixin, f"blocks.{i}.{sub}"))
    plan.append((model.model.norm, HookedNorm, "ln_final."))
    return plan


@contextmanager
def hooked(model: CausalLM, state: HookState) -> Iterator[HookState]:
    """Route `model`'s forward passes through `state` inside the block (see the module doc)."""
    check_names(model, state.names())
    plan = _plan(model)
    swapped: list[tuple[nn.Module, type]] = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, i, out: state("hook_embed", out))
    try:
        for module, mixin, prefix in plan:
            swapped.append((module, type(module)))
            module.__class__ = _hooked_class(mixin, type(module))
            module._ws_state, module._ws_prefix = state, prefix
        yield state
    finally:
        handle.remove()
        for module, cls in reversed(swapped):
            module.__class__ = cls
            del module._ws_state, module._ws_prefix
