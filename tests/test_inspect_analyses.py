"""The analyses against their definitions: patching equals a manual re-run, integrated gradients
are complete, direct logit attribution sums to the logit, attention patterns are causal."""

from __future__ import annotations

import pytest
import torch
from test_model_parity import make_pair

from weightsmith.inspect import InspectError, Replace, run_hooked
from weightsmith.inspect.attribution import attention_patterns, integrated_gradients
from weightsmith.inspect.lens import direct_logit_attribution
from weightsmith.inspect.patching import logit_difference, patch

CLEAN = [5, 17, 42, 99, 3, 150, 7, 64]
CORRUPT = [5, 17, 42, 120, 3, 150, 7, 64]  # one token differs, at position 3


@pytest.fixture(scope="module")
def model():
    return make_pair("llama", seed=3)[1]


def _answers(model) -> tuple[int, int]:
    clean = run_hooked(model, torch.tensor([CLEAN]))[0][0, -1]
    corrupt = run_hooked(model, torch.tensor([CORRUPT]))[0][0, -1]
    # A tiny random model often predicts the same token for both: contrast with the token the
    # corruption raised most, so the clean and corrupted runs differ on the metric.
    return int(clean.argmax()), int((corrupt - clean).argmax())


def test_patching_by_position_equals_a_manual_rerun(model) -> None:
    answer, wrong = _answers(model)
    metric = logit_difference(answer, wrong)
    result = patch(model, CLEAN, CORRUPT, metric, by="position", stream="resid_pre")
    assert result.values.shape == (3, len(CLEAN))
    _, clean_cache = run_hooked(model, torch.tensor([CLEAN]), keep=["blocks.1.hook_resid_pre"])
    for pos in (2, 3, 7):
        edit = Replace(clean_cache["blocks.1.hook_resid_pre"], positions=[pos])
        logits, _ = run_hooked(model, torch.tensor([CORRUPT]), edits={"blocks.1.hook_resid_pre": edit})
        assert float(metric(logits)[0]) == pytest.approx(float(result.values[1, pos]), abs=1e-5)
    # At the embedding only the differing token carries the difference: all of it there, none elsewhere.
    norm = result.normalized
    assert float(norm[0, 3]) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(norm[0, [0, 1, 2, 4, 5, 6, 7]], torch.zeros(7), atol=1e-5)
    assert result.clean_metric != result.corrupt_metric


def test_patching_by_head_equals_a_manual_rerun(model) -> None:
    answer, wrong = _answers(model)
    metric = logit_difference(answer, wrong)
    result = patch(model, CLEAN, CORRUPT, metric, by="head")
    assert result.values.shape == (3, 4)
    _, clean_cache = run_hooked(model, torch.tensor([CLEAN]), keep=["blocks.2.attn.hook_z"])
    edit = Replace(clean_cache["blocks.2.attn.hook_z"], heads=[1])
    logits, _ = run_hooked(model, torch.tensor([CORRUPT]), edits={"blocks.2.attn.hook_z": edit})
    assert float(metric(logits)[0]) == pytest.approx(float(result.values[2, 1]), abs=1e-5)


def test_patching_needs_prompts_of_one_length(model) -> None:
    with pytest.raises(InspectError, match="same token count"):
        patch(model, CLEAN, CORRUPT[:-1], logit_difference(1, 2))


def test_integrated_gradients_are_complete(model) -> None:
    answer, wrong = _answers(model)
    ig = integrated_gradients(model, CLEAN, answer, contrast=wrong, steps=32)
    assert ig.scores.shape == (len(CLEAN),)
    assert abs(ig.output - ig.baseline_output) > 0.1
    assert ig.completeness_error < 1e-3
    coarse = integrated_gradients(model, CLEAN, answer, contrast=wrong, steps=1)
    assert coarse.completeness_error > ig.completeness_error  # the check can fail: one step is crude


def test_direct_logit_attribution_sums_to_the_logit(model) -> None:
    answer, wrong = _answers(model)
    for contrast in (None, wrong):
        dla = direct_logit_attribution(model, CLEAN, answer, contrast=contrast)
        assert dla.total() == pytest.approx(dla.logit, abs=1e-4)
        torch.testing.assert_close(dla.heads.sum(1), dla.attn, atol=1e-4, rtol=1e-4)  # no o_proj bias
    biased = make_pair("qwen2")[1]  # attention biases, no output-projection bias
    dla = direct_logit_attribution(biased, CLEAN, 7)
    assert dla.total() == pytest.approx(dla.logit, abs=1e-4)


@pytest.mark.parametrize("name", ["gemma3", "gemma3-softcap", "gemma2", "olmo2"])
def test_direct_logit_attribution_through_gemmas_norms(name) -> None:
    """Gemma: the embedding scaled by sqrt(hidden), (1 + w) norms, each head through the attention's
    output norm (its scale frozen), the final soft-cap left out: the parts still sum to the logit
    before the cap, which is the model's own capped logit undone, and the heads to their block."""
    gemma = make_pair(name, seed=3)[1]
    dla = direct_logit_attribution(gemma, CLEAN, 7, contrast=9)
    assert dla.total() == pytest.approx(dla.logit, abs=1e-4)
    torch.testing.assert_close(dla.heads.sum(1), dla.attn, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        out = gemma(torch.tensor([CLEAN]))[0, -1].double()
    cap = gemma.config.final_logit_softcapping
    if cap is not None:
        out = cap * torch.atanh(out / cap)
    assert dla.logit == pytest.approx(float(out[7] - out[9]), abs=1e-4)


def test_attention_patterns_are_causal_distributions(model) -> None:
    pat = attention_patterns(model, CLEAN)
    assert pat.shape == (3, 4, len(CLEAN), len(CLEAN))
    torch.testing.assert_close(pat.sum(-1), torch.ones(3, 4, len(CLEAN)))
    assert pat.triu(1).abs().max() == 0
