"""gpt-oss checkpoints: OpenAI's MXFP4 expert tensors decoded as transformers decodes them, merged
expert tensors split into one projection per expert and written back so that transformers loads
them, and a damaged checkpoint refused by name. (Logit and generation parity with transformers
for the architecture itself: test_model_parity.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_SHAPE, build_tiny_tokenizer_dir
from safetensors.torch import load_file, save_file

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.checkpoint.save import save_hf_dir
from weightsmith.errors import CheckpointError
from weightsmith.models import ModelConfig
from weightsmith.models.merged_experts import decode_mxfp4, split_experts

transformers = pytest.importorskip("transformers")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")

EXPERTS, WIDTH = 4, 96  # intermediate size: a multiple of 32, as MXFP4 blocks need


def _hf_model(seed: int = 0):
    cfg = transformers.GptOssConfig(
        **{**TINY_SHAPE, "intermediate_size": WIDTH},
        head_dim=16,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        swiglu_limit=2.0,
        pad_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith(("bias", "sinks")):
                p.add_(torch.randn_like(p) * 0.5)
    return hf


def _random_mxfp4(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks (..., G, 16) and exponents (..., G) around 2^-6."""
    blocks = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(127 - 9, 127 - 4, shape, generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_decodes_as_transformers_decodes_it():
    gen = torch.Generator().manual_seed(0)
    blocks, scales = _random_mxfp4((3, 10, 4), gen)
    scales[0, 0, 0], scales[0, 0, 1] = 0, 254  # the smallest and largest exponents
    ref = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (3, 128, 10): (E, in, out)
    got = decode_mxfp4(blocks, scales)  # (3, 10, 128): each expert's rows are its outputs
    assert got.shape == (3, 10, 128)
    assert torch.equal(got.transpose(1, 2), ref)


def _mxfp4_checkpoint(path, hf) -> None:
    """`hf` saved as OpenAI publishes gpt-oss: the expert matrices as MXFP4 blocks and scales
    (random codes, which `hf` then holds dequantized) and a quantization_config."""
    build_tiny_tokenizer_dir(path)
    gen = torch.Generator().manual_seed(1)
    h = hf.config.hidden_size
    with torch.no_grad():
        for layer in hf.model.layers:
            experts = layer.mlp.experts
            for name, n_in, n_out in (("gate_up_proj", h, 2 * WIDTH), ("down_proj", WIDTH, h)):
                blocks, scales = _random_mxfp4((EXPERTS, n_out, n_in // 32), gen)
                getattr(experts, name).copy_(
                    mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                )
                experts.register_buffer(f"{name}_packed", torch.cat((scales[..., None], blocks), -1))
    hf.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    for key in [k for k in state if k.endswith("_packed")]:
        packed = state.pop(key)
        stem = key.removesuffix("_packed")
        del state[stem]
        state[f"{stem}_scales"], state[f"{stem}_blocks"] = (
            packed[..., 0].contiguous(),
            packed[..., 1:].contiguous(),
        )
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (path / "config.json").write_text(json.dumps(cfg))


def test_an_mxfp4_checkpoint_loads_with_transformers_logits(tmp_path):
    hf = _hf_model()
    _mxfp4_checkpoint(tmp_path / "oss", hf)
    assert any(k.endswith("gate_up_proj_blocks") for k in load_file(tmp_path / "oss" / "model.safetensors"))
    ours = load_checkpoint(tmp_path / "oss").model
    ids = torch.randint(0, TINY_SHAPE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() <= 1e-4
    expert = ours.model.layers[1].mlp.experts[3]
    assert expert.gate_proj.weight.shape == (WIDTH, 64) and expert.down_proj.bias.shape == (64,)


def test_a_saved_gpt_oss_loads_in_transformers_with_the_same_logits(tmp_path):
    hf = _hf_model(seed=3)
    _mxfp4_checkpoint(tmp_path / "oss", hf)
    ours = load_checkpoint(tmp_path / "oss")
    save_hf_dir(ours.model, ours.tokenizer, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved["model.layers.0.mlp.experts.gate_up_proj"].shape == (EXPERTS, 64, 2 * WIDTH)
    assert saved["model.layers.0.mlp.experts.down_proj_bias"].shape == (EXPERTS, 64)
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    ids = torch.randint(0, TINY_SHAPE["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (back.eval()(ids).logits - ref).abs().max().item() <= 1e-4
        assert (load_checkpoint(tmp_path / "saved").model(ids) - ref).abs().max().item() <= 1e-4


def _cfg() -> ModelConfig:
    return ModelConfig.from_hf(json.loads(_hf_model().config.to_json_string()), source="test")


def test_split_pairs_blocks_and_scales_in_either_order():
    cfg = _cfg()
    blocks, scales = _random_mxfp4((EXPERTS, 64, WIDTH // 32), torch.Generator().manual_seed(5))
    stem = "model.layers.0.mlp.experts.down_proj"
    for order in (
        ((f"{stem}_blocks", blocks), (f"{stem}_scales", scales)),
        (
            (f"{stem}_scales", scales),
            (f"{stem}_blocks", blocks),
        ),
    ):
        out = {n: t for n, t, _ in split_experts(cfg, [(n, t, "f") for n, t in order])}
        assert list(out) == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(EXPERTS)]
        assert torch.equal(
            out["model.layers.0.mlp.experts.2.down_proj.weight"], decode_mxfp4(blocks[2], scales[2])
        )


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            [
                (
                    "model.layers.1.mlp.experts.gate_up_proj_blocks",
                    torch.zeros(EXPERTS, 2 * WIDTH, 2, 16, dtype=torch.uint8),
                )
            ],
            "'model.layers.1.mlp.experts.gate_up_proj_blocks' has no 'model.layers.1.mlp.experts.gate_up_proj_scales'",
        ),
        (
            [
                (
                    "model.layers.0.mlp.experts.down_proj_scales",
                    torch.zeros(EXPERTS, 64, 2, dtype=torch.uint8),
                ),
                (
                    "model.layers.0.mlp.experts.down_proj_blocks",
                    torch.zeros(EXPERTS, 64, 3, 16, dtype=torch.uint8),
                ),
            ],
            "'model.layers.0.mlp.experts.down_proj_scales' is (4, 64, 2) torch.uint8, expected (4, 64, 3) uint8",
        ),
        (
            [("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(EXPERTS, 2 * WIDTH, 64))],
            "'model.layers.0.mlp.experts.gate_up_proj' has shape (4, 192, 64), expected (4, 64, 192)",
        ),
    ],
)
def test_damaged_expert_tensors_are_refused_by_name(tensors, message):
    with pytest.raises(CheckpointError, match="f: tensor|f: MXFP4") as err:
        list(split_experts(_cfg(), [(n, t, "f") for n, t in tensors]))
    assert message in str(err.value)


@pytest.mark.parametrize("masked", [False, True])
def test_long_inputs_attend_a_block_of_queries_at_a_time(monkeypatch, masked):
    """The written-out attention (sinks, caps) bounds its scores by taking queries in blocks: the
    same outputs and gradients as all at once."""
    from weightsmith.models import attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 8, generator=g, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, generator=g, requires_grad=True)
    mask = torch.rand(2, 1, 37, 37, generator=g) > 0.3 if masked else None
    kw = dict(mask=mask, is_causal=not masked, sinks=sinks, softcap=2.0)
    whole = attention.attend(q, k, v, **kw)
    grads = torch.autograd.grad(whole.square().sum(), (q, k, v, sinks))
    monkeypatch.setattr(attention, "SCORE_BLOCK", 2 * 4 * 37 * 5)  # 5 queries a block: 8 blocks
    blocks = attention.attend(q, k, v, **kw)
    torch.testing.assert_close(blocks, whole, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(blocks.square().sum(), (q, k, v, sinks)), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_mxfp4_checkpoint_kept_quantized_runs_its_blocks(tmp_path, native_lib):
    """`--keep-quantized` on OpenAI's MXFP4 folder: each expert a GGMLLinear of ggml MXFP4 blocks
    (the file's codes and exponents, reordered: the same weights bit for bit), 17 bytes per 32
    weights resident; the logits are the float load's up to the kernels' int8 input rounding (0.5% of
    their scale), through the PyTorch step and the fused C step."""
    from weightsmith.cpu_decode import prepare_cpu_decode
    from weightsmith.cpu_decode.fused import FusedStep
    from weightsmith.generate import decode_one_token, prefill
    from weightsmith.kv_cache import KVCache
    from weightsmith.quant.ggml_linear import GGMLLinear

    hf = _hf_model(seed=5)
    _mxfp4_checkpoint(tmp_path / "oss", hf)
    floats = load_checkpoint(tmp_path / "oss").model
    kept = load_checkpoint(tmp_path / "oss", keep_quantized=True)
    assert kept.quantization == "MXFP4 (experts kept as blocks)"
    layers = [m for m in kept.model.modules() if isinstance(m, GGMLLinear)]
    assert len(layers) == 2 * EXPERTS * 3 and {m.type_name for m in layers} == {"MXFP4"}
    expert = kept.model.model.layers[0].mlp.experts[1]
    flat = floats.model.layers[0].mlp.experts[1]
    for part in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(expert, part)
        assert torch.equal(layer.dequantize(torch.float32), getattr(flat, part).weight)
        assert layer.qweight.numel() == layer.out_features * layer.in_features // 32 * 17
        assert torch.equal(layer.bias, getattr(flat, part).bias)
    ids = torch.randint(0, TINY_SHAPE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = floats(ids)
        assert (kept.model(ids) - ref).abs().max().item() <= 5e-3 * ref.abs().max().item()
    step = prepare_cpu_decode(kept.model).decode_step(decode_one_token)
    assert isinstance(step, FusedStep)
    cache = KVCache.for_model(kept.config, 1, 32, dtype=torch.float32, device="cpu")
    prefill(kept.model, cache, [ids[0, :8].tolist()], torch.device("cpu"))
    got = torch.stack([step(kept.model, cache, [int(t)], torch.device("cpu"))[0] for t in ids[0, 8:15]])
    assert (got - ref[0, 8:15]).abs().max().item() <= 5e-3 * ref.abs().max().item()


def test_keep_quantized_is_refused_for_other_hf_folders(tmp_path):
    from conftest import build_tiny_hf_dir

    with pytest.raises(
        CheckpointError, match="keep_quantized .* applies to .gguf files and to gpt-oss's MXFP4"
    ):
        load_checkpoint(build_tiny_hf_dir(tmp_path / "tiny"), keep_quantized=True)
