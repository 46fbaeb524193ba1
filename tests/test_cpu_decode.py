"""The fused C decode step (quant/cpu_decode.c, cpu_decode/fused.py) against the PyTorch model for
every supported variant, where the step must not apply, and a machine with no working C compiler."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import stat

import pytest
import torch
import transformers
from conftest import (
    CPU,
    OFF,
    TINY_SHAPE,
    assert_matches,
    build_tiny_hf_dir,
    kernels_on,
    round_inputs_like_the_kernels,
)

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cpu_decode import fused as cpu_fused
from weightsmith.cpu_decode import layout, prepare_cpu_decode
from weightsmith.cpu_decode import views as cpu_views
from weightsmith.cpu_decode.layout import PackedAttention, Swaps
from weightsmith.generate import TokenGenerator, decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.lora import (
    adapters_disabled,
    apply_lora,
    lora_layers,
    merge_and_unload,
    row_adapters,
    set_adapter,
)
from weightsmith.lora_config import LoraConfig
from weightsmith.models import linear as linear_mod
from weightsmith.quant import cpu_kernels
from weightsmith.quant import weight_only as wo
from weightsmith.sampling import SamplingParams

# -- the fused decode step against the PyTorch model ----------------------------------------

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 64, 128]]  # different lengths: per-row positions
STEPS = [[1, 2], [30, 40], [300, 7], [9, 9], [123, 45], [66, 201]]
MAX_LEN = 16
#: The Phi-3 test model's original context: the steps reach positions 7..12, so LongRoPE's long
#: set takes over in the middle of them.
LONGROPE_FROM = 10


def _save_hf(path, source, model_cls, config_cls, seed, **cfg):
    """A tiny random checkpoint of another family, with the tiny tokenizer copied over."""
    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    torch.manual_seed(seed)
    model_cls(config_cls(**{**TINY_SHAPE, "eos_token_id": 2, **cfg})).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    dirs = {"llama": tiny_hf_dir}
    builders = {
        "llama-bias": lambda p: build_tiny_hf_dir(p, seed=1, attention_bias=True, mlp_bias=True),
        "tied-yarn-mqa": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.LlamaForCausalLM, transformers.LlamaConfig, seed=2,
            tie_word_embeddings=True, num_key_value_heads=1,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        ),
        "mistral-window": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.MistralForCausalLM, transformers.MistralConfig, seed=3, sliding_window=4
        ),
        # Sliding window on layer 1 only; q/k/v biases, no o_proj bias.
        "qwen2-window": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.Qwen2ForCausalLM, transformers.Qwen2Config, seed=4,
            use_sliding_window=True, sliding_window=3, max_window_layers=1,
        ),
        "qwen3": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.Qwen3ForCausalLM, transformers.Qwen3Config, seed=5, head_dim=16,
            tie_word_embeddings=False,
        ),
        # A sliding layer with its own RoPE base, then a global one; QK-norm, (1 + w) norms, GELU.
        "gemma3": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, seed=6, head_dim=16,
            sliding_window=4, layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=100.0,
            query_pre_attn_scalar=8, pad_token_id=0,
        ),
        # Scores and logits large enough for both caps to bend them (test_gemma2s_caps_bend).
        "gemma2-capped": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.Gemma2ForCausalLM, transformers.Gemma2Config, seed=7, head_dim=16,
            sliding_window=4, query_pre_attn_scalar=1, attn_logit_softcapping=0.05,
            final_logit_softcapping=0.3, pad_token_id=0,
        ),
        "olmo2": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.Olmo2ForCausalLM, transformers.Olmo2Config, seed=8, pad_token_id=0,
        ),
        # Half of each head turns; LongRoPE's long set from position 10 on, during these steps.
        "phi3-longrope": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.Phi3ForCausalLM, transformers.Phi3Config, seed=9, pad_token_id=0,
            partial_rotary_factor=0.5, original_max_position_embeddings=LONGROPE_FROM,
            rope_scaling={"type": "longrope", "long_factor": [4.0, 3.0, 5.0, 9.0], "short_factor": [1.0, 1.5, 2.0, 2.5]},
        ),
        # 4 experts, 2 a token, renormalised.
        "mixtral": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.MixtralForCausalLM, transformers.MixtralConfig, seed=10,
            num_local_experts=4, num_experts_per_tok=2,
        ),
        # Not renormalised, a dense first layer, experts narrower than it.
        "qwen3-moe": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig, seed=11, head_dim=16,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
            mlp_only_layers=[0], tie_word_embeddings=False,
        ),
        # Sinks, biased router and experts, the clamped SwiGLU (a limit of 0.5 that random values
        # pass), a sliding layer then a full one, YaRN.
        "gpt-oss": lambda p: _save_hf(
            p, tiny_hf_dir, transformers.GptOssForCausalLM, transformers.GptOssConfig, seed=12, head_dim=16,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=4, swiglu_limit=0.5,
            layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
        ),
    }  # fmt: skip

    def get(name):
        if name not in dirs:
            dirs[name] = builders[name](root / name)
        return dirs[name]

    return get


def _load(path, **kw):
    """The checkpoint's model with random biases and norm weights (transformers initialises
    them to 0 and 1, which would hide a bias or a norm the fused step skipped or swapped)."""
    model = load_checkpoint(path, **kw).model
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".bias", ".sinks")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    return model


def _columns(model, monkeypatch):
    """Every projection (and the LM head) column-major, q/k/v and gate/up packed."""
    monkeypatch.setattr(layout, "MIN_SPLIT_NUMEL", 0)
    plan = prepare_cpu_decode(model, splits=2)
    assert model.lm_head.weight.stride(0) == 1
    assert all(
        m.weight.stride(0) == 1
        for m in cpu_fused._projection_modules(model)
        if isinstance(m, linear_mod.Linear)
    )
    return plan


def _decode_layout(model, monkeypatch):
    plan = prepare_cpu_decode(model, splits=2)  # 2 splits even on a 1-core machine, so q/k/v get packed
    attn = model.model.layers[0].self_attn
    if attn.q_proj.bias is None:
        assert type(attn) is PackedAttention and attn.q_proj.weight.stride(0) == 1
    return plan


VARIANTS = {
    "fp32-rows": ("llama", None),
    "fp32-decode-layout": ("llama", _decode_layout),
    "fp32-all-columns": ("llama", _columns),
    "int4-g32": ("llama", (4, 32, False)),
    "int4-g64-lm-head": ("llama", (4, 64, True)),
    "int8": ("llama", (8, None, False)),
    "fp32-biases-columns": ("llama-bias", _columns),
    "int8-biases-lm-head": ("llama-bias", (8, None, True)),
    "int4-biases": ("llama-bias", (4, 32, False)),
    "qwen2-window-fp32": ("qwen2-window", None),
    "qwen2-window-int4": ("qwen2-window", (4, 32, False)),
    "mistral-window-layout": ("mistral-window", _decode_layout),
    "mistral-window-int8": ("mistral-window", (8, None, False)),
    "tied-yarn-mqa-columns": ("tied-yarn-mqa", _columns),
    "tied-yarn-mqa-int4": ("tied-yarn-mqa", (4, 32, False)),
    "qwen3-columns": ("qwen3", _columns),
    "qwen3-int8": ("qwen3", (8, None, False)),
    "gemma3-fp32": ("gemma3", None),
    "gemma3-columns": ("gemma3", _columns),
    "gemma3-int4-lm-head": ("gemma3", (4, 32, True)),
    "gemma2-capped-fp32": ("gemma2-capped", None),
    "gemma2-capped-int8": ("gemma2-capped", (8, None, False)),
    "olmo2-fp32": ("olmo2", None),
    "olmo2-int4": ("olmo2", (4, 32, False)),
    "phi3-longrope-fp32": ("phi3-longrope", None),
    "phi3-longrope-int4": ("phi3-longrope", (4, 32, False)),
    "mixtral-fp32": ("mixtral", None),
    "mixtral-columns": ("mixtral", _columns),
    "mixtral-int4": ("mixtral", (4, 32, False)),
    "qwen3-moe-fp32": ("qwen3-moe", None),
    "qwen3-moe-int8": ("qwen3-moe", (8, None, False)),
    "gpt-oss-fp32": ("gpt-oss", None),
    "gpt-oss-columns": ("gpt-oss", _columns),
    "gpt-oss-int4": ("gpt-oss", (4, 32, False)),
}


def _variant(name, model_dirs, monkeypatch):
    """(model, its CPU decode plan): fp32-only models take the C step too (`fuse_fp32`), so
    that its fp32 kernels are checked in every layout."""
    source, how = VARIANTS[name]
    model = _load(model_dirs(source), decode_layout=False)
    if how is None:  # the weights as loaded (row-major): only the C step, no layout
        return model, prepare_cpu_decode(model, layout=False, fuse_fp32=True)
    if callable(how):
        return model, how(model, monkeypatch)
    plan = prepare_cpu_decode(model, splits=2)  # laid out for CPU inference, then quantized
    bits, group, lm_head = how
    names = wo.quantize_model(model, bits, group, lm_head=lm_head)
    assert ("lm_head" in names) == lm_head
    return model, plan


def _decode(model, plan=None, prompts=PROMPTS, steps=STEPS, cache=None):
    """Prefill, then `steps` decode steps through the step `plan` gives now (eager without one)."""
    if cache is None:
        cache = KVCache.for_model(model.config, len(prompts), MAX_LEN, dtype=torch.float32, device="cpu")
    step = decode_one_token if plan is None else plan.decode_step(decode_one_token)
    prefill(model, cache, prompts, CPU)
    logits = torch.stack([step(model, cache, list(tokens), CPU) for tokens in steps])
    return logits, cache


#: How far an int4/int8 model's logits may move when one of the kernels' int8 input codes rounds
#: the other way on the two paths (a value within float summation error of a rounding boundary:
#: rare, but then ~1e-3 of the logits' scale, against >= 1e-1 for a wrong scale, zero or index).
ONE_FLIP = 3e-3


def _assert_same_decode(on, off, rows: int, quantized: bool = False) -> None:
    (logits_on, cache_on), (logits_off, cache_off) = on, off
    scale = max(1.0, logits_off.abs().max().item())
    if quantized:  # every step's typical logit still agrees to float rounding
        typical = (logits_on - logits_off).abs().flatten(1).median(dim=1).values
        assert (typical <= 1e-4 * scale).all(), typical
    atol = (ONE_FLIP if quantized else 1e-4) * scale
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-4, atol=atol)
    assert cache_on.lengths[:rows] == cache_off.lengths[:rows]
    for row in range(rows):
        n = cache_off.lengths[row]
        for a, b in ((cache_on.k, cache_off.k), (cache_on.v, cache_off.v)):
            a, b = a[:, row, :, :n], b[:, row, :, :n]
            if not quantized:  # float rounding of entries of this size (an adapter makes them larger)
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
                continue
            # As the logits: an int8 rounding flip moves a few entries, the typical one agrees.
            size = max(1.0, b.abs().max().item())
            assert (a - b).abs().median() <= 1e-5 * size
            torch.testing.assert_close(a, b, rtol=1e-4, atol=ONE_FLIP * size)


def _on_and_off(model, plan, monkeypatch, fused_calls, round_rows=None, **kw):
    """Decode with the fused step, then the same tokens through the PyTorch model."""
    kernels_on(monkeypatch, True)
    on = _decode(model, plan, **kw)
    steps = len(kw.get("steps", STEPS))
    rows = len(kw.get("prompts", PROMPTS))
    assert fused_calls == [rows] * steps, "the fused step was not taken"
    kernels_on(monkeypatch, False)
    with pytest.MonkeyPatch.context() as mp:
        round_inputs_like_the_kernels(mp, round_rows)  # the fused step's int4/int8 input rounding
        off = _decode(model, plan, **kw)
    assert len(fused_calls) == steps, "the fused step ran with the kernels off"
    quantized = any(isinstance(m, (wo.Int4Linear, wo.Int8Linear)) for m in model.modules())
    _assert_same_decode(on, off, rows, quantized)
    return on, off


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_decode_equals_the_pytorch_model(variant, model_dirs, native_lib, monkeypatch, fused_calls):
    model, plan = _variant(variant, model_dirs, monkeypatch)
    cfg = model.config
    assert plan.fused() is not None
    if "window" in variant:  # the window masks some of the cache during decoding
        assert "sliding_attention" in cfg.layer_types
        assert cfg.sliding_window < len(PROMPTS[1]) + len(STEPS)
    if variant.startswith("qwen2"):
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.o_proj.bias is None
        assert cfg.layer_types == ["full_attention", "sliding_attention"]
    _, off = _on_and_off(model, plan, monkeypatch, fused_calls)
    assert off[0].abs().max() > 0.1  # logits that carry information


def test_the_variants_caps_and_long_rope_change_their_logits(model_dirs):
    """What makes the Gemma 2 and Phi-3 variants above check the C step's soft-caps and LongRoPE
    switch: switched off in the PyTorch model, each moves the decoded logits 20x or more past the
    comparison's tolerance (1e-4 of logits of scale 1)."""
    gemma2 = _load(model_dirs("gemma2-capped"), decode_layout=False)
    capped = _decode(gemma2)[0]
    cap = gemma2.config.final_logit_softcapping
    assert capped.abs().max() > 0.7 * cap  # tanh bends the largest logits by a fifth or more
    for layer in gemma2.model.layers:
        layer.self_attn.softcap = None
    assert (_decode(gemma2)[0] - capped).abs().max() > 1e-2
    phi3 = _load(model_dirs("phi3-longrope"), decode_layout=False)
    assert max(map(len, PROMPTS)) + len(STEPS) > LONGROPE_FROM > max(map(len, PROMPTS))
    both = _decode(phi3)[0]
    phi3.inv_freq_long = phi3.inv_freq  # the short set throughout
    assert (_decode(phi3)[0] - both).abs().max() > 2e-3


