"""Parity with transformers: tiny random models of each family, built in the test,
must give the same logits and the same greedy tokens in weightsmith."""

from __future__ import annotations

import pytest
import torch

from weightsmith.checkpoint.load import build_model
from weightsmith.generate import TokenGenerator
from weightsmith.models import ModelConfig
from weightsmith.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

QWEN3_MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40)
PHI3_LONGROPE = dict(
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=128,
    original_max_position_embeddings=32,
    partial_rotary_factor=0.5,
    rope_scaling={
        "type": "longrope",
        "long_factor": [1.0, 2.5, 4.0, 9.0],
        "short_factor": [1.0, 1.1, 1.3, 1.7],
    },
)
#: gpt-oss's YaRN (transformers' config default) over a short original context, so that the ramp
#: bends the frequencies a short test sequence uses.
GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 64,
}
#: A tiny gpt-oss's experts and heads (test_family_gguf.py, test_cpu_decode.py take them too).
GPT_OSS = dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama3-rope": (
        transformers.LlamaConfig,
        dict(
            rope_theta=500000.0,
            max_position_embeddings=512,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-linear-rope": (
        transformers.LlamaConfig,
        dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "llama-yarn-rope": (
        transformers.LlamaConfig,
        dict(
            max_position_embeddings=512,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        ),
    ),
    "mistral-sliding": (transformers.MistralConfig, dict(sliding_window=7, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "mixtral": (
        transformers.MixtralConfig,
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    ),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "qwen3-bias": (transformers.Qwen3Config, dict(head_dim=16, attention_bias=True)),
    # Qwen3-MoE: experts narrower than the dense MLP; top-k weights renormalised or not; a dense
    # layer among sparse ones (mlp_only_layers); a window on every layer.
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(head_dim=16, **QWEN3_MOE, norm_topk_prob=True)),
    "qwen3-moe-dense-layer": (
        transformers.Qwen3MoeConfig,
        dict(head_dim=16, **QWEN3_MOE, norm_topk_prob=False, mlp_only_layers=[1]),
    ),
    "qwen3-moe-sliding": (
        transformers.Qwen3MoeConfig,
        dict(
            **QWEN3_MOE, norm_topk_prob=True, use_sliding_window=True, sliding_window=7, decoder_sparse_step=2
        ),
    ),
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi3-sliding": (transformers.Phi3Config, dict(sliding_window=9, pad_token_id=0)),
    # Phi-3.5 / Phi-4-mini: RoPE on half of each head, LongRoPE's short factors up to 32 positions
    # and its long ones past them (40-token logits; generation crosses over).
    "phi3-longrope": (transformers.Phi3Config, dict(PHI3_LONGROPE)),
    # Gemma 3: sliding layers (window 7, shorter than every test sequence) with their own RoPE
    # base around a global one; a query scale other than head_dim; tied embedding (as shipped).
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            head_dim=16,
            sliding_window=7,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=12,
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
    "gemma3-softcap": (
        transformers.Gemma3TextConfig,
        dict(head_dim=16, sliding_window=5, final_logit_softcapping=2.0, rope_scaling=None, pad_token_id=0),
    ),
    # Gemma 2: every other layer slides (window 7); attention scores capped. The query scale of 1
    # (query_pre_attn_scalar is an integer) and the cap of 0.3 put random weights' scores where
    # tanh bends: the logits move by ~0.02 without the cap, 200x the tolerance below.
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            sliding_window=7,
            query_pre_attn_scalar=1,
            attn_logit_softcapping=0.3,
            final_logit_softcapping=3.0,
            pad_token_id=0,
        ),
    ),
    # OLMo 2: norms after attention and MLP only (perturbed like every norm here), QK-norm over
    # all heads at once.
    "olmo2": (
        transformers.Olmo2Config,
        dict(rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    # SmolLM3: a layer without RoPE every 2nd (of 3: the middle one), GQA, tied embedding.
    "smollm3": (
        transformers.SmolLM3Config,
        dict(no_rope_layer_interval=2, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    # gpt-oss: sinks, biased attention and experts, the clamped SwiGLU (limit 1.5: random weights'
    # gate and up values pass it), every other layer sliding (window 7), YaRN over a short
    # original context so the ramp bends the frequencies used.
    "gpt-oss": (
        transformers.GptOssConfig,
        dict(
            **GPT_OSS,
            sliding_window=7,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            swiglu_limit=1.5,
            rope_parameters=GPT_OSS_ROPE,
            pad_token_id=0,
        ),
    ),
}
#: The families added after the first four (issue 21 and later), run through every test below.
NEW_FAMILIES = ["qwen3", "phi3", "gemma3", "qwen3-moe", "gemma2", "smollm3", "olmo2", "gpt-oss"]


def make_pair(name: str, seed: int = 0):
    """A random HF model and our model holding the same weights (through config.json)."""
    cls, extra = FAMILIES[name]
    hf_cfg = cls(**{**BASE, **extra})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are tested too.
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n and n.endswith(".weight") or n.endswith((".bias", "_bias")):
                p.add_(torch.randn_like(p) * 0.1)
            if n.endswith(".sinks"):  # gpt-oss: initialised near 0, where a sink already counts
                p.add_(torch.randn_like(p) * 2)
    import json

    cfg = ModelConfig.from_hf(json.loads(hf_cfg.to_json_string()), source=name)
    ours = build_model(cfg, _hf_disk_state(hf), "cpu", torch.float32)
    return hf, ours


def _hf_disk_state(hf):
    """Tensors under the names HF writes to disk (save_pretrained's reverse conversion)."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        tensors = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            tensors.update(load_file(f))
    return [(n, t, "hf") for n, t in tensors.items()]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name):
    hf, ours = make_pair(name)
    torch.manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 40, BASE["vocab_size"])
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "name", ["llama", "mistral-sliding", "qwen2", "mixtral", "llama3-rope", "phi3-longrope", *NEW_FAMILIES]
)
def test_greedy_generation_matches_transformers(name):
    hf, ours = make_pair(name, seed=3)
    prompt = [5, 17, 42, 9, 100, 3, 77]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt):].tolist()  # fmt: skip
    gen = TokenGenerator(ours, [prompt], [SamplingParams(max_tokens=32, temperature=0)], eos_token_ids=set())
    for _ in gen:
        pass
    assert gen.generated[0] == ref


@pytest.mark.parametrize("name", ["llama", "mistral-sliding", "mixtral", "phi3-longrope", *NEW_FAMILIES])
def test_kv_cache_decoding_equals_full_recompute(name):
    """Logits from prefill + one-token decode steps equal a full forward over the sequence."""
    from weightsmith.generate import decode_one_token, prefill
    from weightsmith.kv_cache import KVCache

    _, ours = make_pair(name, seed=5)
    torch.manual_seed(2)
    seq = torch.randint(0, BASE["vocab_size"], (1, 30))
    full = ours(seq)[0]  # (T, V)
    cache = KVCache.for_model(ours.config, 1, 64, dtype=torch.float32, device="cpu")
    step_logits = [prefill(ours, cache, [seq[0, :10].tolist()], torch.device("cpu"))[0]]
    for t in range(10, 30):
        step_logits.append(decode_one_token(ours, cache, [int(seq[0, t])], torch.device("cpu"))[0])
    got = torch.stack(step_logits[:-1])
    assert (got - full[9:29]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "mistral-sliding", "qwen2", *NEW_FAMILIES])
def test_batched_generation_equals_one_by_one(name):
    _, ours = make_pair(name, seed=7)
    prompts = [[1, 2, 3], list(range(10, 31)), [50, 60, 70, 80, 90, 11, 12, 13], [4]]
    params = [
        SamplingParams(max_tokens=20, temperature=0),
        SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=11),
        SamplingParams(max_tokens=25, temperature=1.2, top_p=0.8, seed=3),
        SamplingParams(max_tokens=16, temperature=0.7, min_p=0.05, repetition_penalty=1.3, seed=5),
    ]
    batch = TokenGenerator(ours, prompts, params, eos_token_ids={7})
    for _ in batch:
        pass
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        alone = TokenGenerator(ours, [p], [sp], eos_token_ids={7})
        for _ in alone:
            pass
        assert alone.generated[0] == batch.generated[i], f"row {i}"
        assert alone.finished[0] == batch.finished[i]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    hf, ours = make_pair("llama")
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    half = build_model(ours.config, [(n, p.detach(), "x") for n, p in ours.named_parameters()], "cpu", dtype)
    with torch.no_grad():
        ref = hf(ids).logits
        got = half(ids).float()
    assert got.dtype == torch.float32 and half.lm_head.weight.dtype == dtype
    assert (got - ref).abs().max().item() < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_gpt_oss_decodes_through_the_cpu_layout_and_the_c_step(native_lib):
    """The CPU decode layout (packed q/k/v, split matmuls) and the fused C step keep gpt-oss's
    sinks and biased, clamped experts: decoding gives transformers' logits."""
    from weightsmith.cpu_decode import prepare_cpu_decode
    from weightsmith.cpu_decode.fused import FusedStep
    from weightsmith.generate import decode_one_token, prefill
    from weightsmith.kv_cache import KVCache

    hf, ours = make_pair("gpt-oss", seed=4)
    plan = prepare_cpu_decode(ours, splits=2)
    step = plan.decode_step(decode_one_token)
    assert isinstance(step, FusedStep)
    torch.manual_seed(3)
    seq = torch.randint(0, BASE["vocab_size"], (1, 24))
    with torch.no_grad():
        ref = hf(seq).logits[0]
    cache = KVCache.for_model(ours.config, 1, 32, dtype=torch.float32, device="cpu")
    got = [prefill(ours, cache, [seq[0, :9].tolist()], torch.device("cpu"))[0]]
    for t in range(9, 23):
        got.append(step(ours, cache, [int(seq[0, t])], torch.device("cpu"))[0])
    assert (torch.stack(got) - ref[8:23]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_config_counts_the_models_parameters(name):
    """`info`'s parameter count (from config.json alone) is the built model's."""
    _, ours = make_pair(name)
    assert ours.config.num_parameters() == sum(p.numel() for p in ours.parameters())
