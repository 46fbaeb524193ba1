"""Per-row LoRA (`row_adapters`): each batch row runs with its own adapter, or none.

What is checked, on a tiny random Llama with two adapters of different ranks and targets:
- every row's logits equal that row run alone with `set_adapter` (or `adapters_disabled`),
  for full-sequence forwards and for prefill + cached decode steps of uneven prompts;
- the active adapter is ignored inside, and one adapter for every row matches set_adapter;
- errors leave the model untouched: an unknown or merged adapter, a batch of another size, an
  adapter inside a mixture of experts; the previous state comes back on exit, also on errors;
- gradients reach only the adapters the rows use.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_hf_dir, build_tiny_tokenizer_dir
from torch import nn

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.errors import ConfigError
from weightsmith.generate import decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.lora import (
    LoraConfig,
    adapters_disabled,
    apply_lora,
    lora_layers,
    merge_adapter,
    row_adapters,
    set_adapter,
    unmerge_adapter,
)

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
SMALL.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CPU = torch.device("cpu")
NAMES = ["a", None, "b", "a", "b"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_dir(tmp_path_factory.mktemp("rows") / "tiny-llama", **SMALL)


def randomize(model: nn.Module, name: str, seed: int) -> None:
    """Non-zero A and B for adapter `name`, so its delta shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_A:
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def two_adapters(path: Path) -> nn.Module:
    """ "a": rank 4 on every decoder linear; "b": rank 2 on a few, the LM head included."""
    model = load_checkpoint(path, device=CPU, dtype=torch.float32).model
    apply_lora(model, LoraConfig(r=4, alpha=8), "a")
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=targets, layers_to_transform=[1]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    return model