def test_tiny_default_is_grouped_query_attention(tiny_hf_dir):
    cfg = load_checkpoint(tiny_hf_dir).config
    assert 1 < cfg.num_key_value_heads < cfg.num_attention_heads  # what "fp32-rows" and the rest run


def test_the_window_masks_during_these_decode_steps(model_dirs, monkeypatch):
    """The sliding-window variants above check something: on the PyTorch path, a window that
    masks nothing gives other logits than the checkpoint's window of 4."""
    kernels_on(monkeypatch, False)
    model, _ = _variant("mistral-window-layout", model_dirs, monkeypatch)
    windowed, _ = _decode(model)
    model.config = dataclasses.replace(model.config, sliding_window=MAX_LEN)
    full, _ = _decode(model)
    assert (windowed - full).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["fp32-all-columns", "int4-biases", "int8-biases-lm-head"])
def test_fused_decode_with_each_instruction_set(variant, isa_lib, model_dirs, monkeypatch, fused_calls):
    """The fused step's fp32, int4 and int8 matmuls in the AVX-512, AVX2 and scalar builds."""
    monkeypatch.setattr(cpu_kernels, "_state", {"lib": isa_lib})
    model, plan = _variant(variant, model_dirs, monkeypatch)
    fused = plan.fused()
    assert fused is not None and fused.lib is isa_lib
    _on_and_off(model, plan, monkeypatch, fused_calls)


