"""Hook points and the logit lens against TransformerLens (4.x, TransformerBridge with no weight
processing) on a tiny random Llama loaded in both."""

from __future__ import annotations

import pytest
import torch

import weightsmith as ws
from weightsmith.inspect import hook_names
from weightsmith.inspect.lens import lens_logits, logit_lens, resid_names

transformer_lens = pytest.importorskip("transformer_lens")

PROMPT = "Once upon a time there was a small model"


@pytest.fixture(scope="module")
def both(tiny_hf_dir):
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    bridge = TransformerBridge.boot_transformers(str(tiny_hf_dir), hf_model=hf, tokenizer=tok, device="cpu")
    # TransformerLens folds norms into weights and centres them by default: off, for the raw model.
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    llm = ws.load(tiny_hf_dir, device="cpu")
    ids = llm.tokenizer.encode(PROMPT)
    assert ids == tok.encode(PROMPT)
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(torch.tensor([ids]))
    return llm, bridge, ids, tl_logits, tl_cache


def test_every_hook_point_matches_transformer_lens(both) -> None:
    llm, _, ids, tl_logits, tl_cache = both
    with llm.trace(ids) as t:
        pass
    names = hook_names(llm.model)
    assert set(names) <= set(t.keys())
    assert len(names) == 3 + 20 * llm.config.num_hidden_layers
    for name in names:
        ours, ref = t[name], tl_cache[name]
        assert ours.shape == ref.shape, name
        if name.endswith("hook_attn_scores"):  # masked entries: -inf here, a large negative there
            seen = torch.isfinite(ours)
            assert torch.equal(seen, ref > -1e4), name
            ours, ref = ours[seen], ref[seen]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(t.logits, tl_logits, atol=1e-4, rtol=1e-4)


def test_logit_lens_matches_transformer_lens(both) -> None:
    llm, bridge, ids, _, tl_cache = both
    lens = logit_lens(llm.model, ids, top_k=3)
    assert torch.equal(ws.inspect.logit_lens(llm, PROMPT, top_k=3).top_ids, lens.top_ids)
    names = resid_names(llm.model)
    with torch.no_grad():
        ref = torch.stack([bridge.unembed(bridge.ln_final(tl_cache[n][0])) for n in names])  # (L+1, T, V)
        ours = torch.stack([lens_logits(llm.model, tl_cache[n][0]) for n in names])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    ref_probs = ref.softmax(-1)
    torch.testing.assert_close(lens.top_probs, ref_probs.topk(3, dim=-1).values, atol=1e-4, rtol=1e-4)
    final = ref_probs[-1].argmax(-1)
    assert torch.equal(lens.target_ids, final)
    torch.testing.assert_close(
        lens.target_probs, ref_probs.gather(-1, final.expand(len(names), -1)[..., None])[..., 0]
    )
