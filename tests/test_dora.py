"""DoRA adapters (lora/dora.py): parity with PEFT's `use_dora` (logits, the fresh magnitude,
gradients, merged weights, files both ways, Phi-3's fused projections), dropout's place in the
sum, the norm's cache after a training step, per-row adapters, an NF4 base, the finetune command,
and refusals. The C decode step's DoRA rows are in test_cpu_decode.py."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_hf_dir, save_perturbed_hf
from safetensors.torch import load_file
from test_lora import SMALL, ids
from torch import nn

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.config import config_from_dict
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    row_adapters,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = LoraConfig(r=4, alpha=8, use_dora=True)


@pytest.fixture(scope="module")
def bias_dir(tmp_path_factory) -> Path:
    """A tiny Llama with biases on every projection (DoRA scales around them)."""
    path = tmp_path_factory.mktemp("dora") / "tiny"
    return build_tiny_hf_dir(path, seed=5, attention_bias=True, mlp_bias=True, **SMALL)


def ours(path: Path) -> nn.Module:
    return load_checkpoint(path, device=torch.device("cpu"), dtype=torch.float32, decode_layout=False).model


def hf(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def randomize(named_params, seed: int = 3) -> None:
    """Random A and B, and magnitudes moved off their start by up to +-20%."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in named_params:
            if "lora_magnitude_vector" in n:
                p.mul_(1 + (torch.rand(p.shape, generator=g) - 0.5) * 0.4)
            elif "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_dora(path: Path, **kw) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, **kw)
    return peft.get_peft_model(hf(path), config)


def peft_name(name: str) -> str:
    """Our parameter name as PEFT's in-memory one (ours lacks PEFT's wrapper prefix)."""
    return "base_model.model." + name


# ---- parity with PEFT ------------------------------------------------------------------------


def test_our_dora_adapter_loads_in_peft_with_the_same_logits(bias_dir, tmp_path):
    model = ours(bias_dir)
    apply_lora(model, CFG)
    randomize(model.named_parameters())
    save_adapter(model, tmp_path / "a", CFG, base_model=str(bias_dir))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf(bias_dir), tmp_path / "a").eval()
    assert not [w for w in caught if "/peft/" in w.filename.replace("\\", "/")]
    model.eval()
    with torch.no_grad():
        got, ref = model(ids()), theirs(ids()).logits
        with theirs.disable_adapter():
            base = theirs(ids()).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (ref - base).abs().max() > 0.05  # the adapter matters