def _f32_matmul(lib, kind: int, w: torch.Tensor, n: int, k: int, x: torch.Tensor, bias=None) -> torch.Tensor:
    """y = x @ W.T (+ bias) through the C step's fp32 kernel; W (n, k) held as `w`: rows (kind 32,
    (n, ld)) or columns (kind 33, (k, ld)), ld past the last column."""
    import ctypes

    lib.ws_proj_matmul.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.ws_proj_matmul.restype = ctypes.c_int
    p = cpu_views.Proj(
        kind=kind, n=n, k=k, ld=w.stride(0), q=w.data_ptr(), bias=None if bias is None else bias.data_ptr()
    )
    y = torch.empty(x.shape[0], n)
    assert lib.ws_proj_matmul(ctypes.byref(p), x.contiguous().data_ptr(), x.shape[0], y.data_ptr(), None) == 0
    return y


F32_SHAPES = [(1, 1), (7, 15), (64, 64), (96, 200), (577, 337)]  # (k, n): tails of every tile width


@pytest.mark.parametrize("threads", [1, 3])
def test_fp32_matmuls_against_float64(isa_lib, threads):
    """The fused step's fp32 matmuls, both weight layouts, for 1 to 33 rows (register tiles of 4
    rows with AVX-512, 6 with AVX2, and every tail of either, outputs past the last whole tile),
    against a float64 product."""
    g = torch.Generator().manual_seed(5)
    isa_lib.ws_set_threads(threads)
    try:
        for k, n in F32_SHAPES:
            weight = torch.randn(n, k, generator=g)
            bias = torch.randn(n, generator=g)
            rows = torch.zeros(n, k + 3)
            rows[:, :k] = weight
            cols = torch.zeros(k, n + 5)
            cols[:, :n] = weight.t()
            for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 16, 33):
                x = torch.randn(m, k, generator=g)
                want = x.double() @ weight.double().t() + bias.double()
                tol = 1e-5 * (x.double().abs() @ weight.double().abs().t() + bias.double().abs())
                for kind, w in ((32, rows), (33, cols)):
                    got = _f32_matmul(isa_lib, kind, w, n, k, x, bias)
                    assert ((got.double() - want).abs() <= tol).all(), (kind, k, n, m)
    finally:
        cpu_kernels.use_threads(isa_lib)


