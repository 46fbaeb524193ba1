"""NF4 (QLoRA) weights: the code book against its construction and the paper, exact
round trips and error bounds, the byte layout, double quantization's cost, the
NF4Linear autograd path and memory, and swapping a loaded model's linears."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_hf_dir
from torch import nn

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cpu_decode import prepare_cpu_decode
from weightsmith.cpu_decode.layout import PackedAttention
from weightsmith.errors import WeightsmithError
from weightsmith.quant.nf4 import (
    NF4_CODEBOOK,
    NF4Linear,
    nf4_bits_per_parameter,
    nf4_codebook_from_normal_quantiles,
    quantize_linears_nf4,
    quantize_nf4,
)

# QLoRA (Dettmers et al. 2023, arXiv:2305.14314), Appendix E, "NormalFloat 4-bit data
# type": the exact NF4 values (also bitsandbytes' published code book).
PAPER_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
CB = NF4_CODEBOOK


def unpack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (n,) -> code indices (2n,), high nibble first."""
    return torch.stack([codes >> 4, codes & 15], dim=-1).view(-1).long()


def test_codebook_matches_normal_quantiles_and_the_paper():
    built = nf4_codebook_from_normal_quantiles()
    assert built.dtype == torch.float32 and built.shape == (16,)
    torch.testing.assert_close(CB, built, rtol=0, atol=1e-6)
    torch.testing.assert_close(CB, torch.tensor(PAPER_NF4), rtol=0, atol=1e-6)
    assert int((CB == 0).sum()) == 1
    assert torch.all(CB[1:] > CB[:-1])
    assert CB.min() == -1 and CB.max() == 1
    assert int((CB > 0).sum()) == 8 and int((CB < 0).sum()) == 7  # the asymmetric construction
    # The offset matters: the construction is not a tautology.
    assert (nf4_codebook_from_normal_quantiles(0.99) - CB).abs().max() > 1e-2


def test_code_values_times_absmax_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (64, 64), generator=g)  # (n_blocks, block)
    idx[:, 0], idx[:, 1] = 0, 15  # each block holds -1 and 1, so its absmax is its scale
    scale = torch.rand(64, generator=g) * 3 + 0.01  # (n_blocks,)
    w = (CB[idx] * scale[:, None]).view(32, 128)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(unpack(q.codes), idx.view(-1))
    out = q.dequantize()
    assert out.shape == w.shape and out.dtype == torch.float32
    assert torch.equal(out, w)


def test_random_weights_take_the_nearest_code_within_half_the_largest_gap():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    q = quantize_nf4(w, double_quant=False)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)  # (n_blocks, 1)
    err = (q.dequantize() - w).view(-1, 64).abs()
    half_gap = (CB[1:] - CB[:-1]).max() / 2
    assert torch.all(err <= half_gap * absmax * (1 + 1e-6))
    codes = unpack(q.codes).view(-1, 64)
    nearest = ((w.view(-1, 64) / absmax)[..., None] - CB).abs().argmin(-1)  # brute force
    assert torch.equal(codes, nearest)
    assert torch.equal(codes.unique(), torch.arange(16))


def test_packing_of_a_hand_worked_block():
    # One block with absmax 2 (a power of two, so value / 2 is exact in binary):
    #   2 -> 1.0 = code 15;  -2 -> -1.0 = code 0;  0 -> code 7
    #   0.5 -> 0.25: |0.25 - 0.2461| < |0.25 - 0.3379|, code 10
    #  -0.5 -> -0.25: |-0.25 + 0.2844| = 0.034 < |-0.25 + 0.1848| = 0.065, code 4
    #   1.0 -> 0.5: |0.5 - 0.4407| = 0.059 < |0.5 - 0.5626| = 0.063, code 12
    #   exactly halfway between 0 and 0.0796 -> the lower code, 7; just above -> 8
    mid = CB[8] / 2
    above = torch.nextafter(mid, torch.tensor(1.0))
    w = torch.zeros(64)
    w[:8] = torch.tensor([2.0, -2.0, 0.0, 0.5, -0.5, 1.0, 2 * mid, 2 * above])
    q = quantize_nf4(w, double_quant=False)
    # Element 2k is byte k's high nibble: (15, 0) (7, 10) (4, 12) (7, 8), then (7, 7).
    want = torch.tensor([0xF0, 0x7A, 0x4C, 0x78] + [0x77] * 28, dtype=torch.uint8)
    assert torch.equal(q.codes, want)
    assert q.absmax.tolist() == [2.0]


