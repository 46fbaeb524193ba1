"""Qwen3, Phi-3, Gemma 2, Gemma 3, SmolLM3 and OLMo 2 through every path after loading: PEFT adapters both ways (Phi-3's
keep its fused `qkv_proj`/`gate_up_proj` names), saving an HF directory transformers loads (also
with a merged adapter), weight-only quantization (and its folder reloaded), and the CPU decode
plan's C step. Tiny random models built in the test."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_plan_decodes_like_forward, build_tiny_tokenizer_dir, kernels_on
from safetensors.torch import load_file
from test_lora import SMALL, hf_model, ids, ours, peft_warnings, randomize_adapters

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.quantized import save_quantized
from weightsmith.checkpoint.save import save_hf_dir
from weightsmith.lora import LoraConfig, apply_lora, load_adapter, lora_layers, merge_and_unload, save_adapter
from weightsmith.quant.weight_only import quantize_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = {
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=False)),
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            head_dim=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"], pad_token_id=0
        ),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            sliding_window=5,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=3.0,
            pad_token_id=0,
        ),
    ),
    # Phi-3.5 / Phi-4-mini's RoPE: half of each head, LongRoPE (factors per rotary frequency).
    "phi3-longrope": (
        transformers.Phi3Config,
        dict(
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            original_max_position_embeddings=32,
            partial_rotary_factor=0.5,
            rope_scaling={"type": "longrope", "long_factor": [1.0, 3.0, 5.0, 9.0], "short_factor": [1.0] * 4},
        ),
    ),
    "olmo2": (transformers.Olmo2Config, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "smollm3": (
        transformers.SmolLM3Config,
        dict(no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny random checkpoint per family; norms perturbed so they count."""
    dirs = {}
    for name, (cls, extra) in FAMILIES.items():
        path = tmp_path_factory.mktemp(name)
        build_tiny_tokenizer_dir(path)
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cls(**{**SMALL, **extra}))
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
        hf.save_pretrained(path)
        dirs[name] = path
    return dirs


# ---- PEFT ---------------------------------------------------------------------------------

OURS_TO_PEFT = {
    "qwen3-all-linear": ("qwen3", LoraConfig(r=4, alpha=8)),
    "gemma3-all-linear": ("gemma3", LoraConfig(r=4, alpha=8)),
    "gemma2-all-linear": ("gemma2", LoraConfig(r=4, alpha=8)),
    "smollm3-all-linear": ("smollm3", LoraConfig(r=4, alpha=8)),
    "olmo2-all-linear": ("olmo2", LoraConfig(r=4, alpha=8)),
    # Trained apart, q/k/v become one rank-12 qkv_proj (block-diagonal B) with its own alpha.
    "phi3-all-linear": ("phi3", LoraConfig(r=4, alpha=8)),
    # Only some parts of the fused projections, other ranks and rsLoRA scaling, one layer.
    "phi3-parts": (
        "phi3",
        LoraConfig(
            r=4, alpha=6, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"], use_rslora=True,
            rank_pattern={"v_proj": 2}, layers_to_transform=[1],
        ),
    ),
    "phi3-regex": ("phi3", LoraConfig(r=2, alpha=4, target_modules=r".*layers\.0\.self_attn\.(k|v)_proj")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OURS_TO_PEFT))
def test_our_adapter_loads_in_peft_with_same_logits(case, family_dirs, tmp_path):
    family, cfg = OURS_TO_PEFT[case]
    model = ours(family_dirs[family])
    apply_lora(model, cfg)
    randomize_adapters(model.named_parameters())
    save_adapter(model, tmp_path, cfg, base_model=str(family_dirs[family]))
    if family == "phi3":  # the file has Phi-3's own module names
        keys = set(load_file(tmp_path / "adapter_model.safetensors"))
        assert not any(
            p in k for k in keys for p in (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")
        )
        assert any(".qkv_proj." in k for k in keys) and any(".gate_up_proj." in k for k in keys) != (
            case == "phi3-regex"
        )

    hf = hf_model(family_dirs[family])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert peft_warnings(caught) == []
    with torch.no_grad():
        got, ref = model(ids()), peft_model(ids()).logits
        with peft_model.disable_adapter():
            base = peft_model(ids()).logits
    assert (got - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter matters

    fresh = ours(family_dirs[family])  # and back into ours from the fused file
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert (fresh(ids()) - got).abs().max().item() <= 1e-5


PEFT_TO_OURS = {
    "phi3-fused": ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])),
    "phi3-patterns": (
        "phi3",
        dict(
            target_modules=["qkv_proj", "down_proj"],
            rank_pattern={"qkv_proj": 6},
            alpha_pattern={"down_proj": 3.0},
        ),
    ),
    "phi3-regex": ("phi3", dict(target_modules=r".*\.layers\.1\.(self_attn\.qkv_proj|mlp\.gate_up_proj)")),
    "qwen3": ("qwen3", dict(target_modules="all-linear")),
    "gemma3": ("gemma3", dict(target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True)),
    "gemma2": ("gemma2", dict(target_modules="all-linear")),
}


