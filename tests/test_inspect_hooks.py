"""Hook points on every family, quantized and adapted models; edits; the swap leaves no trace."""

from __future__ import annotations

import copy

import pytest
import torch
from test_model_parity import FAMILIES, make_pair

from weightsmith.cpu_decode import prepare_cpu_decode
from weightsmith.inspect import Ablate, Add, InspectError, ProjectOut, Replace, hook_names, run_hooked
from weightsmith.inspect.hooks import HookedModel
from weightsmith.lora import LoraConfig, apply_lora
from weightsmith.models.model import CausalLM
from weightsmith.quant.weight_only import quantize_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 150, 7, 64, 12, 88, 31, 9]])


def _plain(model: CausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hooked_forward_is_the_models_own(name: str) -> None:
    """Every hook point kept (attention written out) gives the model's logits; a family whose
    modules the hooks cannot write out is refused in one line, never run wrongly."""
    _, model = make_pair(name)
    try:
        logits, cache = run_hooked(model, IDS, keep="all")
    except InspectError as e:
        assert "not available" in str(e)
        return
    torch.testing.assert_close(logits, _plain(model), atol=1e-5, rtol=1e-5)
    assert set(cache) == set(hook_names(model))
    torch.testing.assert_close(cache[f"blocks.{len(model.model.layers) - 1}.hook_resid_post"][0, -1],
                               model.hidden_states(IDS)[0, -1].detach(), atol=1e-5, rtol=1e-5)  # fmt: skip


def _classes(model: torch.nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def test_the_swap_is_undone_and_the_fast_paths_return() -> None:
    _, model = make_pair("llama")
    plan = prepare_cpu_decode(model)
    before = _classes(model)
    seen = []
    run_hooked(model, IDS, keep="all", edits={"hook_embed": lambda x, n: seen.append(type(model)) or x})
    assert seen and issubclass(seen[0], HookedModel)  # the fused C step only takes a plain CausalLM
    assert _classes(model) == before and type(model) is CausalLM
    assert not any(hasattr(m, "_ws_state") for m in model.modules())
    plan.undo()

    def fail(x: torch.Tensor, name: str) -> torch.Tensor:
        raise RuntimeError(name)

    with pytest.raises(RuntimeError):  # an edit that fails still puts every class back
        run_hooked(model, IDS, edits={"blocks.1.hook_resid_mid": fail})
    assert type(model) is CausalLM and _classes(model) == _classes(make_pair("llama")[1])


def test_quantized_and_adapted_models_are_traced() -> None:
    _, model = make_pair("llama")
    quantize_model(model, 4, 32)
    logits, cache = run_hooked(model, IDS, keep=["blocks.2.attn.hook_z"])
    torch.testing.assert_close(logits, _plain(model), atol=1e-5, rtol=1e-5)
    _, model = make_pair("llama")
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    logits, cache = run_hooked(model, IDS, keep="all")
    torch.testing.assert_close(logits, _plain(model), atol=1e-5, rtol=1e-5)


def test_ablating_a_head_equals_zeroing_its_output_weights() -> None:
    _, model = make_pair("llama")
    logits, cache = run_hooked(
        model, IDS, edits={"blocks.1.attn.hook_z": Ablate(heads=[2])}, keep=["blocks.1.attn.hook_z"]
    )
    assert cache["blocks.1.attn.hook_z"][:, :, 2].abs().max() == 0
    assert cache["blocks.1.attn.hook_z"][:, :, 1].abs().max() > 0
    manual = copy.deepcopy(model)
    d = manual.config.head_dim
    with torch.no_grad():
        manual.model.layers[1].self_attn.o_proj.weight[:, 2 * d : 3 * d] = 0
    torch.testing.assert_close(logits, _plain(manual), atol=1e-5, rtol=1e-5)
    assert (logits - _plain(model)).abs().max() > 1e-3


def test_add_replace_and_project_out() -> None:
    _, model = make_pair("llama")
    h = model.config.hidden_size
    v = torch.randn(h)
    _, base = run_hooked(model, IDS, keep=["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"])
    _, added = run_hooked(model, IDS, edits={"blocks.1.hook_resid_pre": Add(v, 2.0, positions=[-1])},
                          keep=["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"])  # fmt: skip
    diff = added["blocks.1.hook_resid_pre"] - base["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(diff[0, -1], 2.0 * v)
    assert diff[0, :-1].abs().max() == 0
    torch.testing.assert_close(added["blocks.0.hook_resid_post"], base["blocks.0.hook_resid_post"])
    # Replacing a value by itself changes nothing, even before RoPE (undone and redone).
    _, q = run_hooked(model, IDS, keep=["blocks.2.attn.hook_q", "blocks.2.attn.hook_k"])
    logits, _ = run_hooked(model, IDS, edits={"blocks.2.attn.hook_q": Replace(q["blocks.2.attn.hook_q"]),
                                              "blocks.2.attn.hook_k": Replace(q["blocks.2.attn.hook_k"])})  # fmt: skip
    torch.testing.assert_close(logits, _plain(model), atol=1e-5, rtol=1e-5)
    _, out = run_hooked(
        model, IDS, edits={"blocks.0.hook_resid_post": ProjectOut(v)}, keep=["blocks.0.hook_resid_post"]
    )
    along = out["blocks.0.hook_resid_post"] @ (v / v.norm())
    assert along.abs().max() < 1e-5


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "smollm3", "olmo2"])
def test_queries_before_rope_and_gemmas_output_norms(name: str) -> None:
    """`hook_q` is each layer's query before RoPE: QK-normed (Gemma 3), unturned with the sliding
    layers' own RoPE base (Gemma 3's layers 0 and 2), or never turned (SmolLM3's NoPE layer);
    replaced by itself it changes nothing. Gemma's and OLMo 2's output norms have their own hooks
    (OLMo 2, with no norm before attention or MLP, no `ln1`/`ln2` ones; its QK-norm spans all
    heads)."""
    _, model = make_pair(name)
    _, cache = run_hooked(model, IDS, keep="all")
    normed = name.startswith(("gemma", "olmo"))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = cache[f"blocks.{i}.hook_resid_pre"]
            x = layer.input_layernorm(x) if name != "olmo2" else x
            q = attn.q_proj(x)
            q = attn.q_norm(q) if name == "olmo2" else q
            q = q.view(*x.shape[:2], attn.n_heads, attn.head_dim)
            q = attn.q_norm(q) if hasattr(attn, "q_norm") and name != "olmo2" else q
            torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_q"], q, atol=1e-5, rtol=1e-5)
            assert (f"blocks.{i}.ln2_post.hook_normalized" in cache) is normed
            assert (f"blocks.{i}.ln1.hook_scale" in cache) is (name != "olmo2")
    edits = {f"blocks.{i}.attn.hook_q": Replace(cache[f"blocks.{i}.attn.hook_q"]) for i in range(3)}
    logits, _ = run_hooked(model, IDS, edits=edits)
    torch.testing.assert_close(logits, _plain(model), atol=1e-5, rtol=1e-5)


def test_bad_names_and_selections_are_one_line() -> None:
    _, model = make_pair("llama")
    with pytest.raises(
        InspectError,
        match=r"unknown hook point 'blocks\.1\.hook_resid_psot'.*did you mean 'blocks\.1\.hook_resid_post'",
    ):
        run_hooked(model, IDS, keep=["blocks.1.hook_resid_psot"])
    with pytest.raises(InspectError, match="layers 0..2"):
        run_hooked(model, IDS, keep=["blocks.7.hook_resid_post"])
    with pytest.raises(InspectError, match="no heads axis"):
        run_hooked(model, IDS, edits={"blocks.0.hook_resid_post": Ablate(heads=[0])})
    with pytest.raises(InspectError, match="head 9 is out of range"):
        run_hooked(model, IDS, edits={"blocks.0.attn.hook_z": Ablate(heads=[9])})
    assert type(model) is CausalLM
