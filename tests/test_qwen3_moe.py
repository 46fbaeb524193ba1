"""Qwen3-MoE through every path after loading (logit parity is in test_model_parity.py): saving an
HF directory transformers loads; PEFT adapters on the attention both ways and ours on the experts
through our own files (expert adapters with PEFT, as `target_parameters`: test_moe_peft.py); weight-only quantization with the router left in float; GGUF export as llama.cpp's
qwen3moe (and Mixtral as llama with experts), read back by our loader and by transformers'; the
CPU decode plan's fallback; and the settings that are refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_plan_decodes_like_forward, kernels_on, save_perturbed_hf
from safetensors.torch import load_file
from test_lora import hf_model, ids, ours, peft_warnings, randomize_adapters

from weightsmith.checkpoint.gguf import read_gguf
from weightsmith.checkpoint.gguf_write import export_gguf
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.save import save_hf_dir
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from weightsmith.lora.layers import row_adapters
from weightsmith.models import ModelConfig
from weightsmith.quant.weight_only import quantizable_modules, quantize_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16)
SHAPE.update(
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False
)
SHAPE.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)


def _source(path: Path, cls=transformers.Qwen3MoeConfig, **extra) -> Path:
    """A tiny random checkpoint saved by transformers, norms perturbed so they count."""
    return save_perturbed_hf(path, cls(**{**SHAPE, **extra}))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return _source(tmp_path_factory.mktemp("qwen3moe"), **MOE)


def _logits(model, seq: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids() if seq is None else seq)
    return getattr(out, "logits", out)


# ---- HF directories ------------------------------------------------------------------------


def test_saved_directory_is_the_checkpoint_transformers_wrote(qwen_dir, tmp_path):
    ckpt = load_checkpoint(qwen_dir)
    save_hf_dir(ckpt.model, ckpt.tokenizer, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(qwen_dir / "model.safetensors")
    assert (
        "model.layers.1.mlp.experts.3.down_proj.weight" in saved and "model.layers.0.mlp.gate.weight" in saved
    )
    assert set(saved) == set(theirs) and all(torch.equal(saved[k], theirs[k]) for k in theirs)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        written["num_experts"] == 4 and written["moe_intermediate_size"] == 32 and written["norm_topk_prob"]
    )
    hf = hf_model(tmp_path / "out")
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.num_local_experts == 4
    assert (_logits(hf) - _logits(ckpt.model)).abs().max().item() <= 1e-4


def test_dense_layers_and_window_survive_a_save(tmp_path):
    src = _source(tmp_path / "src", **{**MOE, "norm_topk_prob": False, "mlp_only_layers": [0]},
                  use_sliding_window=True, sliding_window=5)  # fmt: skip
    ckpt = load_checkpoint(src)
    assert ckpt.config.mlp_only_layers == [0] and not ckpt.config.norm_topk_prob
    assert ckpt.config.layer_types == ["sliding_attention"] * 2
    save_hf_dir(ckpt.model, ckpt.tokenizer, tmp_path / "out")
    hf = hf_model(tmp_path / "out")
    assert hf.config.mlp_only_layers == [0] and hf.config.sliding_window == 5
    assert (_logits(hf, ids(t=14)) - _logits(ckpt.model, ids(t=14))).abs().max().item() <= 1e-4


# ---- adapters ------------------------------------------------------------------------------

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_our_attention_adapter_loads_in_peft(qwen_dir, tmp_path):
    model = ours(qwen_dir)
    cfg = LoraConfig(r=4, alpha=8, target_modules=ATTENTION)
    apply_lora(model, cfg)
    randomize_adapters(model.named_parameters())
    save_adapter(model, tmp_path, cfg, base_model=str(qwen_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf_model(qwen_dir), tmp_path).eval()
    assert peft_warnings(caught) == []
    ref = _logits(peft_model)
    with peft_model.disable_adapter():
        base = _logits(peft_model)
    assert (_logits(model) - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter matters


def test_peft_attention_adapter_loads_in_ours_and_saves_back_unchanged(qwen_dir, tmp_path):
    peft_model = peft.get_peft_model(
        hf_model(qwen_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION[1:], task_type="CAUSAL_LM"),
    )
    randomize_adapters(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path / "peft")
    model = ours(qwen_dir)
    cfg = load_adapter(model, tmp_path / "peft")
    assert (_logits(model) - _logits(peft_model.eval())).abs().max().item() <= 1e-4
    save_adapter(model, tmp_path / "back", cfg)
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_expert_adapters_round_trip_through_our_files_and_are_not_served_per_row(qwen_dir, tmp_path):
    model = ours(qwen_dir)
    cfg = LoraConfig(r=4, alpha=8)
    wrapped = apply_lora(model, cfg)
    assert "model.layers.1.mlp.experts.3.gate_proj" in wrapped
    assert "model.layers.0.mlp.gate" in wrapped  # the router too, as PEFT's all-linear on transformers 5
    randomize_adapters(model.named_parameters())
    save_adapter(model, tmp_path, cfg)
    fresh = ours(qwen_dir)
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh), _logits(model))
    with pytest.raises(ConfigError, match="mixture of experts"), row_adapters(model, ["default", None]):
        pass


# ---- quantization, decoding ----------------------------------------------------------------


def test_weight_only_int8_leaves_the_router_in_float(qwen_dir):
    model = ours(qwen_dir)
    names = quantizable_modules(model)
    assert "model.layers.0.mlp.experts.2.up_proj" in names and "model.layers.0.mlp.gate" not in names
    ref = _logits(model)
    quantize_model(model, 8)
    got = _logits(model)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_cpu_decode_plan_takes_the_c_step(qwen_dir, native_lib, monkeypatch):
    """Experts and QK-norm in the C step (tests/test_cpu_decode.py: dense layers among them,
    quantized and bf16 experts)."""
    kernels_on(monkeypatch, True)
    model = load_checkpoint(qwen_dir).model
    seq = ids(t=14)[:1]
    assert_plan_decodes_like_forward(model, seq, fused=True)


# ---- GGUF ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "quant", "tol"), [("qwen3", "f32", 1e-5), ("qwen3", "q8_0", 0.05), ("mixtral", "f32", 1e-5)]
)
def test_gguf_export_reads_back(family, quant, tol, qwen_dir, tmp_path):
    if family == "mixtral":
        src = load_checkpoint(
            _source(
                tmp_path / "mixtral", transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2
            )
        )
    else:
        src = load_checkpoint(qwen_dir)
    out = export_gguf(src, tmp_path / "m.gguf", quant)
    assert out["architecture"] == {"qwen3": "qwen3moe", "mixtral": "llama"}[family]
    info = read_gguf(tmp_path / "m.gguf")
    assert info.config["num_local_experts"] == 4 and info.config["num_experts_per_tok"] == 2
    back = load_checkpoint(tmp_path / "m.gguf")
    assert back.config.model_type == src.config.model_type
    assert back.config.moe_intermediate_size == src.config.moe_intermediate_size
    ref = _logits(src.model)
    assert (_logits(back.model) - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def test_transformers_reads_our_qwen3moe_export(tmp_path):
    """transformers' GGUF loader does not read expert_feed_forward_length (it keeps its default
    expert width, 768), so the source model has that width."""
    src = load_checkpoint(_source(tmp_path / "src", **{**MOE, "moe_intermediate_size": 768}))
    export_gguf(src, tmp_path / "m.gguf", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert (_logits(hf.eval()) - _logits(src.model)).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(norm_topk_prob=False), "norm_topk_prob false cannot be exported"),
        (dict(mlp_only_layers=[1]), r"layers \[1\] have a dense MLP"),
        (dict(decoder_sparse_step=2), r"layers \[0\] have a dense MLP"),
    ],
)
def test_gguf_export_refuses_what_llama_cpp_computes_differently(extra, message, tmp_path):
    src = _source(tmp_path / "src", **{**MOE, **extra})
    with pytest.raises(CheckpointError, match=message):
        export_gguf(src, tmp_path / "out" / "m.gguf", "f16")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(mlp_only_layers=[5]), r"mlp_only_layers \[5\] must list layer indices below"),
        (dict(mlp_only_layers="all"), "field 'mlp_only_layers' must be a list"),
        (dict(moe_intermediate_size=None), "field 'moe_intermediate_size' must be an integer of at least 1"),
        (dict(decoder_sparse_step=0), "field 'decoder_sparse_step' must be an integer of at least 1"),
        (
            dict(num_experts_per_tok=5),
            r"num_experts_per_tok \(5\) must be between 1 and num_local_experts \(4\)",
        ),
    ],
)
def test_bad_moe_fields_are_refused_in_one_line(change, message, qwen_dir):
    data = json.loads((qwen_dir / "config.json").read_text())
    data.pop("num_local_experts", None)
    with pytest.raises(ConfigError, match=f"q.json: {message}"):
        ModelConfig.from_hf({**data, "num_experts": 4, **change}, source="q.json")
