"""bf16 decoding through the fused C step (quant/cpu_bf16.c, cpu_decode/fused.py).

The bf16 matmul on every instruction set this CPU runs, each forced in turn, against a float64
product of the bf16-rounded input (odd shapes, tails, both weight layouts, the rounding itself);
then the fused step of a bf16 model of every family the step runs: against the same model's
math in fp32 with the step's roundings (bf16 matmul inputs and KV cache entries) to float
summation order, against the PyTorch bf16 model within that model's own bf16 error, and greedy
tokens against the PyTorch bf16 path."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import (
    CPU,
    TINY_SHAPE,
    assert_matches,
    build_tiny_hf_dir,
    build_tiny_tokenizer_dir,
    kernels_on,
    round_inputs_like_the_kernels,
)

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cpu_decode import fused as cpu_fused
from weightsmith.cpu_decode import prepare_cpu_decode
from weightsmith.errors import ConfigError
from weightsmith.generate import TokenGenerator, decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.models import linear as linear_mod
from weightsmith.quant import cpu_kernels
from weightsmith.quant import weight_only as wo
from weightsmith.sampling import SamplingParams


@pytest.fixture(params=cpu_kernels.BF16_ISAS)
def bf16_isa(request, native_lib):
    """The native library with its bf16 kernels forced to one instruction set."""
    if request.param not in cpu_kernels.supported_bf16_isas(native_lib):
        pytest.skip(f"this CPU does not run {request.param}")
    cpu_kernels.select_bf16_isa(native_lib, request.param)
    assert native_lib.ws_bf16_isa().decode() == request.param
    yield native_lib
    cpu_kernels.select_bf16_isa(native_lib, None)


# -- the matmul ------------------------------------------------------------------------------


def _weight(n: int, k: int, cols: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2).bfloat16()
    return w.t().contiguous().t() if cols else w  # columns: a transposed (K, N) buffer


@pytest.mark.parametrize("cols", [False, True], ids=["rows", "cols"])
@pytest.mark.parametrize("rows", [1, 4, 5, 32])  # one, a block of 4, a block and a tail, many
@pytest.mark.parametrize(("k", "n"), [(7, 5), (32, 37), (100, 37), (64, 129), (200, 300)])
def test_bf16_matmul_matches_float64(bf16_isa, k, n, rows, cols):
    """Every tail: k below, at and between the vector widths (8, 16, 32, 64 values), n across
    the columns path's register tiles (64, 128 outputs) and past them."""
    w = _weight(n, k, cols, seed=k + n + rows)
    assert (w.stride(0) == 1) == cols
    g = torch.Generator().manual_seed(rows)
    x, bias = torch.randn(rows, k, generator=g) * 3, torch.randn(n, generator=g) if rows % 2 else None
    out = cpu_kernels.bf16_matmul(bf16_isa, x, w, bias)
    ref = x.bfloat16().double() @ w.double().T + (0 if bias is None else bias.double())
    assert_matches(out, ref)
    assert torch.isfinite(out).all()


def test_the_input_is_rounded_to_nearest_even_bf16(bf16_isa):
    """Through an identity weight the output is the rounded input itself: halfway cases go to the
    even neighbour (1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6), as torch's .bfloat16() rounds."""
    k = 40
    x = torch.linspace(-3, 3, k).reshape(1, k)
    x[0, :6] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3e38, -0.0, 2.0**-120])
    out = cpu_kernels.bf16_matmul(bf16_isa, x, torch.eye(k).bfloat16(), None)
    assert torch.equal(out, x.bfloat16().float())
    assert out[0, 0] == 1 and out[0, 1] == 1 + 2**-6


def test_the_isa_choice_follows_the_integer_kernels_and_can_be_forced(native_lib):
    supported = cpu_kernels.supported_bf16_isas(native_lib)
    assert supported[0] == "scalar" and set(supported) <= set(cpu_kernels.BF16_ISAS)
    assert native_lib.ws_bf16_isa().decode() == supported[-1]
    try:
        for int_isa in cpu_kernels.supported_isas(native_lib):
            cpu_kernels.select_isa(native_lib, int_isa)
            want = cpu_kernels.BF16_FOR_ISA[int_isa] or supported[-1]
            assert native_lib.ws_bf16_isa().decode() == want
        with pytest.raises(ConfigError, match="bf16 kernels"):
            cpu_kernels.select_bf16_isa(native_lib, "sse9")
    finally:
        cpu_kernels.select_isa(native_lib, None)
    assert native_lib.ws_bf16_isa().decode() == supported[-1]


# -- the fused step --------------------------------------------------------------------------

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 64, 128]]  # different lengths: per-row positions
STEPS = [[1, 2], [30, 40], [300, 7], [9, 9], [123, 45], [66, 201]]
MAX_LEN = 16