def through_ours_and_back(path: Path, tmp_path: Path, seed: int) -> nn.Module:
    """A random PEFT DoRA adapter on the checkpoint at `path`, loaded by us (the same logits as
    PEFT's) and saved again: the file holds the same tensors. Returns PEFT's model."""
    theirs = peft_dora(path)
    randomize(theirs.named_parameters(), seed=seed)
    theirs.save_pretrained(tmp_path / "p")
    model = ours(path)
    cfg = load_adapter(model, tmp_path / "p")
    assert cfg.use_dora
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), theirs.eval()(ids()).logits, rtol=1e-5, atol=1e-5)
    save_adapter(model, tmp_path / "o", cfg)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("p", "o"))
    assert sorted(a) == sorted(b) and any(k.endswith("lora_magnitude_vector") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return theirs


def test_peft_dora_adapter_loads_in_ours_and_saves_back_the_same_tensors(bias_dir, tmp_path):
    through_ours_and_back(bias_dir, tmp_path, seed=7)


def test_a_fresh_dora_adapter_starts_at_peft_magnitudes_and_changes_nothing(bias_dir):
    model = ours(bias_dir).eval()
    with torch.no_grad():
        base = model(ids())
    apply_lora(model, CFG)
    theirs = dict(peft_dora(bias_dir).named_parameters())
    layers = lora_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        m = layer.lora_magnitude_vector["default"].weight
        assert m.requires_grad and m.dtype == torch.float32
        ref = theirs[peft_name(name) + ".lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(m, ref, rtol=1e-6, atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids()), base)  # B = 0 and m = ||W||: g is exactly 1


def test_gradients_equal_peft_s(bias_dir, tmp_path):
    """A, B and m get PEFT's gradients: the norm is a constant (DoRA section 4.3)."""
    theirs = peft_dora(bias_dir)
    randomize(theirs.named_parameters(), seed=11)
    theirs.save_pretrained(tmp_path / "p")
    model = ours(bias_dir)
    load_adapter(model, tmp_path / "p")
    model.train(), theirs.train()
    target = ids(2)
    F.cross_entropy(model(ids()).flatten(0, 1), target.flatten()).backward()
    F.cross_entropy(theirs(ids()).logits.flatten(0, 1), target.flatten()).backward()
    ref = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    got = {peft_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(ref) and len(got) == 3 * 14
    for n, g in got.items():
        torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-6 * ref[n].abs().max().item())


def test_merged_weights_equal_peft_s_and_unmerge_restores(bias_dir, tmp_path):
    theirs = peft_dora(bias_dir)
    randomize(theirs.named_parameters(), seed=13)
    theirs.save_pretrained(tmp_path / "p")
    model = ours(bias_dir).eval()
    original = {n: p.clone() for n, p in model.named_parameters()}
    load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        unmerged = model(ids())
    merge_adapter(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_adapter(model, "default")
    restored = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for n, p in original.items():
        torch.testing.assert_close(restored[n], p, rtol=1e-5, atol=1e-6)
    merged = merge_and_unload(model).state_dict()
    ref = theirs.merge_and_unload().state_dict()
    for n, p in merged.items():
        torch.testing.assert_close(p, ref[n], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, original[n]) for n, p in merged.items())


def test_phi3_fused_projections_take_dora_both_ways(tmp_path):
    """PEFT's DoRA on Phi-3's qkv_proj and gate_up_proj: one magnitude per fused row, split among
    our q/k/v and gate/up and stacked back on save."""
    config = transformers.Phi3Config(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = save_perturbed_hf(tmp_path / "phi3", config)
    theirs = through_ours_and_back(path, tmp_path, seed=17)
    back = peft.PeftModel.from_pretrained(hf(path), tmp_path / "o").eval()  # our config names PEFT's modules
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, theirs(ids()).logits, rtol=1e-5, atol=1e-5)


# ---- behaviour --------------------------------------------------------------------------------


class FixedMask(nn.Module):
    """Dropout with a given mask, so a train-mode forward can be computed by hand."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_dropout_feeds_the_dropped_input_to_the_rescaled_base_term(bias_dir):
    """In training with dropout, PEFT's sum: base(x) + (g - 1) W drop(x) + g s B A drop(x)."""
    model = ours(bias_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5, use_dora=True, target_modules=["up_proj"]))
    randomize(model.named_parameters())
    layer = lora_layers(model)["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(3, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float() * 2
    layer.lora_dropout["default"] = FixedMask(mask)
    layer.train()
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    g = layer.lora_magnitude_vector["default"].weight / torch.linalg.norm(w + s * b @ a, dim=1)
    xd = x * mask
    want = F.linear(x, w, bias) + (g - 1) * F.linear(xd, w) + g * s * (xd @ a.t() @ b.t())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        layer.eval()  # no dropout: g (W x + s B A x) + bias
        torch.testing.assert_close(layer(x), g * (F.linear(x, w) + s * (x @ a.t() @ b.t())) + bias)


def test_the_norm_follows_each_training_step(bias_dir):
    """The norm is kept while A and B stay, and taken again after the optimizer moves them."""
    model = ours(bias_dir)
    apply_lora(model, CFG)
    randomize(model.named_parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    layer = lora_layers(model)["model.layers.1.self_attn.o_proj"]

    def direct() -> torch.Tensor:
        w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return torch.linalg.norm(w + layer.scaling["default"] * b @ a, dim=1).detach()

    for _ in range(3):
        model(ids()).logsumexp(-1).mean().backward()
        torch.testing.assert_close(layer.dora_norms.norm(layer, "default"), direct(), rtol=1e-5, atol=1e-6)
        before = direct()
        opt.step()
        opt.zero_grad()
        assert (direct() - before).abs().max() > 1e-4  # the step moved the norm
        torch.testing.assert_close(layer.dora_norms.norm(layer, "default"), direct(), rtol=1e-5, atol=1e-6)


def test_each_row_takes_its_own_adapter(bias_dir):
    """DoRA, plain LoRA and no adapter in one batch: each row as its adapter alone gives it."""
    model = ours(bias_dir).eval()
    apply_lora(model, CFG, "dora")
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]), "plain")
    randomize(model.named_parameters())
    alone = {}
    with torch.no_grad():
        for name in ("dora", "plain", None):
            set_adapter(model, name)
            alone[name] = model(ids())
        names = ["plain", "dora"]
        with row_adapters(model, names):
            mixed = model(ids())
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    assert (alone["dora"] - alone[None]).abs().max() > 0.05