@pytest.mark.parametrize("threads", [1, 3])
def test_fp32_projections_of_one_input_in_one_call_are_each_calls_bits(isa_lib, threads):
    """q, k and v as the fused step multiplies them (`ws_projs_matmul`): fp32 columns in one
    parallel region, rows (and a mix of layouts) one after another; each output the bits of
    its own call, biases included."""
    import ctypes

    g = torch.Generator().manual_seed(7)
    k, ns = 200, (48, 16, 37)
    isa_lib.ws_set_threads(threads)
    try:
        for kinds in ((33, 33, 33), (32, 32, 32), (33, 32, 33)):
            ws, projs, biases = [], [], []
            for kind, n in zip(kinds, ns, strict=True):
                w = torch.randn(k, n + 3, generator=g) if kind == 33 else torch.randn(n, k + 3, generator=g)
                b = torch.randn(n, generator=g)
                ws.append(w), biases.append(b)
                projs.append(
                    cpu_views.Proj(kind=kind, n=n, k=k, ld=w.stride(0), q=w.data_ptr(), bias=b.data_ptr())
                )
            for m in (1, 5):
                x = torch.randn(m, k, generator=g)
                ys = [torch.empty(m, n) for n in ns]
                isa_lib.ws_projs_matmul.restype = ctypes.c_int
                status = isa_lib.ws_projs_matmul(
                    (ctypes.c_void_p * 3)(*(ctypes.addressof(p) for p in projs)), ctypes.c_int(3),
                    ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(m),
                    (ctypes.c_void_p * 3)(*(y.data_ptr() for y in ys)), None,
                )  # fmt: skip
                assert status == 0
                for kind, n, w, b, y in zip(kinds, ns, ws, biases, ys, strict=True):
                    assert torch.equal(y, _f32_matmul(isa_lib, kind, w, n, k, x, b)), (kinds, n, m)
    finally:
        cpu_kernels.use_threads(isa_lib)


def test_fp32_sums_of_a_row_do_not_depend_on_its_batch(isa_lib):
    """Row 0's outputs are bit for bit the same alone and among 1-32 other rows (so a greedy
    row's tokens never depend on who else the server is decoding)."""
    g = torch.Generator().manual_seed(6)
    k, n = 300, 337
    cols = torch.randn(k, n, generator=g)
    rows = cols.t().contiguous()
    x = torch.randn(33, k, generator=g)
    for kind, w in ((32, rows), (33, cols)):
        alone = _f32_matmul(isa_lib, kind, w, n, k, x[:1])
        for m in (2, 3, 4, 5, 6, 7, 8, 11, 13, 33):
            assert torch.equal(_f32_matmul(isa_lib, kind, w, n, k, x[:m])[0], alone[0]), (kind, m)


