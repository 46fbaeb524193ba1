"""The decoder-only transformer for the Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE, OLMo 2,
Phi-3, Gemma 2, Gemma 3 and SmolLM3 families.

One model, read top to bottom: embed -> N x (RMSNorm, grouped-query attention with
RoPE, RMSNorm, SwiGLU MLP or a sparse mixture of SwiGLU experts) -> RMSNorm -> LM
head. Module and parameter names are the checkpoint's (`model.layers.0.self_attn.
q_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1.weight`, Qwen3-MoE's `mlp.experts.3.
gate_proj.weight`), so HF state dicts and PEFT adapters line up with no key map. The families
differ only by the closed set of flags in `config.Family` and `ModelConfig`: QK-norm (Qwen3,
Gemma 3); layers without RoPE (SmolLM3); the experts' layout, width, top-k renormalisation and dense layers; Gemma's (1 + w) norms, scaled
embedding, norms after attention and feed-forward, query scale, per-layer-type RoPE base and
soft-capping of the logits and (Gemma 2) of the attention scores. Phi-3's fused checkpoint tensors are split at load (checkpoint/build.py).

Not here: loading weights (weightsmith.checkpoint), the attention kernel (attention.py), the cache (kv_cache.py),
sampling and the decode loop (generate.py), the CPU decode layout and fused C step
(weightsmith.cpu_decode, which swaps in subclasses of `Attention`, `MLP` and `Linear`
that override `qkv`, `gate_up` and `forward`, keeping every name).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from weightsmith.kv_cache import KVCache
from weightsmith.models.activations import activations
from weightsmith.models.attention import attend
from weightsmith.models.config import ModelConfig
from weightsmith.models.linear import Linear
from weightsmith.models.packed import PackedDocuments, attend_documents, pack_documents
from weightsmith.models.rope import (
    apply_rope,
    inverse_frequencies,
    longrope_long_frequencies,
    plain_inverse_frequencies,
    rope_cos_sin,
)

#: The MLP's activation functions by config.json `hidden_act` name.
ACTIVATIONS = activations()


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as the reference does).

    offset: Gemma's form, which scales by (1 + weight) in fp32 before casting back.
    fp32_scale: OLMo 2's, which scales by the weight in fp32 before casting back."""

    def __init__(self, dim: int, eps: float, offset: bool = False, fp32_scale: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset
        self.fp32_scale = fp32_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out rather than F.rms_norm: on CPU this is ~3x faster for decode-sized
        # inputs, and it is the reference's exact order of operations.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        if self.fp32_scale:
            return (x32 * self.weight.float()).to(x.dtype)
        return self.weight * x32.to(x.dtype)


@dataclass
class AttentionInputs:
    """What every layer needs besides hidden states: positions and masks, built once per forward."""

    positions: torch.Tensor  # (B, T)
    cos: torch.Tensor  # (B, 1, T, D)
    sin: torch.Tensor  # (B, 1, T, D)
    cache: KVCache | None
    kv_len: int
    masks: dict[str, torch.Tensor | None]  # by layer type; None means "use is_causal" or "no mask"
    is_causal: bool
    start: int | None = None  # the common first position when rows are aligned
    #: Layer type -> its own (cos, sin) where its RoPE base differs (Gemma 3's sliding layers).
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: Packed rows (no cache): a layer whose mask is None attends within each document.
    docs: PackedDocuments | None = None

    def cos_sin(self, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables for a layer of `layer_type`, each (B, 1, T, D)."""
        if self.rope is not None and layer_type in self.rope:
            return self.rope[layer_type]
        return self.cos, self.sin


class Attention(nn.Module):
    #: How packed rows are attended. `compile_layers` (train/loop.py) gives each compiled layer a
    #: wrapper that torch.compile runs eagerly: the document layout changes with every batch, and
    #: as a graph input it would recompile the layer until the compiler gives up.
    attend_documents = staticmethod(attend_documents)

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.layer_type = cfg.layer_types[layer_idx]
        #: Whether queries and keys turn with RoPE (not in SmolLM3's NoPE layers).
        self.rotary = cfg.rope_layer(layer_idx)
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, q_out, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, kv_out, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, kv_out, bias=bias)
        # Llama-family checkpoints have no output-projection bias, even with attention_bias (Qwen2).
        self.o_proj = Linear(q_out, cfg.hidden_size, bias=cfg.attention_bias and cfg.model_type != "qwen2")
        fam = cfg.family
        if fam.qk_norm:  # over each head's D (OLMo 2: each projection's whole output), before RoPE
            q_dim, k_dim = (q_out, kv_out) if fam.qk_norm_whole else (self.head_dim, self.head_dim)
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, fam.gemma, fam.post_norm)
            self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps, fam.gemma, fam.post_norm)
        self.qk_norm_whole = fam.qk_norm_whole
        #: Score scale: Gemma's query_pre_attn_scalar ** -0.5, else SDPA's 1 / sqrt(D).
        self.scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None
        #: Gemma 2: scores capped to (-cap, cap) by cap * tanh(score / cap) before the softmax.
        self.softcap = cfg.attn_logit_softcapping
        if fam.sinks:  # gpt-oss: one logit per head joins each softmax (attention.py)
            self.sinks = nn.Parameter(torch.zeros(self.n_heads))

    def forward(self, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x, a)
        if a.cache is not None:
            k, v = a.cache.write(self.layer_idx, a.positions, k, v, a.kv_len, a.start)  # (B, Hkv, S, D)
        mask = a.masks[self.layer_type]
        dtype, exact = q.dtype, contextlib.nullcontext()
        if torch.is_grad_enabled() and dtype == torch.bfloat16 and q.device.type == "cpu":
            # A bf16 training step on a CPU attends in fp32 (autocast off): torch's CPU flash-attention
            # backward in bf16 took about twice the fp32 one (27% of a LoRA step of the default model).
            q, k, v, exact = q.float(), k.float(), v.float(), torch.autocast("cpu", enabled=False)
        sinks = getattr(self, "sinks", None)
        with exact:
            if mask is None and a.docs is not None:  # packed rows: each document alone
                out = self.attend_documents(q, k, v, a.docs, self.scale, self.softcap, sinks)
            else:
                is_causal = a.is_causal and mask is None
                out = attend(
                    q,
                    k,
                    v,
                    mask=mask,
                    is_causal=is_causal,
                    scale=self.scale,
                    softcap=self.softcap,
                    sinks=sinks,
                )
        out = out.to(dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def qkv(self, x: torch.Tensor, a: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (B, H, T, D), rotated keys and values (B, Hkv, T, D) for x (B, T, h)."""
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm") and not self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        if not self.rotary:
            return q, k, v
        cos, sin = a.cos_sin(self.layer_type)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of x (..., h), each (..., intermediate)."""
        return self.gate_proj(x), self.up_proj(x)


class Expert(nn.Module):
    """One expert, SwiGLU: down(act(gate(x)) * up(x)), under the checkpoint's names for gate,
    up and down (Mixtral's w1, w3, w2; Qwen-MoE's gate_proj, up_proj, down_proj). gpt-oss's have
    biases and clamp: down(g * sigmoid(alpha g) * (u + 1)), g = gate(x) at most `limit`, u = up(x)
    within +-limit."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size
        self.names = cfg.family.expert_names
        bias = cfg.swiglu_limit is not None
        for name, (n_in, n_out) in zip(self.names, ((h, i), (h, i), (i, h)), strict=True):
            self.add_module(name, Linear(n_in, n_out, bias=bias))
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        if self.limit is None:
            return down(self.act(gate(x)) * up(x))
        g = gate(x).clamp(max=self.limit)
        u = up(x).clamp(-self.limit, self.limit)
        return down(g * torch.sigmoid(g * self.alpha) * (u + 1))


class SparseMoE(nn.Module):
    """Top-k routed mixture of experts (Mixtral, Qwen3-MoE, gpt-oss): softmax over all experts in
    fp32, keep the k largest, renormalise them (Mixtral, gpt-oss; Qwen's norm_topk_prob), and sum
    the chosen experts' outputs weighted by them. gpt-oss's softmax over its top-k logits is the
    renormalised top k of the softmax over all: the same weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalise = cfg.norm_topk_prob
        #: The router's name in the checkpoint (`gate`; gpt-oss's `router`, with a bias).
        self.router_name = cfg.family.router_name
        router = Linear(cfg.hidden_size, cfg.num_local_experts, bias=cfg.family.moe == "gpt_oss")
        self.add_module(self.router_name, router)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_local_experts))

    @property
    def router_linear(self) -> nn.Module:
        """The linear layer scoring each expert for a token (hidden -> num_local_experts)."""
        return self._modules[self.router_name]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)  # (N, h)
        probs = F.softmax(self.router_linear(flat), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.experts[e](flat[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.view(b, t, h)


class BlockNorms(NamedTuple):
    """A block's norms by where they apply, None where its family has none there."""

    attn_in: RMSNorm | None  # before attention (all but OLMo 2)
    attn_out: RMSNorm | None  # on attention's output, before the residual (Gemma, OLMo 2)
    mlp_in: RMSNorm | None  # before the MLP (all but OLMo 2)
    mlp_out: RMSNorm | None  # on the MLP's output, before the residual (Gemma, OLMo 2)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)). Gemma norms each output too:
    x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))). OLMo 2 norms only the
    outputs: x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps, gemma, post = cfg.hidden_size, cfg.rms_norm_eps, cfg.family.gemma, cfg.family.post_norm
        if not post:
            self.input_layernorm = RMSNorm(h, eps, gemma)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps, gemma, post)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, gemma)
        if gemma or post:
            self.post_feedforward_layernorm = RMSNorm(h, eps, gemma, post)
        if cfg.sparse_layer(layer_idx):  # under the family's name: block_sparse_moe or mlp
            self.add_module(cfg.family.moe_block, SparseMoE(cfg))
        else:
            self.mlp = MLP(cfg)

    def norms(self) -> BlockNorms:
        """The block's norms by role (Llama's `post_attention_layernorm` is the MLP's input norm,
        Gemma's and OLMo 2's normalises attention's output)."""
        if hasattr(self, "pre_feedforward_layernorm"):  # Gemma
            return BlockNorms(
                self.input_layernorm,
                self.post_attention_layernorm,
                self.pre_feedforward_layernorm,
                self.post_feedforward_layernorm,
            )
        if not hasattr(self, "input_layernorm"):  # OLMo 2
            return BlockNorms(None, self.post_attention_layernorm, None, self.post_feedforward_layernorm)
        return BlockNorms(self.input_layernorm, None, self.post_attention_layernorm, None)

    def forward(self, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        if hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), a))
            return x + self.post_feedforward_layernorm(ffn(self.pre_feedforward_layernorm(x)))
        if not hasattr(self, "input_layernorm"):  # OLMo 2
            x = x + self.post_attention_layernorm(self.self_attn(x, a))
            return x + self.post_feedforward_layernorm(ffn(x))
        x = x + self.self_attn(self.input_layernorm(x), a)
        return x + ffn(self.post_attention_layernorm(x))