def token_ids(rows: int, t: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (rows, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def alone(model: nn.Module, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """Logits of `ids` with only adapter `name` (None: the base model)."""
    if name is None:
        with adapters_disabled(model):
            return model(ids)
    set_adapter(model, name)
    return model(ids)


def row_state(model: nn.Module) -> dict[str, tuple]:
    return {n: (m.active_adapter, m.row_groups, m.row_count) for n, m in lora_layers(model).items()}


def test_each_row_gets_its_own_adapter(llama_dir):
    model = two_adapters(llama_dir)
    ids = token_ids(len(NAMES))
    set_adapter(model, "b")  # ignored inside row_adapters
    with torch.no_grad(), row_adapters(model, NAMES):
        got = model(ids)  # (B, T, V)
    for i, name in enumerate(NAMES):
        expected = alone(model, ids[i : i + 1], name)[0]
        torch.testing.assert_close(got[i], expected, rtol=0, atol=ATOL)
        # The choice of adapter matters for this row: every other choice gives other logits.
        for other in {"a", "b", None} - {name}:
            assert (alone(model, ids[i : i + 1], other)[0] - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["a", "b", None])
def test_one_choice_for_every_row_equals_the_whole_batch_alone(llama_dir, name):
    model = two_adapters(llama_dir)
    ids = token_ids(3, seed=1)
    set_adapter(model, "a" if name != "a" else "b")
    with torch.no_grad(), row_adapters(model, [name] * 3):
        got = model(ids)
    torch.testing.assert_close(got, alone(model, ids, name), rtol=0, atol=ATOL)


def test_rows_through_a_kv_cache_prefill_and_decode(llama_dir):
    """Uneven prompts (unaligned rows), then decode steps of one token per row."""
    model = two_adapters(llama_dir)
    cfg = model.config
    prompts = [token_ids(1, t, seed=t)[0].tolist() for t in (5, 8, 3, 6, 7)]
    steps = [[7, 11, 13, 17, 19], [23, 29, 31, 37, 41], [43, 47, 53, 59, 61]]
    cache = KVCache.for_model(cfg, len(NAMES), 32, dtype=torch.float32, device=CPU)
    with row_adapters(model, NAMES):
        got = [prefill(model, cache, prompts, CPU)]  # (B, V)
        got += [decode_one_token(model, cache, step, CPU) for step in steps]
    for i, name in enumerate(NAMES):
        own = KVCache.for_model(cfg, 1, 32, dtype=torch.float32, device=CPU)
        with only(model, name):
            expected = [prefill(model, own, [prompts[i]], CPU)]
            expected += [decode_one_token(model, own, [step[i]], CPU) for step in steps]
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g[i], e[0], rtol=0, atol=ATOL)


def only(model: nn.Module, name: str | None) -> contextlib.AbstractContextManager:
    """The single-adapter way of running `name`: set it active, or disable adapters for None."""
    if name is None:
        return adapters_disabled(model)
    set_adapter(model, name)
    return contextlib.nullcontext()


def test_unknown_adapter_is_refused_and_nothing_changes(llama_dir):
    model = two_adapters(llama_dir)
    before = row_state(model)
    with pytest.raises(ConfigError, match=r"no adapter named 'c' \(adapters: \['a', 'b'\]\)"):
        with row_adapters(model, ["a", "c", None]):
            pytest.fail("the body must not run")
    assert row_state(model) == before
    assert all(groups is None for _, groups, _ in before.values())


def test_state_is_restored_on_exit_and_on_errors(llama_dir):
    model = two_adapters(llama_dir)
    set_adapter(model, "b")
    before = row_state(model)
    layers = lora_layers(model)
    with row_adapters(model, NAMES):
        q = layers["model.layers.1.self_attn.q_proj"]  # has both adapters
        gate = layers["model.layers.1.mlp.gate_proj"]  # has only "a"
        assert [(n, rows.tolist()) for n, rows in q.row_groups] == [("a", [0, 3]), ("b", [2, 4])]
        assert [(n, rows.tolist()) for n, rows in gate.row_groups] == [("a", [0, 3])]
        assert q.row_groups[0][1] is gate.row_groups[0][1]  # one index tensor, shared
        assert q.row_count == len(NAMES) and q.active_adapter == "b"
        with row_adapters(model, [None, "b"]):  # nested: the outer groups come back after
            assert [n for n, _ in q.row_groups] == ["b"]
        assert [n for n, _ in q.row_groups] == ["a", "b"]
    assert row_state(model) == before
    with pytest.raises(RuntimeError, match="boom"), row_adapters(model, NAMES):
        raise RuntimeError("boom")
    assert row_state(model) == before
    # Back to the active adapter for the whole batch.
    ids = token_ids(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), alone(model, ids, "b"), rtol=0, atol=0)


def test_merged_adapter_is_refused(llama_dir):
    model = two_adapters(llama_dir)
    merge_adapter(model, "a")
    before = row_state(model)
    with pytest.raises(ConfigError, match=r"\['a'\] are merged"):
        with row_adapters(model, ["a", None]):
            pytest.fail("the body must not run")
    # A merged adapter would also be in the base-only rows' weights.
    with pytest.raises(ConfigError, match="merged"), row_adapters(model, [None, "b"]):
        pytest.fail("the body must not run")
    assert row_state(model) == before
    unmerge_adapter(model, "a")
    with row_adapters(model, ["a", None]):
        assert lora_layers(model)["lm_head"].row_groups == []  # "a" does not adapt the LM head


def test_batch_of_another_size_is_refused(llama_dir):
    model = two_adapters(llama_dir)
    with torch.no_grad(), row_adapters(model, ["a", "b", None]):
        with pytest.raises(ConfigError, match="3 adapter names but a LoRA layer got a batch of 2 rows"):
            model(token_ids(2))


def test_adapter_inside_a_mixture_of_experts_is_refused(tmp_path):
    build_tiny_tokenizer_dir(tmp_path)
    torch.manual_seed(0)
    mixtral = transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(mixtral).save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path, device=CPU, dtype=torch.float32).model
    apply_lora(model, LoraConfig(r=2, alpha=4), "experts")  # all-linear: experts included
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]), "attention")
    randomize(model, "attention", seed=4)
    with pytest.raises(ConfigError, match="mixture of experts"), row_adapters(model, ["experts", None]):
        pytest.fail("the body must not run")
    # Adapters only outside the experts are served per row.
    ids = token_ids(2, seed=5)
    with torch.no_grad(), row_adapters(model, ["attention", None]):
        got = model(ids)
    torch.testing.assert_close(got[0], alone(model, ids[:1], "attention")[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1], alone(model, ids[1:], None)[0], rtol=0, atol=ATOL)


def test_gradients_reach_only_the_adapters_rows_use(llama_dir):
    model = two_adapters(llama_dir)
    ids = token_ids(3, seed=6)
    q = lora_layers(model)["model.layers.1.self_attn.q_proj"]
    with row_adapters(model, [None, "b", None]):
        model(ids)[1].square().mean().backward()
    assert q.lora_B["b"].weight.grad is not None and q.lora_B["b"].weight.grad.abs().sum() > 0
    assert q.lora_B["a"].weight.grad is None
    # The gradient equals the one from the row alone with "b" active.
    grad = q.lora_B["b"].weight.grad.clone()
    q.lora_B["b"].weight.grad = None
    set_adapter(model, "b")
    model(ids[1:2])[0].square().mean().backward()
    torch.testing.assert_close(grad, q.lora_B["b"].weight.grad, rtol=1e-4, atol=1e-6)
