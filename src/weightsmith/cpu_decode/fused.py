"""The fused CPU decode step (quant/cpu_decode.c): building its view of a model, and calling it.

What it does: for a `CausalLM` of any family (Llama's block, QK-norm, Gemma's and OLMo 2's
norms, partial rotary, LongRoPE, soft-caps, mixtures of experts) on the CPU in fp32 or bf16
whose projections are all int4, int8, GGUF-block (GGMLLinear) or plain fp32 or bf16 layers,
unmerged LoRA adapters included (not on the LM head), `FusedDecode.step` runs one
token per row through every layer and the LM head in one C call, reading and writing the same
`KVCache` the PyTorch model uses (fp32, or a bf16 model's bf16 one), so prefill (PyTorch) and
decoding (C) mix freely. Python keeps the RoPE tables (any RoPE scaling the model has, Gemma 3's
local ones, LongRoPE's long set; built once a model, rope_table.py) and a final logit soft-cap.
A bf16 model's matmuls read its bf16 weights in place and sum in fp32 (quant/cpu_bf16.c);
everything between them runs in fp32, its norm weights and biases copied to fp32 (a few KB;
Gemma's 1 + w added).

`FusedDecode(model, lib)` reads the model's weights where they are (views.py; its `ok` is False
where the step cannot run them: another activation or norm, an adapter on the LM
head, an NF4 layer, another dtype or device); `current()` says whether the model still has those
modules, tensors and adapters. `FusedStep` is the decode step a caller chooses: the C step for up
to `MAX_ROWS` rows on a cache it can write, each row with its adapter (`codes`: the active one, or
the server's per-row ones), its `fallback` step otherwise.

Not here: deciding whether to build one and rebuilding it (plan.py), the kernels
(quant/cpu_kernels.c, quant/cpu_decode.c and their build, quant/cpu_kernels.py), the
decode loop (weightsmith.generate).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn

from weightsmith.cpu_decode.rope_table import RopeTable
from weightsmith.cpu_decode.views import (
    ACTS,
    CLAMPED_SWIGLU,
    NORMS,
    PROJECTIONS,
    LayerStruct,
    LoraView,
    ModelStruct,
    Proj,
    dora_versions,
    dropping_out,
    float_cpu,
    fp32_copy,
    is_lora,
    lora_view,
    proj_view,
    row_names,
)
from weightsmith.kv_cache import KVCache
from weightsmith.models.linear import Linear
from weightsmith.models.model import RMSNorm, SparseMoE
from weightsmith.quant import cpu_kernels
from weightsmith.quant.ggml_linear import GGMLLinear
from weightsmith.quant.weight_only import Int4Linear, Int8Linear

#: A decode step with the signature of weightsmith.generate.decode_one_token (generate.DecodeFn):
#: (model, cache, one token per row, device) -> logits (B, V), advancing the cache.
Step = Callable[[nn.Module, KVCache, list[int], torch.device], torch.Tensor]

#: Rows a fused step takes (the server's decode batches); more go to the PyTorch step. The kernels
#: take the rows a few at a time for each block of weights they read (fp32: 4 rows of a register
#: tile, quant/cpu_kernels.c; int4/int8/bf16: 4 rows per block), so a step of many rows costs
#: little more than one. Measured on the default model in fp32 (one thread, 2-core Xeon): the C
#: step against the PyTorch step 36 vs 50 ms at 1 row, 74 vs 122 at 16, 131 vs 161 at 32.
MAX_ROWS = 32


def _tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Every tensor of `modules` the C step may read (an int4 layer's tiles too)."""
    held = ((*m._parameters.values(), *m._buffers.values(), getattr(m, "tiles", None)) for m in modules)
    return [t for ts in held for t in ts if t is not None]


def _ffn(block: nn.Module) -> nn.Module:
    """A block's MLP or mixture of experts (Mixtral's `block_sparse_moe`, Qwen-MoE's `mlp`)."""
    return block.block_sparse_moe if hasattr(block, "block_sparse_moe") else block.mlp


