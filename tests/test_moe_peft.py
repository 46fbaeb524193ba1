"""LoRA on the experts of Qwen3-MoE and Mixtral as PEFT does it on transformers 5, where the experts
are fused 3-D parameters adapted through `target_parameters` (lora/experts.py): PEFT's adapters load
into our per-expert modules with transformers + peft's logits and save back unchanged; ours load in
PEFT; `all-linear` selects what PEFT selects; merging gives PEFT's merged weights; QLoRA and the
CPU decode plan with expert adapters; and bad adapters refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_plan_decodes_like_forward, kernels_on
from safetensors.torch import load_file, save_file
from test_lora import hf_model, ids, ours, peft_warnings, randomize_adapters
from test_qwen3_moe import MOE, _logits, _source

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.save import save_hf_dir
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.lora import (
    LoraConfig,
    adapters_disabled,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    resolve_targets,
    save_adapter,
)
from weightsmith.lora.experts import parameter_targets, select_parameters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {
        "qwen3_moe": _source(root / "qwen3_moe", **MOE),
        "mixtral": _source(root / "mixtral", transformers.MixtralConfig, **MIXTRAL),
    }


def _peft_model(path: Path, **kw):
    """transformers + peft with a fresh adapter whose A and B are random (B non-zero)."""
    cfg = peft.LoraConfig(**{"r": 2, "lora_alpha": 4, **kw}, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_model(path), cfg)
    randomize_adapters(model.named_parameters())
    return model.eval()


PEFT_CONFIGS = {
    "all-linear": dict(target_modules="all-linear"),
    "down-rslora": dict(target_modules=[], target_parameters=["experts.down_proj"], r=3, use_rslora=True),
    "gate-up-patterns": dict(
        target_modules=["q_proj"],
        target_parameters=["gate_up_proj", "gate.weight"],
        rank_pattern={"gate_up_proj": 3},
        alpha_pattern={r"layers\.1\.mlp\.experts\.gate_up_proj": 9},
    ),  # fmt: skip
}


def _peft_adapter_round_trip(path: Path, peft_kw: dict, tmp_path: Path):
    """A PEFT adapter loaded into ours (PEFT's logits) and saved back: the same tensors."""
    peft_model = _peft_model(path, **peft_kw)
    peft_model.save_pretrained(tmp_path / "peft")
    model = ours(path)
    cfg = load_adapter(model, tmp_path / "peft")
    ref = _logits(peft_model)
    with peft_model.disable_adapter():
        base = _logits(peft_model)
    assert (_logits(model) - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter matters
    save_adapter(model, tmp_path / "back", cfg)
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("case", list(PEFT_CONFIGS))
def test_peft_expert_adapter_loads_in_ours_and_saves_back_unchanged(family, case, moe_dirs, tmp_path):
    model = _peft_adapter_round_trip(moe_dirs[family], PEFT_CONFIGS[case], tmp_path)
    selected = [  # the same parameters, with the same ranks and scales
        {k: (c.rank_for(k), c.scale_for(k)) for k in select_parameters(model, c)}
        for c in (LoraConfig.from_peft_dict(json.loads((d / "adapter_config.json").read_text()), "f")
                  for d in (tmp_path / "peft", tmp_path / "back"))
    ]  # fmt: skip
    assert selected[0] == selected[1] and selected[0]


OURS = {
    "all-linear": LoraConfig(r=2, alpha=4, dropout=0.05),  # written as 0: PEFT has none on parameters
    # Per-expert ranks and scales differ (padded to one rank per parameter), one layer only, gate
    # without up: every path of the packing.
    "uneven": LoraConfig(
        r=2,
        alpha=4,
        target_modules=["gate_proj", "w1", "down_proj", "w2", "v_proj"],
        layers_to_transform=[1],
        rank_pattern={r"experts\.1\.(gate_proj|w1)": 3},
        alpha_pattern={r"experts\.2\.(down_proj|w2)": 7},
    ),  # fmt: skip
}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("case", list(OURS))
def test_our_expert_adapter_loads_in_peft(family, case, moe_dirs, tmp_path):
    path = moe_dirs[family]
    model = ours(path)
    apply_lora(model, OURS[case])
    randomize_adapters(model.named_parameters())
    save_adapter(model, tmp_path, OURS[case], base_model=str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf_model(path), tmp_path).eval()
    assert not [w for w in peft_warnings(caught) if "missing" in w.lower() or "unexpected" in w.lower()]
    assert (_logits(model) - _logits(peft_model)).abs().max().item() <= 1e-4
    if case == "all-linear":  # the same file PEFT writes for its own all-linear, up to the numbers
        _peft_model(path, target_modules="all-linear").save_pretrained(tmp_path / "peft")
        theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        written = json.loads((tmp_path / "adapter_config.json").read_text())
        assert written["lora_dropout"] == 0.0
        for key in (
            "target_modules",
            "target_parameters",
            "rank_pattern",
            "alpha_pattern",
            "r",
            "lora_alpha",
        ):
            assert (
                sorted(written[key]) == sorted(theirs[key])
                if isinstance(written[key], list)
                else (written[key] == theirs[key])
            ), key


@pytest.mark.parametrize(
    ("family", "extra"),
    [("qwen3_moe", {**MOE, "mlp_only_layers": [0]}), ("qwen3_moe", MOE), ("mixtral", MIXTRAL)],
)
def test_all_linear_resolves_to_what_peft_adapts(family, extra, tmp_path):
    cls = transformers.Qwen3MoeConfig if family == "qwen3_moe" else transformers.MixtralConfig
    path = _source(tmp_path, cls, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner = peft.get_peft_model(hf_model(path), peft.LoraConfig(target_modules="all-linear")).base_model
    model = ours(path)
    params = parameter_targets(model)
    theirs = set(tuner.targeted_module_names)
    theirs |= {m for k in tuner.targeted_parameter_names for parts in params[k].experts for m in parts}
    mine = {n for n, _, _ in resolve_targets(model, LoraConfig())}
    assert mine == theirs
    if extra.get("mlp_only_layers"):
        assert any(n.startswith("model.layers.0.mlp.") for n in mine)  # the dense MLP too (PEFT 0.22)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_merged_weights_equal_peft_merged_weights(family, moe_dirs, tmp_path):
    path = moe_dirs[family]
    peft_model = _peft_model(path, target_modules="all-linear")
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "theirs")
    ckpt = load_checkpoint(path, device=torch.device("cpu"), dtype=torch.float32)
    load_adapter(ckpt.model, tmp_path / "adapter")
    merge_and_unload(ckpt.model)
    save_hf_dir(ckpt.model, ckpt.tokenizer, tmp_path / "mine")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    mine = load_file(tmp_path / "mine" / "model.safetensors")
    base = load_file(path / "model.safetensors")
    assert set(mine) == set(theirs)
    assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
    changed = {k for k in mine if not torch.equal(mine[k], base[k])}
    assert any(".experts.3." in k for k in changed) and any(k.endswith(".gate.weight") for k in changed)


def test_qlora_on_experts_trains_and_reloads(moe_dirs, tmp_path):
    from weightsmith.quant.nf4 import NF4Linear, quantize_linears_nf4

    path = moe_dirs["qwen3_moe"]
    model = ours(path)
    quantize_linears_nf4(model)
    assert isinstance(model.model.layers[0].mlp.experts[1].up_proj, NF4Linear)
    cfg = LoraConfig(r=2, alpha=4)
    apply_lora(model, cfg)
    randomize_adapters(model.named_parameters())
    loss = model(ids()).float().logsumexp(-1).mean()
    loss.backward()
    grad = model.model.layers[0].mlp.experts[1].up_proj.lora_A["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad(), adapters_disabled(model):
        base = _logits(model)
    assert (_logits(model) - base).abs().max().item() > 1e-2
    save_adapter(model, tmp_path, cfg)
    fresh = ours(path)
    quantize_linears_nf4(fresh)
    load_adapter(fresh, tmp_path)
    assert fresh.model.layers[0].mlp.experts[1].up_proj.lora_A["default"].weight.shape[0] == 2  # its own rank
    assert torch.equal(_logits(fresh), _logits(model))
    with pytest.raises(ConfigError, match="cannot merge into a NF4Linear base"):
        merge_and_unload(fresh)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_cpu_decode_plan_runs_expert_and_router_adapters(family, moe_dirs, native_lib, monkeypatch, tmp_path):
    """PEFT's all-linear adapter on a mixture of experts (the experts' and the router's LoRA too)
    in the C step: the decoded logits are those of a full forward with the adapter."""
    kernels_on(monkeypatch, True)
    path = moe_dirs[family]
    _peft_model(path, target_modules="all-linear").save_pretrained(tmp_path)
    model = load_checkpoint(path).model
    load_adapter(model, tmp_path)
    names = lora_layers(model)
    assert any(".experts." in n for n in names) and any(n.endswith("gate") for n in names)
    seq = ids(t=14)[:1]
    assert_plan_decodes_like_forward(model, seq, fused=True)


# ---- bad input -------------------------------------------------------------------------------


def _edit(directory: Path, config=None, tensors=None) -> None:
    if config is not None:
        data = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if tensors is not None:
        state = load_file(directory / "adapter_model.safetensors")
        save_file(tensors(state), directory / "adapter_model.safetensors")


def _shrink(state):
    key = next(k for k in state if k.endswith("experts.lora_B.weight"))
    return {**state, key: state[key][:, :-1].contiguous()}


def _drop(state):
    return {k: v for k, v in state.items() if not k.endswith("experts.base_layer.lora_A.weight")}


@pytest.mark.parametrize(
    ("config", "tensors", "error", "message"),
    [
        (dict(target_parameters=["experts.up_proj"]), None, ConfigError,
         r"adapter_config.json: target_parameters entry 'experts.up_proj' names no parameter of this model"),
        (dict(lora_dropout=0.1), None, ConfigError, "lora_dropout must be 0 with target_parameters"),
        (dict(target_parameters="gate_up_proj"), None, ConfigError, "target_parameters must be a list"),
        (None, _shrink, CheckpointError, r"experts.lora_B.weight' has shape \(64, 7\), expected \(64, 8\)"),
        (None, _drop, CheckpointError, r"no tensor .*experts.base_layer.lora_A.weight .*incomplete"),
    ],
)  # fmt: skip
def test_bad_expert_adapters_are_refused_in_one_line(config, tensors, error, message, moe_dirs, tmp_path):
    path = moe_dirs["qwen3_moe"]
    _peft_model(path, target_modules="all-linear").save_pretrained(tmp_path)
    _edit(tmp_path, config, tensors)
    model = ours(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message) as caught:
        load_adapter(model, tmp_path)
    assert "\n" not in str(caught.value)
    assert set(model.state_dict()) == set(before)  # nothing applied


def test_apply_lora_refuses_a_parameter_the_model_lacks(moe_dirs):
    with pytest.raises(ConfigError, match=r"'experts.w1' names no parameter .*'experts.gate_up_proj'"):
        apply_lora(ours(moe_dirs["mixtral"]), LoraConfig(target_modules=[], target_parameters=["experts.w1"]))


def test_finetune_option_reaches_the_config():
    from weightsmith.train.runs import LoraOptions

    cfg = LoraOptions(
        target_modules=["q_proj"], target_parameters=["experts.down_proj"], dropout=0.0
    ).to_config()
    assert cfg.target_parameters == ["experts.down_proj"] and cfg.to_peft_dict(None)["target_parameters"] == [
        "experts.down_proj"
    ]
    with pytest.raises(ConfigError, match="lora_dropout must be 0 with target_parameters"):
        LoraOptions(target_parameters=["experts.down_proj"]).to_config()


# ---- gpt-oss: experts as (E, in, out) parameters, gate and up rows interleaved ------------------

GPT_OSS = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5, swiglu_limit=3.0)


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory) -> Path:
    from conftest import save_perturbed_hf
    from test_qwen3_moe import SHAPE

    path = tmp_path_factory.mktemp("gpt_oss") / "gpt_oss"
    return save_perturbed_hf(path, transformers.GptOssConfig(**{**SHAPE, **GPT_OSS}), ("bias", "sinks"))


GPT_OSS_PEFT = {
    "experts": dict(
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"gate_up_proj": 3},
    ),
    "all-linear": dict(target_modules="all-linear"),
}