class TransformerBody(nn.Module):
    """Everything but the LM head; named `model` inside `CausalLM` as in HF checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # nn.Embedding's own initialisation, skipped on the meta device: there its normal_
        # goes through torch's Python reference ops, whose import costs ~2 s (torch 2.13).
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.family.gemma, cfg.family.post_norm)
        #: Gemma multiplies embeddings by sqrt(hidden_size), rounded to the weights' dtype.
        self.embed_scale = cfg.hidden_size**0.5 if cfg.family.gemma else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> input hidden states (B, T, h)."""
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        return x


class CausalLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = TransformerBody(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        if cfg.rope_local_base_freq is not None and "sliding_attention" in cfg.layer_types:
            self.register_buffer("inv_freq_local", torch.empty(0), persistent=False)
        if cfg.rope_type == "longrope":
            self.register_buffer("inv_freq_long", torch.empty(0), persistent=False)
        self.reset_rope()

    def tie_weights(self) -> None:
        """Re-point the LM head at the embedding after weights were assigned (tied models)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """Compute the RoPE buffers on the model's device (at construction, and again after
        building on meta)."""
        inv_freq, self.rope_scaling = inverse_frequencies(self.config)
        device = self.model.embed_tokens.weight.device
        self.inv_freq = inv_freq.to(device)
        cfg = self.config
        if hasattr(self, "inv_freq_local"):
            self.inv_freq_local = plain_inverse_frequencies(cfg.head_dim, cfg.rope_local_base_freq).to(device)
        if hasattr(self, "inv_freq_long"):
            self.inv_freq_long = longrope_long_frequencies(cfg).to(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        aligned: bool = True,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T).

        positions: (B, T) absolute positions (default 0..T-1); with a cache, tokens are
            written there and attend to the row's cache up to their position.
        kv_len: how many cache entries to attend over (max row length after this call).
        aligned: every row's positions are kv_len - T ... kv_len - 1 (no per-row
            offsets), which allows the fused causal kernel instead of an explicit mask
            and a slice copy into the cache instead of a scatter.
        logits_at: (B,) index into T per row: return only that position's logits
            (B, 1, V), skipping the (T, V) head matmul during prefill.
        """
        x = self.hidden_states(input_ids, positions=positions, cache=cache, kv_len=kv_len, aligned=aligned)
        if logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at][:, None]  # (B, 1, h)
        return self.logits(x)  # (B, T, V)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over hidden states (..., h) -> (..., V), soft-capped to
        (-cap, cap) as cap * tanh(logits / cap) where the config says so (Gemma)."""
        logits = self.lm_head(self.model.norm(hidden))
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        aligned: bool = True,
        documents: torch.Tensor | None = None,
        checkpoint: bool = False,
    ) -> torch.Tensor:
        """The last layer's output (B, T, h), before the final norm.

        Training calls this and applies `logits` only where a loss is taken.
        documents: (B, T) ids of packed sequences; a token attends only to earlier
            tokens of its own document (pass positions that restart per document).
        checkpoint: recompute each layer's activations in backward instead of
            keeping them (gradient checkpointing: less memory, ~1/3 more compute).
        """
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        kv_len = kv_len if kv_len is not None else t
        x = self.model.embed(input_ids)  # (B, T, h)
        a = self._attention_inputs(positions, cache, kv_len, aligned, x.dtype, documents)
        for layer in self.model.layers:
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, a, use_reentrant=False)
            else:
                x = layer(x, a)
        return x

    def _attention_inputs(
        self,
        positions: torch.Tensor,
        cache: KVCache | None,
        kv_len: int,
        aligned: bool,
        dtype: torch.dtype,
        documents: torch.Tensor | None = None,
    ) -> AttentionInputs:
        inv_freq = self.inv_freq
        if hasattr(self, "inv_freq_long"):  # LongRoPE: the long set once the sequence passes the
            # original context (transformers' rule, on the device: no sync, a CUDA graph can hold it)
            longer = positions.max() + 1 > self.config.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(longer, self.inv_freq_long, self.inv_freq)
        cos, sin = rope_cos_sin(inv_freq, positions, self.rope_scaling, dtype)
        t = positions.shape[1]
        window = self.config.sliding_window or 0
        masks: dict[str, torch.Tensor | None] = {}
        # Fast paths: aligned rows with no cached prefix use the fused causal kernel; a
        # single aligned query sees every cached key, so it needs no mask at all.
        plain_causal = aligned and kv_len == t and documents is None
        # Packed rows attend one document at a time with the causal kernel (models/packed.py);
        # a sliding-window layer whose documents are longer than its window keeps the mask.
        docs = pack_documents(documents) if documents is not None and cache is None else None
        for kind in set(self.config.layer_types):
            windowed = kind == "sliding_attention" and kv_len > window
            if docs is not None and docs.usable_for(kind, window):
                masks[kind] = None
                continue
            if aligned and not windowed and (plain_causal or t == 1):
                masks[kind] = None
                continue
            keys = torch.arange(kv_len, device=positions.device)
            # A query's slot: its position in the cache, or (packed rows, no cache) its index.
            slots = positions if documents is None else keys[:t].expand_as(positions)
            q = slots[:, None, :, None]  # (B, 1, T, 1)
            mask = keys <= q  # (B, 1, T, S)
            if windowed:
                mask = mask & (keys > q - window)
            if documents is not None:  # packed rows: own document only, S == T
                mask = mask & (documents[:, None, :, None] == documents[:, None, None, :])
            masks[kind] = mask
        start = kv_len - t if aligned else None
        rope = None
        if hasattr(self, "inv_freq_local"):
            rope = {"sliding_attention": rope_cos_sin(self.inv_freq_local, positions, 1.0, dtype)}
        return AttentionInputs(
            positions, cos, sin, cache, kv_len, masks, plain_causal and t > 1, start, rope, docs
        )