def test_sizes_not_a_multiple_of_the_block_are_padded_internally():
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    q = quantize_nf4(w, block_size=8)
    assert q.codes.numel() == 24 // 2 and q.absmax.numel() == 3  # 21 values padded to 24
    out = q.dequantize(torch.float64)
    assert out.shape == (3, 7) and out.dtype == torch.float64
    torch.testing.assert_close(out.float(), w, rtol=0, atol=0.15 * float(w.abs().max()))


@pytest.mark.parametrize(
    "weight, block_size, fragment",
    [
        (torch.randn(4, 64), 7, "block_size=7"),
        (torch.randn(4, 64), 0, "block_size=0"),
        (torch.randn(4, 64, device="meta"), 64, "meta device"),
        (torch.tensor([[1.0, float("nan")] * 32]), 64, "NaN"),
        (torch.ones(4, 64, dtype=torch.int32), 64, "torch.int32"),
    ],
)
def test_bad_input_is_rejected_naming_the_tensor(weight, block_size, fragment):
    with pytest.raises(WeightsmithError, match=fragment) as info:
        quantize_nf4(weight, block_size, name="layers.0.q_proj.weight")
    assert "layers.0.q_proj.weight" in str(info.value)


def test_double_quantization_keeps_the_scales_and_costs_4_127_bits():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    single, double = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    assert double.absmax.dtype == torch.int8 and double.absmax_step.dtype == torch.float32
    rel = (double.block_scales() - single.block_scales()).abs() / single.block_scales()
    assert rel.max() < 0.01
    # The codes come from the exact absmax (QLoRA eq. 6); only the scales differ.
    assert torch.equal(double.codes, single.codes)
    a, b = double.dequantize(), single.dequantize()
    assert ((a - b).norm() / b.norm()) < 0.01
    assert double.nbytes < single.nbytes
    # QLoRA §3: 32/64 = 0.5 bits of scale per weight, 8/64 + 32/(64*256) = 0.127 with double quant.
    assert nf4_bits_per_parameter(64, double_quant=False) == 4.5
    assert nf4_bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=1e-4)
    n, blocks = w.numel(), w.numel() // 64
    assert single.nbytes * 8 / n == 4 + 32 * blocks / n
    groups = math.ceil(blocks / 256)
    assert double.nbytes * 8 / n == 4 + (8 * blocks + 32 * groups + 32) / n  # + the fp32 mean
    assert double.nbytes * 8 / n == pytest.approx(4.127, abs=1e-3)


def test_double_quantization_handles_a_partial_last_group_and_equal_scales():
    w = torch.ones(300 * 64)  # 300 blocks: a second, partial group of 44; every scale is 1
    q = quantize_nf4(w)
    assert q.absmax_step.numel() == 2
    assert torch.equal(q.dequantize(), w)


def make_nf4_linear(double_quant: bool = True, seed: int = 0) -> tuple[nn.Linear, NF4Linear]:
    torch.manual_seed(seed)
    dense = nn.Linear(96, 48, bias=True)
    return dense, NF4Linear.from_linear(dense, block_size=64, double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_linear_forward_backward_and_state_dict(double_quant):
    _, layer = make_nf4_linear(double_quant)
    assert not any(p.requires_grad for p in layer.parameters())
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # the weight is buffers
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = layer(x)
    w = layer.dequantized_weight()  # (48, 96)
    assert torch.equal(y, F.linear(x, w, layer.bias))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ w, rtol=0, atol=1e-6)
    assert layer.bias.grad is None and all(b.grad is None for b in layer.buffers())

    fresh = NF4Linear(96, 48, bias=True, double_quant=double_quant)
    assert not torch.equal(fresh(x), y)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)