def _block_projections(block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """A block's projections as the C step takes them: (q, k, v, o and a dense MLP's gate, up and
    down; []), or for a mixture of experts (q, k, v, o; the router, then each expert's gate, up
    and down)."""
    a, ffn = block.self_attn, _ffn(block)
    attn = [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
    if isinstance(ffn, SparseMoE):
        return attn, [ffn.router_linear] + [getattr(x, n) for x in ffn.experts for n in x.names]
    return attn + [ffn.gate_proj, ffn.up_proj, ffn.down_proj], []


def _projection_modules(model: nn.Module) -> list[nn.Module]:
    """Every layer's projections (`_block_projections`, both lists; a LoRA layer as its base layer
    and its adapters' A and B) and the LM head, in the plan's order."""
    mods: list[nn.Module] = []
    for block in model.model.layers:
        dense, sparse = _block_projections(block)
        for m in dense + sparse:
            mods += [m.base_layer, *m.lora_A.values(), *m.lora_B.values()] if is_lora(m) else [m]
    return mods + [model.lm_head]


def _adapter_state(loras: list[nn.Module]) -> list[tuple]:
    """What the C step's adapters were built from: each LoRA layer's adapters, merged ones and
    those dropping out, and a DoRA adapter's tensors as they were (its scale is computed from them)."""
    return [
        (tuple(m.lora_A), tuple(m.merged), tuple(sorted(dropping_out(m))), dora_versions(m)) for m in loras
    ]


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers among the projections the C step runs (the experts and routers too)."""
    return [
        m for block in model.model.layers for part in _block_projections(block) for m in part if is_lora(m)
    ]


def _layer_norms(block: nn.Module) -> list[nn.Module | None]:
    """A block's norms in `LayerStruct`'s order (norm1, norm2, attn_norm, mlp_norm, q_norm, k_norm),
    None where it has none."""
    n = block.norms()
    attn = block.self_attn
    return [
        n.attn_in,
        n.mlp_in,
        n.attn_out,
        n.mlp_out,
        getattr(attn, "q_norm", None),
        getattr(attn, "k_norm", None),
    ]


def _watched_modules(model: nn.Module) -> list[nn.Module]:
    """Every module whose tensors the C step reads: the projections, the norms and the attention
    modules holding sinks (gpt-oss)."""
    norms = [n for block in model.model.layers for n in _layer_norms(block) if n is not None]
    sinks = [b.self_attn for b in model.model.layers if hasattr(b.self_attn, "sinks")]
    return _projection_modules(model) + norms + [model.model.norm] + sinks


class FusedDecode:
    """A model's projections and norms as the C step reads them; `ok` is False where it cannot."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        cfg = model.config
        self.model, self.lib, self.keep, self.ok = model, lib, [], True
        self.rope = RopeTable(model)  # the cos/sin rows the step reads, built once
        #: (bf16 or offset source, its fp32 copy, what was added)
        self.copies: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.experts: list[ctypes.Array] = []  # the experts' projection arrays the layers point to
        self.inter = 0  # the widest MLP or expert: the step's scratch
        self.lora_rank = 0  # the largest adapter rank: the step's scratch
        #: The LoRA layers, the model's adapters (a row's code is its index here), what each layer
        #: held when this was built (its adapters, the merged ones, those dropping out), the
        #: adapters a row cannot take in the C step (dropout on somewhere: training), and those a
        #: row's own name (`row_adapters`) may not name (merged: the PyTorch step refuses them).
        self.loras = _lora_layers(model)
        self.adapter_names = sorted({n for m in self.loras for n in m.lora_A})
        self.adapter_index = {n: i for i, n in enumerate(self.adapter_names)}  # a row's code
        self.adapter_state = _adapter_state(self.loras)
        self.dropping_out = set().union(*(dropping_out(m) for m in self.loras))
        self.merged = {n for m in self.loras for n in m.merged}
        self.lora_arrays: list[ctypes.Array] = []  # the adapters' views the layers point to
        # What the struct depends on: these modules where they are, and every tensor's data where
        # it was (`.to()` and `p.data = ...` keep a Parameter but move its data).
        self.modules = _watched_modules(model)
        self.pointers = [t.data_ptr() for t in _tensors(self.modules)]
        layers = (LayerStruct * cfg.num_hidden_layers)()
        for i, block in enumerate(model.model.layers):
            if not self._layer(i, block, layers[i]):
                self.ok = False
                return
        head = None if is_lora(model.lm_head) else proj_view(model.lm_head, self.keep, self.copies)
        if head is None or self.ok is False:
            self.ok = False
            return
        self.layers = layers
        self.max_rows = MAX_ROWS
        attn = model.model.layers[0].self_attn
        embed_scale = model.model.embed_scale
        if embed_scale is not None:  # as the PyTorch model multiplies: by the scale in the weights' dtype
            embed_scale = torch.tensor(embed_scale, dtype=model.model.embed_tokens.weight.dtype).item()
        self.struct = ModelStruct(
            n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, n_heads=cfg.num_attention_heads,
            n_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim, inter=self.inter,
            eps=model.model.norm.eps, layers=layers, final_norm=self._norm(model.model.norm), head=head,
            rot_dim=cfg.rotary_dim, qk_whole=int(cfg.family.qk_norm_whole),
            act=ACTS[cfg.hidden_act] if cfg.swiglu_limit is None else CLAMPED_SWIGLU,
            swiglu_alpha=cfg.swiglu_alpha or 0.0, swiglu_limit=cfg.swiglu_limit or 0.0,
            attn_scale=attn.scale or 0.0, attn_cap=cfg.attn_logit_softcapping or 0.0,
            embed_scale=1.0 if embed_scale is None else embed_scale, lora_rank=self.lora_rank,
            n_adapters=len(self.adapter_names),
        )  # fmt: skip
        self.local = RopeTable(model, "inv_freq_local") if hasattr(model, "inv_freq_local") else None
        self.long = RopeTable(model, "inv_freq_long") if cfg.rope_type == "longrope" else None

    def _layer(self, i: int, block: nn.Module, layer: LayerStruct) -> bool:
        """Fill `layer` with block `i`'s projections, norms, window and RoPE; False where the step
        cannot run one of its projections."""
        cfg = self.model.config
        dense, sparse = _block_projections(block)
        projs = [proj_view(m, self.keep, self.copies) for m in dense + sparse]
        if any(p is None for p in projs):
            return False
        for j, (name, p, module) in enumerate(zip(PROJECTIONS, projs, dense, strict=False)):  # 4 or 7
            setattr(layer, name, p)
            if is_lora(module):
                entries = self._adapters([module])
                if entries is None:
                    return False
                layer.lora[j] = ctypes.cast(entries, ctypes.POINTER(LoraView))
        if any(is_lora(m) for m in sparse):  # the router's adapters, the experts' (gate, up, down each)
            router, experts = self._adapters(sparse[:1]), self._adapters(sparse[1:])
            if router is None or experts is None:
                return False
            if is_lora(sparse[0]):
                layer.router_lora = ctypes.cast(router, ctypes.POINTER(LoraView))
            layer.expert_lora = ctypes.cast(experts, ctypes.POINTER(LoraView))
        if sparse:  # the router, then each expert's gate, up and down
            moe = _ffn(block)
            experts = (Proj * (len(projs) - 5))(*projs[5:])
            self.experts.append(experts)
            layer.router, layer.experts = projs[4], ctypes.cast(experts, ctypes.POINTER(Proj))
            layer.n_experts, layer.top_k, layer.renorm = len(moe.experts), moe.top_k, int(moe.renormalise)
            self.inter = max(self.inter, projs[5].n)
        else:
            self.inter = max(self.inter, projs[4].n)
        for name, norm in zip(NORMS, _layer_norms(block), strict=True):
            setattr(layer, name, self._norm(norm))
        sinks = getattr(block.self_attn, "sinks", None)
        if sinks is not None:  # gpt-oss
            if not float_cpu(sinks):
                return False
            layer.sinks = fp32_copy(sinks, self.keep, self.copies).data_ptr()
        windowed = cfg.layer_types[i] == "sliding_attention"
        layer.window = cfg.sliding_window if windowed and cfg.sliding_window else 0
        local = hasattr(self.model, "inv_freq_local")  # Gemma 3: sliding layers turn with their own tables
        layer.rope = 0 if not cfg.rope_layer(i) else 2 if local and windowed else 1
        return True

    def _norm(self, norm: nn.Module | None) -> int | None:
        """The factors a norm multiplies by (Gemma's 1 + w), or None where there is no norm."""
        if norm is None:
            return None
        if type(norm) is not RMSNorm or not float_cpu(norm.weight) or norm.eps != self.model.model.norm.eps:
            self.ok = False
        add = 1.0 if norm.offset else 0.0
        return fp32_copy(norm.weight, self.keep, self.copies, add).data_ptr()

    def current(self) -> bool:
        """Whether the model still has the modules (and tensors) this was built on, and the fp32
        copies of bf16 norm weights and biases still their sources' values. The tensors it reads
        are kept alive in `keep` either way, so a stale one is wrong, never unsafe."""
        now = _watched_modules(self.model)
        if len(now) != len(self.modules) or any(a is not b for a, b in zip(now, self.modules, strict=True)):
            return False
        if [t.data_ptr() for t in _tensors(now)] != self.pointers or _adapter_state(
            self.loras
        ) != self.adapter_state:
            return False
        return all(
            torch.equal(source.float() + add if add else source.float(), copy)
            for source, copy, add in self.copies
        )

    def _adapters(self, modules: list[nn.Module]) -> ctypes.Array | None:
        """The adapters of `modules` (LoRA layers or not) as the C step reads them: for each module,
        one entry per model adapter (empty where it lacks the adapter or has it merged: it adds
        nothing there, as in PyTorch); None where one cannot be read."""
        n = len(self.adapter_names)
        entries = (LoraView * (n * len(modules)))()
        for at, module in enumerate(modules):
            for i, name in enumerate(self.adapter_names):
                if is_lora(module) and name in module.lora_A and name not in module.merged:
                    lora = lora_view(module, name, self.keep)
                    if lora is None:
                        return None
                    entries[at * n + i] = lora
                    self.lora_rank = max(self.lora_rank, lora.a.n)
        self.lora_arrays.append(entries)
        return entries

    def codes(self, rows: int) -> list[int] | None:
        """Each row's adapter for a step of `rows` rows as an index into `adapter_names` (-1: none),
        as the LoRA layers would add them now (`set_adapter`, `row_adapters`); None where the C step
        cannot: the PyTorch step then runs (and refuses a merged adapter a row names)."""
        if not self.loras:
            return [-1] * rows
        first = self.loras[0]
        names = row_names(first, rows)
        if names is None:
            return None
        if first.row_groups is None and any(m.active_adapter != first.active_adapter for m in self.loras):
            return None  # layers set to different adapters one by one: each row is not one adapter
        used = set(names) - {None}
        if used & self.dropping_out or (first.row_groups is not None and used & self.merged):
            return None
        return [-1 if n is None else self.adapter_index.get(n, -1) for n in names]

    def quantized(self) -> bool:
        """Whether any projection is int4, int8 or GGUF blocks (an fp32-only plan may leave decoding
        to PyTorch)."""
        kinds = (Int4Linear, Int8Linear, GGMLLinear)
        return any(isinstance(m, kinds) for m in _projection_modules(self.model))

    def fp32_only(self) -> bool:
        """Whether every projection is fp32 (no int4, int8 or bf16 one): such a plan may leave
        decoding to PyTorch (`prepare_cpu_decode(fuse_fp32=False)`)."""
        return not self.quantized() and all(
            m.weight.dtype == torch.float32 for m in _projection_modules(self.model) if isinstance(m, Linear)
        )

    def _embeddings(self, s: ModelStruct, tokens: list[int]) -> torch.Tensor | None:
        """The rows' embeddings for the C step: None when it reads them itself (a plain fp32 or
        bf16 `nn.Embedding` on the CPU: `s` gets its weight, read at this call), else the
        embedding module's output (B, hidden) fp32. Each torch call here costs tens of us per
        token once the step's weights have swept the caches, so the common case makes none."""
        embed = self.model.model.embed_tokens
        w = embed.weight
        if type(embed) is nn.Embedding and embed.max_norm is None and float_cpu(w) and w.stride(1) == 1:
            vocab = w.shape[0]
            if not all(0 <= t < vocab for t in tokens):
                raise IndexError(f"a token id is outside the vocabulary [0, {vocab}): {tokens}")
            s.embed, s.embed_ld, s.embed_bf16 = w.data_ptr(), w.stride(0), int(w.dtype == torch.bfloat16)
            return None
        return embed(torch.tensor(tokens)).float().contiguous()

    def step(self, cache: KVCache, tokens: list[int], codes: list[int] | None = None) -> torch.Tensor:
        """Logits (B, V) for one token per row at the rows' next positions, row b with the adapter
        `codes[b]` names (default: `codes(B)`); advances the cache."""
        b = len(tokens)
        codes = self.codes(b) if codes is None else codes
        if codes is None:
            raise ValueError(
                "the rows' adapters cannot run in the C step now; decode them on the PyTorch step"
            )
        lengths = cache.lengths[:b]
        if max(lengths) >= cache.max_len:  # the C step writes at each row's position unchecked
            raise ValueError(
                f"the KV cache is full ({cache.max_len} tokens); a row cannot take another token"
            )
        model = self.model
        s = ModelStruct.from_buffer_copy(self.struct)  # per call: two threads may decode at once
        x = self._embeddings(s, tokens)
        n = max(lengths) + 1  # the C step reads the tables' row lengths[b]
        cos, sin = self._tables(n)
        if self.local is not None:
            s.cos_local, s.sin_local = (t.data_ptr() for t in self.local.upto(n))
        logits = torch.empty(b, model.config.vocab_size)
        s.k_cache, s.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        s.s_layer, s.s_row, s.s_head, s.s_pos = cache.k.stride()[:4]
        s.kv_bf16 = int(cache.k.dtype == torch.bfloat16)
        s.kv_i8 = int(cache.quantized)
        if cache.quantized:  # each entry's scale at (its element index) / head_dim
            s.k_scale, s.v_scale = cache.k_scale.data_ptr(), cache.v_scale.data_ptr()
        row_adapter = (ctypes.c_int64 * b)(*codes)
        s.row_adapter = ctypes.addressof(row_adapter)
        cpu_kernels.use_threads(self.lib)
        status = self.lib.ws_decode(
            ctypes.byref(s), b, (ctypes.c_int64 * b)(*tokens), None if x is None else x.data_ptr(), (ctypes.c_int64 * b)(*lengths),
            cos.data_ptr(), sin.data_ptr(),
            logits.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the fused decode step could not allocate its buffers")
        cache.advance(b)
        cap = model.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap  # as CausalLM.logits

    def _tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's RoPE tables for a step whose longest row reaches `n` positions (LongRoPE: the
        long set once `n` passes the original context, for every row, as the PyTorch model)."""
        if self.long is not None and n > self.model.config.rope_scaling["original_max_position_embeddings"]:
            return self.long.upto(n)
        return self.rope.upto(n)


def cache_fits(cache: KVCache) -> bool:
    """Whether the C step can write `cache`: fp32, bf16 or int8 (with its scales laid out as the
    entries, one per head_dim of them) on the CPU, keys and values alike."""
    k, v = cache.k, cache.v
    if cache.quantized:
        d = k.shape[4]
        by_entry = tuple(n // d for n in k.stride()[:4])
        if not (
            k.stride(3) == d and all(n % d == 0 for n in k.stride()[:4])
            and cache.k_scale.stride() == by_entry == cache.v_scale.stride() and cache.k_scale.device.type == "cpu"
        ):  # fmt: skip
            return False
    elif not float_cpu(k):
        return False
    return (
        k.device.type == "cpu" and k.dtype == v.dtype and v.device == k.device and k.stride() == v.stride()
        and k.stride(4) == 1 and k.shape[3] == cache.max_len
    )  # fmt: skip


def supports(model: nn.Module) -> bool:
    """Whether the C step implements this architecture: every family (dense or a mixture of
    experts) with SwiGLU, Gemma's tanh-GELU or gpt-oss's clamped SwiGLU MLPs and grouped-query
    attention (with gpt-oss's sinks)."""
    cfg = model.config
    return (
        cfg.hidden_act in ACTS
        and cfg.num_attention_heads % cfg.num_key_value_heads == 0
        and float_cpu(model.model.embed_tokens.weight)
    )


class FusedStep:
    """The decode step that runs `fused` for up to its `max_rows` rows on a cache it can write, and
    `fallback` (the PyTorch step) for more rows, another cache or another model."""

    def __init__(self, fused: FusedDecode, fallback: Step) -> None:
        self.fused, self.fallback = fused, fallback

    def __call__(
        self, model: nn.Module, cache: KVCache, tokens: list[int], device: torch.device
    ) -> torch.Tensor:
        fused = self.fused
        if len(tokens) > fused.max_rows or model is not fused.model or not cache_fits(cache):
            return self.fallback(model, cache, tokens, device)
        codes = fused.codes(len(tokens))
        if codes is None:
            return self.fallback(model, cache, tokens, device)
        return fused.step(cache, tokens, codes)