def test_fused_fp32_decode_of_a_servers_batch_with_each_instruction_set(
    isa_lib, model_dirs, monkeypatch, fused_calls
):
    """13 rows of different lengths through the fp32 column kernels of each build."""
    monkeypatch.setattr(cpu_kernels, "_state", {"lib": isa_lib})
    model, plan = _variant("fp32-all-columns", model_dirs, monkeypatch)
    assert plan.fused().lib is isa_lib
    prompts = [[5 + i, 6, 7 + 2 * i][: 1 + i % 3] for i in range(13)]
    steps = [[3 + i for i in range(13)], [40 + i for i in range(13)]]
    _on_and_off(model, plan, monkeypatch, fused_calls, prompts=prompts, steps=steps)


@pytest.mark.parametrize("isa", cpu_kernels.ISAS)
@pytest.mark.parametrize("variant", ["int4-biases", "int8-biases-lm-head"])
def test_fused_decode_with_each_integer_instruction_set(
    variant, isa, native_lib, model_dirs, monkeypatch, fused_calls
):
    """The fused step's int4/int8 matmuls with each instruction set this CPU runs, forced."""
    if isa not in cpu_kernels.supported_isas(native_lib):
        pytest.skip(f"this CPU does not run {isa}")
    model, plan = _variant(variant, model_dirs, monkeypatch)
    cpu_kernels.select_isa(native_lib, isa)
    try:
        _on_and_off(model, plan, monkeypatch, fused_calls)
    finally:
        cpu_kernels.select_isa(native_lib, None)


def test_fused_decode_on_a_cache_view_and_fewer_rows_than_the_cache(
    model_dirs, native_lib, monkeypatch, fused_calls
):
    """A `KVCache.rows` view (storage at an offset) with a row the step must not touch, and a
    step for fewer rows than the cache holds."""
    model, plan = _variant("int4-g32", model_dirs, monkeypatch)

    def run(on: bool):
        kernels_on(monkeypatch, on)
        if not on:
            round_inputs_like_the_kernels(monkeypatch)
        step = plan.decode_step(decode_one_token)
        big = KVCache.for_model(model.config, 4, MAX_LEN, dtype=torch.float32, device="cpu")
        prefill(model, big.rows(0, 1), [[8, 9, 10, 11]], CPU)
        assert big.lengths == (4, 0, 0, 0)  # a view's lengths are the cache's
        untouched = big.k[:, 0].clone(), big.v[:, 0].clone()
        view = big.rows(1, 3)
        prefill(model, view, [*PROMPTS, [77, 78]], CPU)
        logits = [step(model, view, list(t), CPU) for t in STEPS[:3]]  # 2 of the view's 3 rows
        assert view.lengths == (len(PROMPTS[0]) + 3, len(PROMPTS[1]) + 3, 2)
        assert big.lengths == (4, *view.lengths)
        assert torch.equal(big.k[:, 0], untouched[0]) and torch.equal(big.v[:, 0], untouched[1])
        return torch.stack(logits), big

    (la, ca), (lb, cb) = run(True), run(False)
    assert fused_calls == [2, 2, 2]
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    for row in range(4):
        n = cb.lengths[row]
        torch.testing.assert_close(ca.k[:, row, :, :n], cb.k[:, row, :, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ca.v[:, row, :, :n], cb.v[:, row, :, :n], rtol=1e-4, atol=1e-5)


def test_greedy_generation_is_the_same_with_the_fused_step(model_dirs, native_lib, monkeypatch, fused_calls):
    """End to end through TokenGenerator: a row that finishes early keeps re-feeding its last
    token at a fixed position while the other row goes on."""
    model, plan = _variant("int8", model_dirs, monkeypatch)
    params = [SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=0, max_tokens=7)]

    def tokens(on: bool):
        kernels_on(monkeypatch, on)
        gen = TokenGenerator(
            model, PROMPTS, params, eos_token_ids=set(), decode=plan.decode_step(decode_one_token)
        )
        for _ in gen:
            pass
        return gen.generated, gen.finished

    on, off = tokens(True), tokens(False)
    assert fused_calls and set(fused_calls) == {2}
    assert on == off
    assert [len(t) for t in on[0]] == [3, 7]


# -- where the fused step does not apply ----------------------------------------------------


def _cache(model, rows: int) -> KVCache:
    return KVCache.for_model(model.config, rows, MAX_LEN, dtype=torch.float32, device="cpu")


