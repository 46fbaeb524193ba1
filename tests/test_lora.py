"""LoRA: PEFT parity both ways (tiny random models built in the test), merge/unmerge,
disabling, freezing, targeting rules and errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_hf_dir, build_tiny_tokenizer_dir
from safetensors.torch import load_file, save_file
from torch import nn

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.lora import (
    LoraConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
SMALL.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
}
LLAMA_SUFFIXES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny random checkpoint per family; norms and biases perturbed so they count."""
    dirs = {}
    for name, (cls, extra) in FAMILIES.items():
        path = tmp_path_factory.mktemp(name)
        build_tiny_tokenizer_dir(path)
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(cls(**SMALL, **extra))
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("norm.weight") or n.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        hf.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_dir(tmp_path_factory.mktemp("lora") / "tiny-llama", **SMALL)


def ours(path: Path) -> nn.Module:
    return load_checkpoint(path, device=torch.device("cpu"), dtype=torch.float32).model


def hf_model(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def ids(seed: int = 1, t: int = 12) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (2, t), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(params, seed: int = 3) -> None:
    """Non-zero B (and A) so the adapter's delta shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in params:
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "/peft/" in w.filename.replace("\\", "/")]


# ---- parity with PEFT --------------------------------------------------------------------

OURS_TO_PEFT = {
    "llama-all-linear": ("llama", LoraConfig(r=4, alpha=8)),
    "llama-tied-all-linear": ("llama-tied", LoraConfig(r=4, alpha=8)),
    "qwen2-all-linear": ("qwen2", LoraConfig(r=4, alpha=8)),
    "llama-patterns-layers": (
        "llama",
        LoraConfig(
            r=4, alpha=8, target_modules=["q_proj", "self_attn.v_proj", "down_proj"], use_rslora=True,
            rank_pattern={"v_proj": 2}, alpha_pattern={r"mlp\.down_proj": 3.0}, layers_to_transform=[1],
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OURS_TO_PEFT))
def test_our_adapter_loads_in_peft_with_same_logits(case, family_dirs, tmp_path):
    family, cfg = OURS_TO_PEFT[case]
    model = ours(family_dirs[family])
    wrapped = apply_lora(model, cfg)
    randomize_adapters(model.named_parameters())
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(family_dirs[family]))

    hf = hf_model(family_dirs[family])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert peft_warnings(caught) == []
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()}
    peft_wrapped = {n for n in peft_wrapped if n.endswith("_proj") and n + ".lora_A" in peft_wrapped}
    assert peft_wrapped == set(wrapped)
    with torch.no_grad():
        got, ref = model(ids()), peft_model(ids()).logits
        with peft_model.disable_adapter():
            base = peft_model(ids()).logits
    assert (got - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter matters


def test_written_config_has_peft_schema_and_resolved_targets(llama_dir, tmp_path):
    model = ours(llama_dir)
    cfg = LoraConfig(r=4, alpha=8)
    apply_lora(model, cfg)
    save_adapter(model, tmp_path, cfg, base_model="tiny")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    expected_keys = set(peft.LoraConfig().to_dict()) - {"runtime_config"}
    assert set(written) == expected_keys
    assert written["target_modules"] == LLAMA_SUFFIXES
    assert (written["peft_type"], written["task_type"], written["r"], written["lora_alpha"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        8,
    )
    assert written["base_model_name_or_path"] == "tiny"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors.values())
    assert LoraConfig.from_peft_dict(written, "x") == LoraConfig(r=4, alpha=8, target_modules=LLAMA_SUFFIXES)


PEFT_TO_OURS = {
    "list-rslora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "patterns": dict(
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"o_proj": 3.0},
    ),
    "all-linear": dict(target_modules="all-linear"),
}


@pytest.mark.parametrize("case", list(PEFT_TO_OURS))
def test_peft_adapter_loads_in_ours_with_same_logits(case, llama_dir, tmp_path):
    hf = hf_model(llama_dir)
    lc = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **PEFT_TO_OURS[case])
    peft_model = peft.get_peft_model(hf, lc)
    randomize_adapters(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)

    model = ours(llama_dir)
    cfg = load_adapter(model, tmp_path)
    assert cfg.r == 4 and cfg.alpha == 8
    with torch.no_grad():
        ref = peft_model.eval()(ids()).logits
        got = model(ids())
    assert (got - ref).abs().max().item() <= 1e-4
    if case == "patterns":
        layers = lora_layers(model)
        assert layers["model.layers.1.self_attn.q_proj"].lora_A["default"].out_features == 6
        assert layers["model.layers.0.self_attn.q_proj"].lora_A["default"].out_features == 4
        assert layers["model.layers.0.self_attn.o_proj"].scaling["default"] == 3.0 / 4


def test_adapter_round_trips_through_our_files(family_dirs, tmp_path):
    """Mixtral's experts and router are written as PEFT's target_parameters (test_moe_peft.py)."""
    model = ours(family_dirs["mixtral"])
    cfg = LoraConfig(r=4, alpha=8)
    wrapped = apply_lora(model, cfg)
    assert "model.layers.0.block_sparse_moe.experts.3.w2" in wrapped
    assert "model.layers.0.block_sparse_moe.gate" in wrapped  # the router too, as PEFT's all-linear
    randomize_adapters(model.named_parameters())
    save_adapter(model, tmp_path, cfg)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert written["target_parameters"] == ["down_proj", "gate.weight", "gate_up_proj"]
    fresh = ours(family_dirs["mixtral"])
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids()), model(ids()))


# ---- merge, disable, freeze ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_merge_equals_unmerged_and_unmerge_restores(family, family_dirs):
    model = ours(family_dirs[family])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=8))
    randomize_adapters(model.named_parameters())
    with torch.no_grad():
        unmerged = model(ids())
        merge_adapter(model, "default")
        merged = model(ids())
        decode = model(ids(t=1))  # a decode-sized input (the split matmul path)
        assert (merged - unmerged).abs().max().item() <= 1e-5
        unmerge_adapter(model, "default")
        for name, p in model.state_dict().items():
            if "lora_" not in name:
                torch.testing.assert_close(p, base_state[name.replace(".base_layer", "")], atol=1e-6, rtol=0)
        merge_and_unload(model)
        assert list(model.state_dict()) == list(base_state)
        assert not lora_layers(model)
        assert (model(ids()) - unmerged).abs().max().item() <= 1e-5
        assert (model(ids(t=1)) - decode).abs().max().item() <= 1e-5


def test_adapters_disabled_gives_exact_base_logits(family_dirs):
    model = ours(family_dirs["qwen2"])
    with torch.no_grad():
        base = model(ids())
        apply_lora(model, LoraConfig(r=4, alpha=8))
        randomize_adapters(model.named_parameters())
        adapted = model(ids())
        with adapters_disabled(model):
            assert torch.equal(model(ids()), base)
        assert torch.equal(model(ids()), adapted)
        set_adapter(model, None)
        assert torch.equal(model(ids()), base)
        set_adapter(model, "default")
        assert torch.equal(model(ids()), adapted)
    assert not torch.equal(adapted, base)


def test_fresh_adapter_changes_nothing_and_trains_only_lora(llama_dir):
    model = ours(llama_dir)
    with torch.no_grad():
        base = model(ids())
    wrapped = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids()), base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(wrapped) == 2 * 2 * 7
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    model.train()
    model(ids()).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in lora_layers(model).values())


def test_adapter_follows_the_models_train_eval_mode(llama_dir):
    model = ours(llama_dir)  # loaded in eval mode
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5))
    randomize_adapters(model.named_parameters())
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids()), model(ids()))  # no dropout in eval
        model.train()
        assert not torch.equal(model(ids()), model(ids()))


def test_half_precision_base_keeps_fp32_adapter(llama_dir):
    model = load_checkpoint(llama_dir, dtype=torch.bfloat16).model
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = model(ids())
    assert out.dtype == torch.bfloat16  # the adapter runs in the input's dtype
    out.float().logsumexp(-1).mean().backward()
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_second_adapter_shares_the_wrapped_layer(llama_dir):
    model = ours(llama_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model.named_parameters())
    with torch.no_grad():
        first = model(ids())
    wrapped = apply_lora(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj"]), name="other")
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert sorted(layer.lora_A) == ["default", "other"] and layer.active_adapter == "other"
    assert len(wrapped) == 2 and not isinstance(layer.base_layer, LoRALinear)
    with torch.no_grad():
        assert not torch.equal(model(ids()), first)  # "other" is active; its B is 0, but "default" is off
        set_adapter(model, "default")
        assert torch.equal(model(ids()), first)
    assert set(lora_state_dict(model, "other")) == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    }


def test_scale_follows_peft_pattern_rules():
    cfg = LoraConfig(
        r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\..*v_proj": 2}, alpha_pattern={"proj": 1}
    )
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 8  # matches only at a dot
    assert cfg.rank_for("model.layers.1.self_attn.v_proj") == 2
    assert cfg.scale_for("model.layers.0.mlp.up_proj") == 16 / 8  # "proj" is not a dotted suffix
    assert cfg.scale_for("model.layers.0.mlp.proj") == 1 / 8
    rs = LoraConfig(r=16, alpha=8, use_rslora=True)
    assert rs.scale_for("model.layers.0.mlp.up_proj") == 8 / 4


# ---- errors ---------------------------------------------------------------------------------


def test_no_matching_target_lists_candidates(llama_dir):
    model = ours(llama_dir)
    with pytest.raises(ConfigError, match=r"\['nope'\].*matches no linear layer.*'down_proj'.*'lm_head'"):
        apply_lora(model, LoraConfig(target_modules=["nope"]))
    with pytest.raises(ConfigError, match="matches no"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    assert not lora_layers(model)


def test_tied_lm_head_is_refused(family_dirs):
    model = ours(family_dirs["llama-tied"])
    with pytest.raises(ConfigError, match="tied to the embedding"):
        apply_lora(model, LoraConfig(target_modules=["lm_head"]))


@pytest.mark.parametrize(
    "field, value, message",
    [("r", 0, "r must be"), ("alpha", 0.0, "lora_alpha must be"), ("dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
     ("target_modules", [], "target_modules must be"), ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\]")],
)  # fmt: skip
def test_validate_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{field: value}).validate()
    with pytest.raises(ConfigError, match="layers_to_transform cannot be combined"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0]).validate()


@pytest.fixture()
def saved_adapter(llama_dir, tmp_path) -> Path:
    model = ours(llama_dir)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg)
    return save_adapter(model, tmp_path / "adapter", cfg)


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [({"use_dora": "yes"}, "use_dora must be true or false"), ({"lora_bias": True}, "lora_bias=True"),
     ({"peft_type": "IA3"}, "only 'LORA'"),
     ({"bias": "all"}, "bias='all'"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
     ({"fan_in_fan_out": True}, "fan_in_fan_out"), ({"layer_replication": [[0, 1]]}, "layer_replication"),
     ({"future_feature": {"on": 1}}, "future_feature"), ({"init_lora_weights": "pissa"}, "pissa"),
     ({"r": 0}, "r must be")],
)  # fmt: skip
def test_unsupported_config_is_refused_naming_file_and_field(changes, message, saved_adapter, llama_dir):
    edit_config(saved_adapter, **changes)
    model = ours(llama_dir)
    with pytest.raises(ConfigError, match=message) as e:
        load_adapter(model, saved_adapter)
    assert str(saved_adapter / "adapter_config.json") in str(e.value)
    assert not lora_layers(model)  # refused before the model was touched


def test_bookkeeping_fields_are_ignored(saved_adapter, llama_dir):
    edit_config(
        saved_adapter, peft_version="9.9.9", auto_mapping={"x": 1}, inference_mode=False, future_flag=None
    )
    load_adapter(ours(llama_dir), saved_adapter)


def test_missing_config_and_pickle_weights_are_refused(saved_adapter, llama_dir):
    (saved_adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json: not found"):
        load_adapter(ours(llama_dir), saved_adapter)
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj"])
    (saved_adapter / "adapter_config.json").write_text(json.dumps(cfg.to_peft_dict(None)))
    (saved_adapter / "adapter_model.safetensors").rename(saved_adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="convert it to adapter_model.safetensors"):
        load_adapter(ours(llama_dir), saved_adapter)


def test_shape_mismatch_names_the_tensor(saved_adapter, llama_dir):
    edit_config(saved_adapter, r=8)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'base_model\.model\.model\.layers\.\d\.self_attn\.[qv]_proj\.lora_[AB]\.weight' has shape "
        r"\((4, 64|32, 4|64, 4)\), expected \((8, 64|32, 8|64, 8)\)",
    ):
        load_adapter(ours(llama_dir), saved_adapter)


def test_missing_and_foreign_tensors_are_refused(saved_adapter, llama_dir):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, path)
    with pytest.raises(CheckpointError, match=r"no tensor for model\.layers\.1\.self_attn\.v_proj\.lora_B"):
        load_adapter(ours(llama_dir), saved_adapter)
    extra = {**tensors, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}
    save_file(extra, path)
    with pytest.raises(CheckpointError, match="up_proj.*target_modules do not select"):
        load_adapter(ours(llama_dir), saved_adapter)
    save_file(
        {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)},
        path,
    )
    with pytest.raises(
        CheckpointError, match="lora_magnitude_vector' is a DoRA magnitude but .* no use_dora"
    ):
        load_adapter(ours(llama_dir), saved_adapter)
    save_file(
        {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_E.weight": torch.ones(4)}, path
    )
    with pytest.raises(CheckpointError, match="lora_E.weight' is not a LoRA linear weight"):
        load_adapter(ours(llama_dir), saved_adapter)


def test_keys_with_adapter_name_and_without_prefix_load(saved_adapter, llama_dir):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    renamed = {
        k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
        for k, v in tensors.items()
    }
    save_file(renamed, path)
    model = ours(llama_dir)
    load_adapter(model, saved_adapter, name="mine")
    got = lora_state_dict(model, "mine")
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_merge_errors(llama_dir):
    model = ours(llama_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    merge_adapter(model, "default")
    with pytest.raises(ConfigError, match="already merged"):
        merge_adapter(model, "default")
    with pytest.raises(ConfigError, match="merged into the base weights"):
        with adapters_disabled(model):
            pass
    with pytest.raises(ConfigError, match="no adapter named 'nope'.*'default'"):
        set_adapter(model, "nope")

    class Packed4Bit(nn.Module):  # a quantized base: the weight is a buffer of codes
        in_features, out_features = 8, 6

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.zeros(24, dtype=torch.uint8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(*x.shape[:-1], 6)

    layer = LoRALinear(Packed4Bit())
    layer.add_adapter("default", r=2, scaling=1.0)
    assert layer(torch.ones(3, 8)).shape == (3, 6)
    with pytest.raises(ConfigError, match="merge needs a full-precision base.*without QLoRA"):
        layer.merge("default")