def test_dora_over_an_nf4_base_is_the_formula_on_the_dequantized_weight(bias_dir):
    from weightsmith.quant.nf4 import quantize_linears_nf4

    model = ours(bias_dir)
    quantize_linears_nf4(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["v_proj"]))
    randomize(model.named_parameters())
    layer = lora_layers(model)["model.layers.0.self_attn.v_proj"]
    w, bias = layer.base_layer.dequantized_weight(torch.float32), layer.base_layer.bias
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    g = layer.lora_magnitude_vector["default"].weight / torch.linalg.norm(w + s * b @ a, dim=1)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), g * (F.linear(x, w) + s * x @ a.t() @ b.t()) + bias)
    layer.train()
    layer(x).square().sum().backward()
    assert layer.lora_magnitude_vector["default"].weight.grad.abs().max() > 0


def test_finetune_with_dora_writes_an_adapter_peft_runs(tiny_hf_dir, tmp_path):
    from test_finetune import write_data

    from weightsmith.train.sft import FinetuneConfig, run_finetune

    out = tmp_path / "run"
    cfg = config_from_dict(
        FinetuneConfig,
        {
            "model": str(tiny_hf_dir), "data": str(write_data(tmp_path / "d.jsonl")), "out": str(out),
            "max_seq_len": 64, "train": {"lr": 1e-2, "max_steps": 6, "batch_size": 4, "seed": 3},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "dora": True},
        },
    )  # fmt: skip
    run_finetune(cfg)
    tensors = load_file(out / "adapter_model.safetensors")
    magnitudes = {k: t for k, t in tensors.items() if k.endswith("lora_magnitude_vector")}
    assert len(magnitudes) == 2 * 7
    model = ours(tiny_hf_dir).eval()
    fresh = ours(tiny_hf_dir)
    apply_lora(fresh, CFG)
    start = {f"base_model.model.{n}.lora_magnitude_vector": m.lora_magnitude_vector["default"].weight
             for n, m in lora_layers(fresh).items()}  # fmt: skip
    assert any((magnitudes[k] - start[k]).abs().max() > 1e-4 for k in magnitudes)  # m was trained
    load_adapter(model, out)
    theirs = peft.PeftModel.from_pretrained(hf(tiny_hf_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), theirs(ids()).logits, rtol=1e-5, atol=1e-5)


# ---- refusals --------------------------------------------------------------------------------


def test_dora_refusals_name_what_to_change(bias_dir, tmp_path):
    with pytest.raises(ConfigError, match="use_dora cannot be combined with target_parameters"):
        LoraConfig(use_dora=True, target_modules=[], target_parameters=["experts.down_proj"]).validate()
    mixtral = ours(
        save_perturbed_hf(tmp_path / "mixtral", transformers.MixtralConfig(**SMALL, num_local_experts=4))
    )
    with pytest.raises(ConfigError, match=r"DoRA cannot adapt model\.layers\.0\.block_sparse_moe\..*experts"):
        apply_lora(mixtral, CFG)
    apply_lora(
        mixtral, LoraConfig(r=2, use_dora=True, target_modules=["q_proj", "o_proj"])
    )  # attention: fine

    model = ours(bias_dir)
    apply_lora(model, CFG)
    save_adapter(model, tmp_path / "a", CFG)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(CheckpointError, match="is a DoRA magnitude but adapter_config.json has no use_dora"):
        load_adapter(ours(bias_dir), tmp_path / "a")
    plain = ours(bias_dir)
    apply_lora(plain, LoraConfig(r=4, alpha=8))
    save_adapter(plain, tmp_path / "b", LoraConfig(r=4, alpha=8))
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"no tensor for .*lora_magnitude_vector"):
        load_adapter(ours(bias_dir), tmp_path / "b")

    apply_lora(model, LoraConfig(r=2, alpha=4), "plain")
    merge_adapter(model, "plain")
    with pytest.raises(ConfigError, match="cannot both be in the weights when one is DoRA"):
        merge_adapter(model, "default")


def test_broken_adapter_values_and_a_bad_cache_dtype_are_refused(bias_dir, tmp_path, capsys):
    """A magnitude (or A, B) with NaN or infinity is named before the model is touched; an unknown
    --kv-cache-dtype stops the command in one line."""
    from safetensors.torch import save_file

    from weightsmith.cli.main import main

    model = ours(bias_dir)
    apply_lora(model, CFG)
    save_adapter(model, tmp_path / "a", CFG)
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key][3] = float("nan")
    save_file(tensors, path)
    fresh = ours(bias_dir)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' holds NaN or infinite values"):
        load_adapter(fresh, tmp_path / "a")
    assert not lora_layers(fresh)
    assert main(["generate", str(bias_dir), "--kv-cache-dtype", "int3", "-p", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "--kv-cache-dtype: expected one of auto, fp32, bf16, fp16, int8, got 'int3' (did you mean 'int8'?)"
    )