def test_nf4_linear_computes_in_the_input_dtype_and_keeps_fp32_scales():
    _, layer = make_nf4_linear()
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    want = F.linear(x, layer.dequantized_weight(torch.bfloat16), layer.bias.to(torch.bfloat16))
    assert torch.equal(layer(x), want)
    before = layer(torch.ones(1, 96))
    layer.to(torch.bfloat16)
    assert layer.weight_absmax_step.dtype == torch.float32 and layer.weight_absmax_mean.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    # Only the bias was rounded; the weight dequantizes as before.
    assert torch.equal(layer.dequantized_weight(), make_nf4_linear()[1].dequantized_weight())
    torch.testing.assert_close(layer(torch.ones(1, 96)), before, rtol=0, atol=1e-2)


def saved_tensors(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward while running fn()."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_backward_keeps_the_nf4_data_not_a_dense_weight():
    dense, layer = make_nf4_linear()
    dense.requires_grad_(False)  # the frozen base of a LoRA layer
    x = torch.randn(4, 96, requires_grad=True)
    n = dense.weight.numel()
    # Control: a frozen dense linear keeps its (48, 96) weight for grad_input.
    assert any(t.is_floating_point() and t.numel() >= n for t in saved_tensors(lambda: dense(x)))

    saved = saved_tensors(lambda: layer(x))
    assert not any(t.is_floating_point() and t.numel() >= n for t in saved)
    assert any(t is layer.weight_codes for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) <= layer.nf4_weight().nbytes


def param_and_buffer_bytes(model: nn.Module) -> int:
    seen = {(t.data_ptr(), t.numel()): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def test_quantize_linears_in_a_loaded_model(tiny_hf_dir):
    model = load_checkpoint(tiny_hf_dir, device=torch.device("cpu"), dtype=torch.float32).model
    prepare_cpu_decode(model, splits=2)  # the CPU decode layout, as an Engine lays it out
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)  # (B, T, V)
    linears = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = param_and_buffer_bytes(model)
    q_proj = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    assert type(model.model.layers[0].self_attn) is PackedAttention  # q/k/v in one buffer

    names = quantize_linears_nf4(model)
    assert sorted(names) == sorted(n for n in linears if n != "lm_head") and len(names) == 14
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    assert type(model.lm_head) is not NF4Linear and isinstance(model.model.embed_tokens, nn.Embedding)
    gc.collect()
    assert q_proj() is None, "the dense weight is still referenced"
    nf4_bytes = sum(model.get_submodule(n).nf4_weight().nbytes for n in names)
    assert sum(linears[n] for n in names) > 7 * nf4_bytes  # 32 bits -> ~4.1
    assert before - param_and_buffer_bytes(model) == sum(linears[n] for n in names) - nf4_bytes

    with torch.no_grad():
        got = model(ids)
    # NF4 leaves a relative error of ~0.09 in each matrix (QLoRA-style 4-bit); up to three
    # matrices in series per branch give a logit error of ~0.12, i.e. cosine ~0.993.
    # 0.98 allows ~0.2 relative error; scrambled codes or a wrong layout give < 0.8
    # (zeroing every block linear of this model gives ~0.7).
    assert F.cosine_similarity(got, want, dim=-1).mean() > 0.98
    assert not torch.allclose(got, want)


def test_dequantized_model_matches_the_nf4_model(tiny_hf_dir):
    """The swap is exact: NF4 layers compute what dense layers holding the dequantized
    weights compute (checks names, layout, column-major source weights, decode path)."""
    nf4 = load_checkpoint(tiny_hf_dir, device=torch.device("cpu"), dtype=torch.float32).model
    dense = load_checkpoint(tiny_hf_dir, device=torch.device("cpu"), dtype=torch.float32).model
    names = quantize_linears_nf4(nf4)
    with torch.no_grad():
        for n in names:
            dense.get_submodule(n).weight.copy_(nf4.get_submodule(n).dequantized_weight())
        ids = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(nf4(ids), dense(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nf4(ids[:, :1]), dense(ids[:, :1]), rtol=1e-5, atol=1e-5)  # decode size


def test_skip_and_tied_embeddings(tmp_path, tiny_hf_dir):
    model = load_checkpoint(tiny_hf_dir, device=torch.device("cpu"), dtype=torch.float32).model
    assert "lm_head" in quantize_linears_nf4(model, skip=lambda name: False)

    model = load_checkpoint(tiny_hf_dir, device=torch.device("cpu"), dtype=torch.float32).model
    names = quantize_linears_nf4(model, skip=lambda name: ".mlp." in name)  # replaces the default
    assert len(names) == 9 and "lm_head" in names and not any("mlp" in n for n in names)

    tied = build_tiny_hf_dir(tmp_path / "tied", tie_word_embeddings=True)
    model = load_checkpoint(tied, device=torch.device("cpu"), dtype=torch.float32).model
    names = quantize_linears_nf4(model, skip=lambda name: False)
    assert "lm_head" not in names and len(names) == 14
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_adapter_matrices_are_never_quantized():
    class WithAdapter(nn.Module):  # the shape of a LoRA layer applied before quantizing
        def __init__(self) -> None:
            super().__init__()
            self.base_layer = nn.Linear(64, 64)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(64, 8, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(8, 64, bias=False)})

    model = nn.Sequential(WithAdapter())
    assert quantize_linears_nf4(model, skip=lambda name: False) == ["0.base_layer"]
    assert type(model[0].lora_A["default"]) is nn.Linear


def test_matches_torchao_nf4():
    """torchao's NF4Tensor (same layout, linear int8 double quant with 128/absmax) agrees
    code for code, except where a value falls within torchao's 4-decimal rounding of the
    code book of a decision boundary."""
    pytest.importorskip("torchao")
    try:
        from torchao.quantization import to_nf4  # torchao >= 0.1x
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4  # older releases
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(4))
    theirs = to_nf4(w, 64, 256)
    ours = quantize_nf4(w, 64, double_quant=True)
    ours_codes, their_codes = unpack(ours.codes), unpack(theirs.quantized_data)
    differ = ours_codes != their_codes
    assert differ.float().mean() < 1e-3
    assert torch.all((ours_codes - their_codes)[differ].abs() == 1)  # neighbours at a boundary
    absmax = w.view(-1, 64).abs().amax(1).repeat_interleave(64)  # (numel,)
    diff = (ours.dequantize() - theirs.get_original_weight()).view(-1).abs()
    assert torch.all(diff[~differ] <= 0.01 * absmax[~differ])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantize_on_load_equals_quantize_after_load(tmp_path, family):
    """Quantizing each block linear as it arrives (QLoRA's load path) gives the very model
    quantize_linears_nf4 makes from a full-precision load, biases included (Qwen2)."""
    import transformers
    from conftest import build_tiny_tokenizer_dir

    from weightsmith.quant.nf4 import quantize_on_load

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    build_tiny_tokenizer_dir(tmp_path)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        cls(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    )  # fmt: skip
    hf.save_pretrained(tmp_path)
    after = load_checkpoint(tmp_path, decode_layout=False).model
    names = quantize_linears_nf4(after)
    during = load_checkpoint(tmp_path, decode_layout=False, on_tensor=quantize_on_load()).model
    swapped = sorted(n for n, m in during.named_modules() if isinstance(m, NF4Linear))
    assert swapped == sorted(names) and len(names) == 2 * 7
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        assert torch.equal(during(ids), after(ids))