@pytest.mark.parametrize("case", list(GPT_OSS_PEFT))
def test_peft_gpt_oss_adapter_loads_in_ours_and_saves_back_unchanged(case, gpt_oss_dir, tmp_path):
    _peft_adapter_round_trip(gpt_oss_dir, GPT_OSS_PEFT[case], tmp_path)


def test_gpt_oss_all_linear_is_the_attention_as_in_peft(gpt_oss_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner = peft.get_peft_model(
            hf_model(gpt_oss_dir), peft.LoraConfig(target_modules="all-linear")
        ).base_model
    mine = {n for n, _, _ in resolve_targets(ours(gpt_oss_dir), LoraConfig())}
    assert mine == set(tuner.targeted_module_names) and not tuner.targeted_parameter_names
    assert all(".self_attn." in n for n in mine)


def test_our_gpt_oss_expert_adapter_loads_in_peft_and_merges_as_peft_does(gpt_oss_dir, tmp_path):
    """Per-expert LoRAs of ours (gate without up in one expert, uneven ranks) written as PEFT's
    target_parameters with gate and up rows interleaved: PEFT computes our logits, and merging
    gives the weights PEFT merges."""
    cfg = LoraConfig(
        r=2,
        alpha=4,
        target_modules=["gate_proj", "up_proj", "down_proj", "v_proj"],
        rank_pattern={r"experts\.1\.gate_proj": 3},
    )
    model = ours(gpt_oss_dir)
    apply_lora(model, cfg)
    randomize_adapters(model.named_parameters())
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(gpt_oss_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(hf_model(gpt_oss_dir), tmp_path / "adapter").eval()
    assert (_logits(model) - _logits(peft_model)).abs().max().item() <= 1e-4
    peft_model.merge_and_unload().save_pretrained(tmp_path / "theirs")
    merge_and_unload(model)
    ckpt = load_checkpoint(gpt_oss_dir)
    save_hf_dir(model, ckpt.tokenizer, tmp_path / "mine")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    mine = load_file(tmp_path / "mine" / "model.safetensors")
    assert set(mine) == set(theirs)
    assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-5