def _random_adapter(model, name: str, seed: int) -> None:
    """Adapter `name`'s B matrices random (a fresh adapter's are 0, which changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                b = layer.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)


@pytest.mark.parametrize("variant", ["fp32-rows", "int4-g32", "gemma3-fp32"])
def test_the_c_step_adds_each_rows_lora_adapter(variant, model_dirs, native_lib, monkeypatch, fused_calls):
    """An unmerged adapter runs in the C step (q/k/v/o, gate/up/down, over an fp32 or int4 base):
    its logits are the PyTorch model's, and not the base model's; switching adapters or turning them
    off rebuilds the step for the next generation; rows on different adapters (the server's
    `row_adapters`) each get theirs in the same step; merged, the logits stay."""
    model, plan = _variant(variant, model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    base, _ = _decode(model, plan)
    assert len(fused_calls) == len(STEPS)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    _random_adapter(model, "default", 0)
    fused_calls.clear()
    on, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
    assert (on[0] - base).abs().max() > 1e-2  # the adapter was applied, not bypassed
    apply_lora(model, LoraConfig(r=2, target_modules=["k_proj", "gate_proj"]), "other")
    _random_adapter(model, "other", 1)
    set_adapter(model, "other")
    fused_calls.clear()
    other, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
    assert (other[0] - on[0]).abs().max() > 1e-2
    with adapters_disabled(model):
        fused_calls.clear()
        _on_and_off(model, plan, monkeypatch, fused_calls)
    # The server's batches: each row its own adapter (or none), in one C step.
    for names in (["default", "other"], [None, "default"], [None, None]):
        with row_adapters(model, names):
            fused_calls.clear()
            mixed, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
        for row, name in enumerate(names):  # each row as when its adapter alone is active
            want = {"default": on[0], "other": other[0], None: base}[name]
            torch.testing.assert_close(mixed[0][:, row], want[:, row], rtol=1e-4, atol=1e-4)
    set_adapter(model, "default")
    kernels_on(monkeypatch, True)
    step = plan.decode_step(decode_one_token)
    with row_adapters(model, ["default"]):  # a batch of another size than the step's
        assert step.fused.codes(2) is None
    layers = list(lora_layers(model).values())
    layers[-1].active_adapter = "other"  # one layer set apart by hand: the PyTorch step follows it
    assert step.fused.codes(2) is None
    layers[-1].active_adapter = "default"
    if variant.startswith("int4"):
        return  # no merge into an int4 base
    merge_and_unload(model, "default")  # the original modules back, the delta in their weights
    assert plan.fused() is not None and not plan.fused().loras
    fused_calls.clear()
    merged_on, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
    torch.testing.assert_close(merged_on[0], on[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["fp32-biases-columns", "int4-biases"])
def test_the_c_step_runs_dora_adapters(variant, model_dirs, native_lib, monkeypatch, fused_calls):
    """A DoRA adapter's rows in the C step: each output scaled by m / ||W + s B A|| around the
    projection's bias, as the PyTorch layer computes; beside plain LoRA and base rows in one step;
    a magnitude changed in place rebuilds the step's scales."""
    model, plan = _variant(variant, model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    base, _ = _decode(model, plan)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_lora(model, LoraConfig(r=4, target_modules=every, use_dora=True))
    _random_adapter(model, "default", 0)
    magnitudes = [m.lora_magnitude_vector["default"].weight for m in lora_layers(model).values()]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in magnitudes:
            m.mul_(1 + torch.rand(m.shape, generator=g) * 0.3)
    fused_calls.clear()
    on, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
    assert (on[0] - base).abs().max() > 1e-2
    apply_lora(model, LoraConfig(r=2, target_modules=["k_proj", "gate_proj"]), "plain")
    _random_adapter(model, "plain", 1)
    set_adapter(model, "plain")
    fused_calls.clear()
    plain, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
    for names in (["default", "plain"], [None, "default"]):
        with row_adapters(model, names):
            fused_calls.clear()
            mixed, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
        for row, name in enumerate(names):
            want = {"default": on[0], "plain": plain[0], None: base}[name]
            torch.testing.assert_close(mixed[0][:, row], want[:, row], rtol=1e-4, atol=1e-4)
    set_adapter(model, "default")
    with torch.no_grad():
        magnitudes[3].mul_(3.0)  # o_proj of layer 0: the step's scale for it must follow
    fused_calls.clear()
    moved, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
    assert (moved[0] - on[0]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["fp32-rows", "int4-g32", "qwen2-window-fp32"])
def test_a_bf16_cache_under_an_fp32_model(variant, model_dirs, native_lib, monkeypatch, fused_calls):
    """`--kv-cache-dtype bf16`: the C step reads and writes the bf16 cache as the PyTorch model
    does (entries rounded alike), and the logits stay near the fp32 cache's."""
    model, plan = _variant(variant, model_dirs, monkeypatch)

    def bf16_cache() -> KVCache:
        return KVCache.for_model(model.config, len(PROMPTS), MAX_LEN, dtype=torch.bfloat16, device="cpu")

    kernels_on(monkeypatch, True)
    on = _decode(model, plan, cache=bf16_cache())
    assert fused_calls == [len(PROMPTS)] * len(STEPS)
    kernels_on(monkeypatch, False)
    with pytest.MonkeyPatch.context() as mp:
        round_inputs_like_the_kernels(mp, None)
        off = _decode(model, plan, cache=bf16_cache())
    quantized = variant.startswith("int4")
    _assert_same_decode(on, off, len(PROMPTS), quantized)
    kernels_on(monkeypatch, True)
    full, _ = _decode(model, plan)  # an fp32 cache
    scale = full.abs().max().item()
    assert 0 < (on[0] - full).abs().max().item() < 0.05 * scale


def test_an_adapter_that_does_not_fit_its_layer_is_left_to_the_pytorch_step(
    model_dirs, native_lib, monkeypatch
):
    """A's width or B's height other than the layer's (a hostile adapter file, say): no C step
    (it would read past its input); the PyTorch step names the mismatch."""
    model, plan = _variant("fp32-rows", model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    apply_lora(model, LoraConfig(r=4, target_modules=["down_proj"]))
    down = model.model.layers[1].mlp.down_proj
    assert plan.fused() is not None
    down.lora_A["default"] = torch.nn.Linear(down.in_features - 8, 4, bias=False)
    assert plan.fused() is None
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _decode(model, plan)


def _on_and_off_no_plan(model, plan, monkeypatch, fused_calls, **kw):
    kernels_on(monkeypatch, True)
    on = _decode(model, plan, **kw)
    kernels_on(monkeypatch, False)
    with pytest.MonkeyPatch.context() as mp:
        round_inputs_like_the_kernels(mp)  # a tiled layer's kernels take short prefills too
        off = _decode(model, plan, **kw)
    assert fused_calls == []
    quantized = any(isinstance(m, (wo.Int4Linear, wo.Int8Linear)) for m in model.modules())
    _assert_same_decode(on, off, len(kw.get("prompts", PROMPTS)), quantized)
    return on, off


def test_no_plan_for_more_rows_than_max_rows(model_dirs, native_lib, monkeypatch, fused_calls):
    model, plan = _variant("int4-g32", model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    step = plan.decode_step(decode_one_token)
    n = plan.fused().max_rows
    assert n == cpu_fused.MAX_ROWS
    cache = _cache(model, n + 1)
    prefill(model, cache, [[5, 6]] * (n + 1), CPU)
    step(model, cache, [3] * n, CPU)  # n of the cache's n + 1 rows: the C step
    assert fused_calls == [n]
    fused_calls.clear()
    prompts = [[5 + i, 6, 7 + 2 * i][: 1 + i % 3] for i in range(n + 1)]
    _on_and_off_no_plan(model, plan, monkeypatch, fused_calls, prompts=prompts, steps=[[3] * (n + 1)] * 2)


@pytest.mark.parametrize(
    "variant", ["int8-biases-lm-head", "fp32-rows", "fp32-all-columns", "mixtral-int4", "qwen3-moe-fp32"]
)
def test_fused_decode_of_a_servers_batch(variant, model_dirs, native_lib, monkeypatch, fused_calls):
    """The C step takes the server's decode batches, quantized or fp32 (13 rows here: register tiles
    of 4 rows and a tail of 1, prompts of different lengths; experts taking several rows at once)."""
    model, plan = _variant(variant, model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    assert plan.fused().max_rows == cpu_fused.MAX_ROWS >= 16
    rows = 13
    prompts = [[5 + i, 6, 7 + 2 * i][: 1 + i % 3] for i in range(rows)]
    steps = [[3 + i for i in range(rows)], [40 + i for i in range(rows)]]
    # The 13-row decode steps are rounded in every layer, the prefill in the tiled ones.
    _on_and_off(model, plan, monkeypatch, fused_calls, round_rows=rows, prompts=prompts, steps=steps)


def test_no_plan_when_disabled_or_the_cache_does_not_fit(model_dirs, native_lib, monkeypatch):
    model, plan = _variant("fp32-rows", model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    assert plan.fused() is not None and cpu_fused.cache_fits(_cache(model, 2))
    fp16 = KVCache.for_model(model.config, 2, MAX_LEN, dtype=torch.float16, device="cpu")
    assert not cpu_fused.cache_fits(fp16)  # (fp32 and bf16 it writes: test_cpu_bf16.py)
    calls = []
    step = plan.decode_step(lambda *args: calls.append(args))  # a cache it cannot write: the fallback
    step(model, fp16, [1, 2], CPU)
    assert len(calls) == 1
    for value in ("0", "false", "off", "NO"):
        monkeypatch.setenv(OFF, value)
        assert not cpu_kernels.enabled()
        assert plan.fused() is None and plan.decode_step(decode_one_token) is decode_one_token
        assert cpu_kernels.library() is None


def test_no_plan_for_a_non_silu_activation(tmp_path, native_lib, monkeypatch, fused_calls):
    model = _load(build_tiny_hf_dir(tmp_path / "gelu", hidden_act="gelu"), decode_layout=False)
    plan = prepare_cpu_decode(model)
    kernels_on(monkeypatch, True)
    assert plan.fused() is None
    _on_and_off_no_plan(model, plan, monkeypatch, fused_calls)


def test_plan_is_rebuilt_after_modules_are_replaced(model_dirs, native_lib, monkeypatch, fused_calls):
    model, plan = _variant("fp32-rows", model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    first = plan.fused()
    assert first is not None and first.struct.layers[0].q.kind == 32  # fp32 rows
    assert plan.fused() is first  # built once
    fp32, _ = _decode(model, plan)

    layout.lay_out(model, 2, Swaps())  # new (column-major) data in the same parameters
    assert not first.current()
    second = plan.fused()
    assert second is not first and second.struct.layers[0].q.kind == 33

    wo.quantize_model(model, 4, 32)  # new modules
    assert not second.current()
    third = plan.fused()
    assert third is not None and third is not second
    layer = third.struct.layers[1]
    assert [getattr(layer, p).kind for p in cpu_fused.PROJECTIONS] == [4] * 7
    assert third.struct.head.kind == 32  # the LM head stays full precision
    fused_calls.clear()
    on, _ = _on_and_off(model, plan, monkeypatch, fused_calls)
    assert (on[0] - fp32).abs().max() > 1e-4  # really the int4 weights now, not the stale fp32 ones


def test_plan_notices_parameters_whose_data_was_swapped(model_dirs, native_lib, monkeypatch, fused_calls):
    """`Module.to` (another dtype or device and back) keeps each Parameter object and gives it
    new data; whatever was done to the weights meanwhile must show in the fused step."""
    model, plan = _variant("fp32-rows", model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    _decode(model, plan)  # builds the C step
    model.to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # e.g. trained elsewhere
    model.to(torch.float32)
    fused_calls.clear()
    _on_and_off(model, plan, monkeypatch, fused_calls)


def test_plan_notices_a_replaced_norm_weight(model_dirs, native_lib, monkeypatch, fused_calls):
    model, plan = _variant("fp32-rows", model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    _decode(model, plan)  # builds the C step
    norm = model.model.layers[0].post_attention_layernorm
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2)
    fused_calls.clear()
    _on_and_off(model, plan, monkeypatch, fused_calls)


# -- no compiler ----------------------------------------------------------------------------


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_working_compiler_the_pytorch_path_runs(
    compiler, tmp_path, tiny_hf_dir, monkeypatch, caplog, kernel_calls, fused_calls
):
    if compiler == "missing":
        cc = "/nonexistent/cc"
    else:
        cc = tmp_path / "cc"
        cc.write_text("#!/bin/sh\necho 'cc: error: no' >&2\nexit 1\n")
        cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))  # no prebuilt library there
    monkeypatch.setattr(cpu_kernels, "_state", {})
    kernels_on(monkeypatch, True)
    torch.manual_seed(9)
    linear = torch.nn.Linear(64, 24)
    layer = wo.Int4Linear.from_linear(linear, 32)
    model = _load(tiny_hf_dir)
    plan = prepare_cpu_decode(model)
    wo.quantize_model(model, 8)
    with caplog.at_level(logging.WARNING, logger="weightsmith.quant.cpu_kernels"):
        assert cpu_kernels.library() is None
        assert cpu_kernels.library() is None  # remembered: no second build, no second warning
        assert cpu_kernels.info() == {"available": False}
        x = torch.randn(2, 64)
        assert_matches(layer(x), x.double() @ layer.dequantize().double().T + layer.bias.double())
        assert plan.fused() is None
        logits, cache = _decode(model, plan)
    assert kernel_calls == [] and fused_calls == []
    assert torch.isfinite(logits).all() and cache.lengths == tuple(len(p) + len(STEPS) for p in PROMPTS)
    warnings = [r for r in caplog.records if r.name == cpu_kernels.__name__ and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "PyTorch path" in warnings[0].getMessage()
    assert not list((tmp_path / "home").rglob("*.so"))


def test_a_full_cache_is_an_error_not_a_write_past_the_end(model_dirs, native_lib, monkeypatch):
    model, plan = _variant("int4-g32", model_dirs, monkeypatch)
    kernels_on(monkeypatch, True)
    cache = KVCache.for_model(model.config, 1, 4, dtype=torch.float32, device="cpu")
    prefill(model, cache, [[5, 6, 7, 8]], CPU)  # the cache is now full
    before = cache.k.clone()
    step = plan.decode_step(decode_one_token)
    assert isinstance(step, cpu_fused.FusedStep)
    with pytest.raises(ValueError, match="KV cache is full"):
        step(model, cache, [9], CPU)
    assert torch.equal(cache.k, before) and cache.lengths == (4,)


def test_fp32_models_can_be_left_to_the_pytorch_path(model_dirs, native_lib, monkeypatch):
    kernels_on(monkeypatch, True)
    model = _load(model_dirs("llama"))
    assert prepare_cpu_decode(model).fused() is not None  # fuse_fp32 is the default
    model = _load(model_dirs("llama"))
    plan = prepare_cpu_decode(model, fuse_fp32=False)
    assert plan.fused() is None
    wo.quantize_model(model, 4, 32)  # quantized projections, fp32 (column-major) head
    assert plan.fused() is not None