@pytest.mark.parametrize("case", list(PEFT_TO_OURS))
def test_peft_adapter_loads_in_ours_and_saves_back_unchanged(case, family_dirs, tmp_path):
    family, kwargs = PEFT_TO_OURS[case]
    peft_model = peft.get_peft_model(
        hf_model(family_dirs[family]), peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **kwargs)
    )
    randomize_adapters(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path / "peft")

    model = ours(family_dirs[family])
    load_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        ref = peft_model.eval()(ids()).logits
        got = model(ids())
    assert (got - ref).abs().max().item() <= 1e-4
    if case == "phi3-patterns":
        layer = lora_layers(model)["model.layers.0.self_attn.k_proj"]
        assert layer.lora_A["default"].out_features == 6 and layer.scaling["default"] == 8 / 6

    cfg = load_adapter(ours(family_dirs[family]), tmp_path / "peft")
    save_adapter(model, tmp_path / "back", cfg)  # an untouched PEFT adapter is written as it came
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


# ---- saving, quantizing, decoding -----------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_directory_loads_in_transformers(family, family_dirs, tmp_path):
    ckpt = load_checkpoint(family_dirs[family])
    save_hf_dir(ckpt.model, ckpt.tokenizer, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(family_dirs[family] / "model.safetensors")
    assert set(saved) == set(theirs)  # Phi-3's fused tensors stacked back, Gemma's tied head once
    assert all(torch.equal(saved[k], theirs[k]) for k in theirs)
    hf = hf_model(tmp_path / "out")
    assert type(hf).__name__ == ckpt.config.architecture
    with torch.no_grad():  # 40 tokens: past LongRoPE's original 32 too
        for x in (ids(), ids(t=40)):
            assert (hf(x).logits - ckpt.model(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma2"])
def test_merged_adapter_saves_a_directory_transformers_runs(family, family_dirs, tmp_path):
    """LoRA merged into the base (Phi-3's parts stacked back into qkv_proj/gate_up_proj on save)."""
    ckpt = load_checkpoint(family_dirs[family], decode_layout=False)
    apply_lora(ckpt.model, LoraConfig(r=4, alpha=8))
    randomize_adapters(ckpt.model.named_parameters())
    with torch.no_grad():
        adapted = ckpt.model(ids())
    merge_and_unload(ckpt.model)
    save_hf_dir(ckpt.model, ckpt.tokenizer, tmp_path / "merged")
    with torch.no_grad():
        got = hf_model(tmp_path / "merged")(ids()).logits
        base = hf_model(family_dirs[family])(ids()).logits
    assert (got - adapted).abs().max().item() <= 1e-4
    assert (got - base).abs().max().item() > 1e-2  # the merge changed the weights


@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_int4_folder_reloads_exactly(family, family_dirs, tmp_path):
    ckpt = load_checkpoint(family_dirs[family], decode_layout=False)
    quantize_model(ckpt.model, 4, 32)
    save_quantized(ckpt.model, ckpt.tokenizer, tmp_path / "int4")
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "int4").model(ids()), ckpt.model(ids()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weight_only_int8_stays_close(family, family_dirs):
    model = ours(family_dirs[family])
    with torch.no_grad():
        ref = model(ids())
        quantize_model(model, 8)
        got = model(ids())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cpu_decode_plan_takes_the_c_step(family, family_dirs, native_lib, monkeypatch):
    """Every family here runs the fused C step (QK-norm, Gemma's and OLMo 2's norms, layers without
    RoPE, Gemma 3's local RoPE tables, Gemma 2's caps, partial rotary): the decoded logits are
    those of a full forward."""
    kernels_on(monkeypatch, True)
    model = load_checkpoint(family_dirs[family]).model
    seq = ids(t=14)[:1]
    assert_plan_decodes_like_forward(model, seq, fused=True)


def test_configs_that_would_compute_something_else_are_refused(family_dirs, tmp_path):
    from weightsmith.errors import ConfigError
    from weightsmith.models import ModelConfig

    base = json.loads((family_dirs["phi3"] / "config.json").read_text())
    llama = {**base, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5 is not supported for LlamaForCausalLM"):
        ModelConfig.from_hf({**llama, "partial_rotary_factor": 0.5}, source="l.json")
    with pytest.raises(ConfigError, match="partial_rotary_factor must be a number in"):
        ModelConfig.from_hf({**base, "partial_rotary_factor": 1.5}, source="phi")
    longrope = json.loads((family_dirs["phi3-longrope"] / "config.json").read_text())
    params = {**longrope["rope_parameters"], "long_factor": [1.0, 2.0]}
    with pytest.raises(ConfigError, match="rope_scaling long_factor must list 4 positive numbers"):
        ModelConfig.from_hf({**longrope, "rope_parameters": params}, source="phi")
    # A hostile original context (its log divides the attention factor) or attention factor.
    for key, value in (("original_max_position_embeddings", 1), ("attention_factor", "big")):
        params = {**longrope["rope_parameters"], key: value}
        with pytest.raises(ConfigError, match=f"phi: rope_scaling {key} must be"):
            ModelConfig.from_hf({**longrope, "rope_parameters": params}, source="phi")
    gemma = json.loads((family_dirs["gemma3"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        ModelConfig.from_hf({**gemma, "use_bidirectional_attention": True}, source="g.json")
    with pytest.raises(ConfigError, match="model_type 'qwen2_moe' is not supported"):  # a shared expert
        ModelConfig.from_hf({**base, "model_type": "qwen2_moe"}, source="q.json")


def test_info_names_the_layers_without_rope(family_dirs):
    from weightsmith.checkpoint.describe import inspect_checkpoint

    assert inspect_checkpoint(family_dirs["smollm3"])["rope"] == "theta 2e+06, none on 1 of 2 layers"
    assert inspect_checkpoint(family_dirs["qwen3"])["rope"].startswith("theta ")
    assert "none on" not in inspect_checkpoint(family_dirs["qwen3"])["rope"]