def _family_dir(path, family: str):
    """A tiny random checkpoint of each family the C step runs."""
    if family == "llama-bias":
        return build_tiny_hf_dir(path, seed=1, attention_bias=True, mlp_bias=True)
    if family == "tied-mqa":
        return build_tiny_hf_dir(path, seed=2, tie_word_embeddings=True, num_key_value_heads=1)
    build_tiny_tokenizer_dir(path)
    cls, cfg_cls, extra = {
        "mistral-window": (transformers.MistralForCausalLM, transformers.MistralConfig, {"sliding_window": 4}),
        "qwen2-window": (
            transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
            {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
        ),
        "gemma3": (
            transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig,
            {"head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
             "rope_local_base_freq": 100.0, "pad_token_id": 0},
        ),
        "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config, {"pad_token_id": 0}),
        "mixtral": (
            transformers.MixtralForCausalLM, transformers.MixtralConfig,
            {"num_local_experts": 4, "num_experts_per_tok": 2},
        ),
    }[family]  # fmt: skip
    torch.manual_seed(3)
    cls(cfg_cls(**{**TINY_SHAPE, "eos_token_id": 2, **extra})).eval().save_pretrained(path)
    return path


FAMILIES = ["llama-bias", "tied-mqa", "mistral-window", "qwen2-window", "gemma3", "olmo2", "mixtral"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("bf16"), {}

    def get(family):
        if family not in made:
            made[family] = _family_dir(root / family, family)
        return made[family]

    return get


def _bf16_model(path):
    """The checkpoint in bf16, with random biases and norm weights (not the 0 and 1 transformers
    starts them at, which would hide one the step skipped)."""
    model = load_checkpoint(path, dtype=torch.bfloat16).model
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    assert model.lm_head.weight.dtype == torch.bfloat16
    return model


def _rounded_like_the_step(monkeypatch) -> None:
    """The fp32 model computes what the step does: projection inputs and cache entries rounded
    to bf16 (the cache is a bf16 model's), everything else in fp32."""
    forward = linear_mod.Linear.forward
    monkeypatch.setattr(linear_mod.Linear, "forward", lambda self, x: forward(self, x.bfloat16().float()))
    write = KVCache.write

    def rounded_write(self, layer, positions, k, v, *args, **kw):
        return write(self, layer, positions, k.bfloat16().float(), v.bfloat16().float(), *args, **kw)

    monkeypatch.setattr(KVCache, "write", rounded_write)


def _cache(model, dtype, rows=2) -> KVCache:
    return KVCache.for_model(model.config, rows, MAX_LEN, dtype=dtype, device="cpu")


def _steps(model, cache, step, steps=STEPS) -> torch.Tensor:
    return torch.stack([step(model, cache, list(t), CPU) for t in steps])


def _c_step(model, fused_calls, head_kind=48, layer_kind=48):
    plan = prepare_cpu_decode(model, splits=2)
    fused = plan.fused()
    assert fused is not None and fused.max_rows == cpu_fused.MAX_ROWS
    assert (
        fused.struct.head.kind == head_kind and fused.struct.layers[0].q.kind == layer_kind
    )  # 48: bf16 rows
    fused_calls.clear()
    return plan.decode_step(decode_one_token)


def _tight(model, fused_calls, monkeypatch, prompts=PROMPTS, steps=STEPS, **kinds):
    """(C step logits, reference logits, C cache, reference cache) from one shared prefill."""
    ref = copy.deepcopy(model).float()  # the same values, exactly
    if ref.model.embed_scale is not None:  # Gemma's sqrt(hidden), which a bf16 model takes in bf16
        ref.model.embed_scale = torch.tensor(ref.model.embed_scale, dtype=torch.bfloat16).item()
    kernels_on(monkeypatch, True)
    step = _c_step(model, fused_calls, **kinds)
    with monkeypatch.context() as mp:
        _rounded_like_the_step(mp)
        ref_cache = _cache(ref, torch.float32, len(prompts))
        prefill(ref, ref_cache, prompts, CPU)
        cache = _cache(model, torch.bfloat16, len(prompts))
        cache.k.copy_(ref_cache.k), cache.v.copy_(ref_cache.v)  # exact: already rounded
        cache.set_lengths(0, ref_cache.lengths)
        want = _steps(ref, ref_cache, decode_one_token, steps)
    got = _steps(model, cache, step, steps)
    assert fused_calls == [len(prompts)] * len(steps), "the fused step was not taken"
    return got, want, cache, ref_cache


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_bf16_step_equals_the_models_math(family, family_dirs, native_lib, monkeypatch, fused_calls):
    model = _bf16_model(family_dirs(family))
    got, want, cache, ref_cache = _tight(model, fused_calls, monkeypatch)
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    assert want.abs().max() > 0.1  # logits that carry information
    assert cache.lengths == ref_cache.lengths
    for row, n in enumerate(cache.lengths):  # entries rounded alike, up to one bf16 step on a near-tie
        for a, b in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
            torch.testing.assert_close(a[:, row, :, :n].float(), b[:, row, :, :n], rtol=2**-7, atol=1e-5)


def test_fused_bf16_step_with_each_instruction_set(bf16_isa, family_dirs, monkeypatch, fused_calls):
    model = _bf16_model(family_dirs("qwen2-window"))  # biases, a window, grouped-query attention
    got, want, _, _ = _tight(model, fused_calls, monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_fused_bf16_step_takes_the_servers_batches(family_dirs, native_lib, monkeypatch, fused_calls):
    """12 rows, a server's decode batch: the row blocks of 4 and a tail."""
    model = _bf16_model(family_dirs("llama-bias"))
    rows = 12
    prompts = [[5 + i, 6, 7 + 2 * i][: 1 + i % 3] for i in range(rows)]
    steps = [[3 + i for i in range(rows)], [40 + i for i in range(rows)]]
    got, want, _, _ = _tight(model, fused_calls, monkeypatch, prompts=prompts, steps=steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_a_bf16_model_with_int4_projections(family_dirs, native_lib, monkeypatch, fused_calls):
    """Quantized after loading in bf16: int4 projections (their int8-rounded inputs), the bf16
    LM head (its bf16-rounded input) and bf16 norms and biases, in one step."""
    model = _bf16_model(family_dirs("llama-bias"))
    wo.quantize_model(model, 4, 32)
    assert type(model.model.layers[0].mlp.down_proj) is wo.Int4Linear
    round_inputs_like_the_kernels(monkeypatch)  # the reference's int4 inputs: int8-rounded
    got, want, _, _ = _tight(
        model, fused_calls, monkeypatch, head_kind=48, layer_kind=5
    )  # 5: int4 16-row tiles
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_bf16_step_is_within_the_pytorch_bf16_models_error(
    family, family_dirs, native_lib, monkeypatch, fused_calls
):
    """From one prefill (the PyTorch bf16 model's), the C step is at least as close to the exact
    (fp32) decode as the PyTorch bf16 model itself is: it rounds only the matmul inputs and the
    cache, PyTorch's bf16 path every intermediate."""
    model = _bf16_model(family_dirs(family))
    exact_model = copy.deepcopy(model).float()
    kernels_on(monkeypatch, True)
    step = _c_step(model, fused_calls)
    cache = _cache(model, torch.bfloat16)
    prefill(model, cache, PROMPTS, CPU)
    torch_cache, exact_cache = copy.deepcopy(cache), _cache(model, torch.float32)
    exact_cache.k.copy_(cache.k), exact_cache.v.copy_(cache.v)
    exact_cache.set_lengths(0, cache.lengths)
    ours = _steps(model, cache, step)
    assert len(fused_calls) == len(STEPS)
    kernels_on(monkeypatch, False)
    theirs = _steps(model, torch_cache, decode_one_token).float()
    exact = _steps(exact_model, exact_cache, decode_one_token)
    their_error = (theirs - exact).abs().max().item()
    assert 0 < their_error < 0.1 * exact.abs().max().item()  # bf16 rounding, not a broken model
    assert (ours - exact).abs().max().item() <= their_error


def test_greedy_tokens_match_the_pytorch_bf16_path(family_dirs, native_lib, monkeypatch, fused_calls):
    """End to end through TokenGenerator, a row finishing early: the C step picks the PyTorch bf16
    path's tokens (their logits differ by bf16 rounding only, less than these top-2 margins)."""
    model = _bf16_model(family_dirs("llama-bias"))
    plan = prepare_cpu_decode(model)
    params = [SamplingParams(temperature=0, max_tokens=4), SamplingParams(temperature=0, max_tokens=8)]

    def tokens(on: bool):
        kernels_on(monkeypatch, on)
        gen = TokenGenerator(
            model, PROMPTS, params, eos_token_ids=set(), decode=plan.decode_step(decode_one_token)
        )
        for _ in gen:
            pass
        assert gen.cache.k.dtype == torch.bfloat16
        return gen.generated

    on = tokens(True)
    assert fused_calls and set(fused_calls) == {2}
    assert on == tokens(False)
    assert [len(t) for t in on] == [4, 8]


def test_a_changed_bf16_norm_or_bias_rebuilds_the_step(family_dirs, native_lib, monkeypatch, fused_calls):
    """Their fp32 copies follow the model: an in-place change is noticed before the next decode."""
    model = _bf16_model(family_dirs("qwen2-window"))
    kernels_on(monkeypatch, True)
    plan = prepare_cpu_decode(model)
    first = plan.fused()
    assert first is not None and first.current()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.mul_(2)
    assert not first.current() and plan.fused() is not first
    second = plan.fused()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.add_(0.5)
    assert not second.current()
    got, want, _, _ = _tight(model, fused_calls, monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))


def test_bf16_weights_keep_their_layout_and_bytes(family_dirs, native_lib, monkeypatch):
    """The decode layout leaves bf16 weights row-major, and the step reads them in place."""
    model = _bf16_model(family_dirs("tied-mqa"))
    before = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    kernels_on(monkeypatch, True)
    plan = prepare_cpu_decode(model, splits=2)
    fused = plan.fused()
    assert {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()} == before
    big = [m.weight for m in cpu_fused._projection_modules(model)]
    assert all(w.dtype == torch.bfloat16 for w in big)
    assert fused.struct.head.q == model.model.embed_tokens.weight.data_ptr()  # tied: the one buffer
    copied = sum(t.numel() * t.element_size() for t in fused.keep if t.dtype == torch.float32)
    assert copied < 0.01 * sum(w.numel() * w.element_size() for w in big)
