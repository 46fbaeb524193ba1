"""`prepare_cpu_decode` as an explicit, reversible swap: names, objects and values kept while it
is in place, exactly restored by `undo`; rebuilt (not stale) after adapters are applied or
merged; owned by the engine, whose chosen step the generator and the scheduler use."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU, build_tiny_hf_dir, kernels_on

import weightsmith
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cpu_decode import fused as cpu_fused
from weightsmith.cpu_decode import layout, prepare_cpu_decode
from weightsmith.cpu_decode.layout import PackedAttention, PackedMLP, SplitLinear
from weightsmith.engine import Engine
from weightsmith.generate import decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.lora import apply_lora, lora_layers, lora_state_dict, merge_and_unload
from weightsmith.lora_config import LoraConfig
from weightsmith.models.linear import Linear
from weightsmith.models.model import MLP, Attention
from weightsmith.sampling import SamplingParams
from weightsmith.serve.scheduler import Request, Scheduler

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 64, 128]]
STEPS = [[1, 2], [30, 40], [300, 7], [9, 9]]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return build_tiny_hf_dir(tmp_path_factory.mktemp("tied") / "tied", seed=4, tie_word_embeddings=True)


def _snapshot(model):
    return (
        {n: (m, type(m)) for n, m in model.named_modules()},
        {n: (p, p.detach().clone(), p.stride()) for n, p in model.named_parameters(remove_duplicate=False)},
        list(model.state_dict()),
    )


@pytest.mark.parametrize("source", ["tiny", "tied"])
def test_undo_restores_the_exact_modules_and_tensors(source, tiny_hf_dir, tied_dir, monkeypatch):
    monkeypatch.setattr(layout, "MIN_SPLIT_NUMEL", 0)  # lay out every projection and the LM head
    model = load_checkpoint(tiny_hf_dir if source == "tiny" else tied_dir).model
    modules, params, keys = _snapshot(model)
    values = {k: v.clone() for k, v in model.state_dict().items()}

    plan = prepare_cpu_decode(model, splits=2)
    assert type(model.model.layers[0].self_attn) is PackedAttention
    assert type(model.model.layers[1].mlp) is PackedMLP
    assert type(model.lm_head) is SplitLinear and model.lm_head.weight.stride(0) == 1
    assert list(model.state_dict()) == keys  # the same names while the plan is in place
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())
    for name, (module, _) in modules.items():
        assert model.get_submodule(name) is module  # the same objects (only their classes differ)
    if source == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight

    plan.undo()
    assert list(model.state_dict()) == keys
    for name, (module, cls) in modules.items():
        now = model.get_submodule(name)
        assert now is module and type(now) is cls
        assert not hasattr(now, "split") and not hasattr(now, "group")
    for name, (p, value, stride) in params.items():
        now = model.get_parameter(name)
        assert now is p and now.stride() == stride and torch.equal(now, value), name
    assert not any(isinstance(m, (SplitLinear, PackedAttention, PackedMLP)) for m in model.modules())
    if source == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_layout_gives_the_plain_models_logits(tiny_hf_dir, monkeypatch):
    kernels_on(monkeypatch, False)  # the PyTorch path through the swapped-in modules
    plain = load_checkpoint(tiny_hf_dir).model
    model = load_checkpoint(tiny_hf_dir).model
    prepare_cpu_decode(model, splits=2)
    want, got = _decode(plain, decode_one_token), _decode(model, decode_one_token)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _decode(model, step) -> torch.Tensor:
    cache = KVCache.for_model(model.config, len(PROMPTS), 16, dtype=torch.float32, device="cpu")
    out = [prefill(model, cache, PROMPTS, CPU)]
    out += [step(model, cache, list(tokens), CPU) for tokens in STEPS]
    return torch.stack(out)  # (1 + steps, B, V)


def _adapt(model) -> None:
    """The same adapter on every model: A and B seeded, B non-zero so it changes the output."""
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in sorted(lora_layers(model).items()):
            for part, scale in ((layer.lora_A, 0.2), (layer.lora_B, 0.5)):
                w = part["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * scale)


def test_the_plan_is_rebuilt_after_an_adapter_is_applied_and_merged(
    tiny_hf_dir, native_lib, monkeypatch, fused_calls
):
    reference = load_checkpoint(tiny_hf_dir).model  # never laid out: plain PyTorch
    model = load_checkpoint(tiny_hf_dir).model
    plan = prepare_cpu_decode(model, splits=2)
    assert isinstance(plan.decode_step(decode_one_token), cpu_fused.FusedStep)
    _decode(model, plan.decode_step(decode_one_token))
    assert fused_calls == [2] * len(STEPS)

    for m in (reference, model):
        _adapt(m)
    fused_calls.clear()
    step = plan.decode_step(decode_one_token)
    assert isinstance(step, cpu_fused.FusedStep)  # rebuilt with the adapter, which it adds
    torch.testing.assert_close(
        _decode(model, step), _decode(reference, decode_one_token), rtol=1e-4, atol=1e-4
    )
    assert fused_calls == [2] * len(STEPS)
    assert lora_state_dict(model).keys() == lora_state_dict(reference).keys()
    assert (
        _decode(model, step) - _decode(load_checkpoint(tiny_hf_dir).model, decode_one_token)
    ).abs().max() > 1e-2

    for m in (reference, model):
        merge_and_unload(m)
    fused_calls.clear()
    step = plan.decode_step(decode_one_token)
    assert isinstance(step, cpu_fused.FusedStep)
    got = _decode(model, step)
    assert fused_calls == [2] * len(STEPS)
    torch.testing.assert_close(got, _decode(reference, decode_one_token), rtol=1e-4, atol=1e-4)


def test_the_engine_owns_the_plan(tiny_hf_dir, native_lib, monkeypatch):
    ckpt = load_checkpoint(tiny_hf_dir)
    model = ckpt.model
    assert type(model.model.layers[0].self_attn) is Attention  # loading does not lay out
    engine = Engine(model, ckpt.tokenizer)
    assert engine.cpu_plan is not None and isinstance(engine.decode_step(), cpu_fused.FusedStep)
    second = Engine(model, ckpt.tokenizer)  # another engine on the same model swaps nothing more
    second.cpu_plan.undo()
    assert type(model.model.layers[0].mlp) is PackedMLP
    kernels_on(monkeypatch, False)
    assert engine.decode_step() is decode_one_token
    engine.cpu_plan.undo()
    assert type(model.model.layers[0].mlp) is MLP and type(model.model.layers[0].mlp.up_proj) is Linear
    assert Engine(model, ckpt.tokenizer, cpu_decode=False).cpu_plan is None
    assert type(model.model.layers[0].mlp) is MLP


def test_generate_and_serve_take_the_c_step(tiny_hf_dir, native_lib, fused_calls):
    llm = weightsmith.load(tiny_hf_dir)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.engine.generate([[5, 6, 7], [8, 9]], params)
    assert fused_calls == [2, 2, 2]
    fused_calls.clear()
    s = Scheduler(
        llm.model, llm.tokenizer, llm.engine.eos_token_ids, max_len=64, decode=llm.engine.decode_step()
    )
    s.submit(Request([[5, 6, 7]], [params], emit=lambda ev: None))
    while not s.idle:
        s.step()
    assert fused_calls == [1, 1, 1]


@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("int8", torch.int8)])
def test_a_kv_cache_dtype_reaches_generate_serve_and_speculative(
    name, dtype, tiny_hf_dir, native_lib, fused_calls, monkeypatch
):
    """`load(kv_cache_dtype="bf16"/"int8")`: the engine's, the server's and speculative decoding's
    caches are of that dtype under the fp32 model, and the server answers as the engine does."""
    from weightsmith.generate import TokenGenerator
    from weightsmith.speculative import speculative_generate

    llm = weightsmith.load(tiny_hf_dir, kv_cache_dtype=name)
    assert llm.engine.kv_dtype == dtype and llm.model.model.embed_tokens.weight.dtype == torch.float32
    made = []
    original = TokenGenerator.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self.cache.k.dtype)

    monkeypatch.setattr(TokenGenerator, "__init__", spy)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.engine.generate([[5, 6, 7]], params)[0].token_ids
    assert made == [dtype] and fused_calls
    s = Scheduler(
        llm.model, llm.tokenizer, llm.engine.eos_token_ids, max_len=64, decode=llm.engine.decode_step(),
        kv_dtype=llm.engine.kv_dtype,
    )  # fmt: skip
    assert s.cache.k.dtype == dtype
    got: list[int] = []
    s.submit(Request([[5, 6, 7]], [params], emit=lambda ev: got.extend(ev.tokens)))
    while not s.idle:
        s.step()
    assert got == alone
    spec = speculative_generate(llm.model, llm.model, [5, 6, 7], max_tokens=6, k=2, kv_dtype=dtype)
    assert spec.tokens == alone
    fp32 = weightsmith.load(tiny_hf_dir).engine
    assert fp32.kv_dtype is None


def test_speculative_drafts_take_the_c_step(tiny_hf_dir, native_lib, fused_calls):
    from weightsmith.speculative import speculative_generate

    llm = weightsmith.load(tiny_hf_dir)
    prompt = [5, 17, 42, 9]
    plain = speculative_generate(llm.model, llm.model, prompt, max_tokens=8, k=3)
    assert fused_calls == []  # the default draft step is the eager one
    res = speculative_generate(
        llm.model, llm.model, prompt, max_tokens=8, k=3, draft_step=llm.engine.decode_step()
    )
    assert fused_calls and set(fused_calls) == {1}  # the draft's one-token steps
    assert res.tokens == plain.tokens


def test_an_int8_kv_cache_refuses_compile_in_one_line(tiny_hf_dir):
    from weightsmith.errors import UsageError

    llm = weightsmith.load(tiny_hf_dir, kv_cache_dtype="int8")
    llm.engine.compile = True
    with pytest.raises(UsageError, match="int8 decodes with the eager or C step; drop --compile"):
        llm.engine.decode_step()
