"""Speculative decoding: a draft model changes the speed, never the greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_hf_dir

import weightsmith
from weightsmith.cli.main import main
from weightsmith.errors import GenerationError
from weightsmith.sampling import SamplingParams
from weightsmith.speculative import speculative_generate

PROMPTS = [[5, 17, 42], [100, 3, 3, 250, 7, 9, 11], [1]]


@pytest.fixture(scope="module")
def target(tiny_hf_dir):
    return weightsmith.load(tiny_hf_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return build_tiny_hf_dir(tmp_path_factory.mktemp("draft") / "tiny-draft", seed=1)


@pytest.fixture(scope="module")
def draft(draft_dir):
    return weightsmith.load(draft_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def near_draft(tiny_hf_dir):
    """The target with noise on its weights: agrees often but not always, so steps
    with some (not all, not none) proposals accepted are exercised."""
    llm = weightsmith.load(tiny_hf_dir, device="cpu", dtype="fp32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in llm.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std())
    return llm


_GREEDY: dict[tuple[int, ...], list[int]] = {}


def greedy(llm, prompt, n):
    """The target's plain greedy tokens (a prefix of one long run, computed once)."""
    key = (id(llm), *prompt)
    if key not in _GREEDY:
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        _GREEDY[key] = llm.engine.generate([prompt], params)[0].token_ids
    assert n <= 24
    return _GREEDY[key][:n]


def test_same_model_as_draft_accepts_everything(target):
    for prompt in PROMPTS:
        res = speculative_generate(target.model, target.model, prompt, max_tokens=20, k=4)
        assert res.tokens == greedy(target, prompt, 20)
        assert res.proposed > 0 and res.accepted == res.proposed
        assert res.acceptance_rate == 1.0
        # 1 prefill token, then 5 tokens (4 proposals + bonus) per target forward.
        assert res.target_forwards < 20


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("which", ["random", "near"])
def test_different_draft_still_gives_target_greedy_tokens(target, draft, near_draft, k, which):
    d = draft if which == "random" else near_draft
    proposed = accepted = 0
    for prompt in PROMPTS:
        for n in (1, 2, 17):
            res = speculative_generate(target.model, d.model, prompt, max_tokens=n, k=k)
            assert res.tokens == greedy(target, prompt, n), (prompt, n)
            assert res.finish_reason == "length"
            proposed, accepted = proposed + res.proposed, accepted + res.accepted
    assert proposed > 0 and accepted < proposed  # a different draft is not always right
    if which == "near":
        assert accepted > 0  # ...but this one sometimes is, so partial rollbacks ran


def test_stops_at_end_of_sequence_token(target, draft):
    prompt = PROMPTS[1]
    plain = greedy(target, prompt, 12)
    eos = plain[6]  # pretend the 7th greedy token ends the sequence
    cut = plain[: plain.index(eos) + 1]
    for d in (target, draft):
        res = speculative_generate(target.model, d.model, prompt, max_tokens=12, k=4, eos_token_ids={eos})
        assert res.tokens == cut
        assert res.finish_reason == "stop"


def test_mismatched_vocabulary_is_refused(target, tmp_path):
    small = weightsmith.load(
        build_tiny_hf_dir(tmp_path / "small", vocab_size=300), device="cpu", dtype="fp32"
    )
    with pytest.raises(GenerationError, match="300.*320"):
        speculative_generate(target.model, small.model, [5, 6], max_tokens=4)


def test_cli_generate_with_draft(tiny_hf_dir, draft_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    base = ["generate", str(tiny_hf_dir), "-p", "Once upon a time", "--temperature", "0", "-n", "10"]
    assert main([*base, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--draft", str(draft_dir), "--draft-k", "3", "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["text"] == plain["text"]
    assert spec["usage"] == plain["usage"]
    s = spec["speculative"]
    assert s["proposed"] > 0 and 0 <= s["accepted"] <= s["proposed"]
    assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["proposed"])
    assert 1 <= s["target_forwards"] <= 10
    # Sampling with a draft is refused with a one-line usage error.
    assert main([*base[:-4], "--draft", str(draft_dir), "--temperature", "0.7"]) != 0
    assert "greedy-only" in capsys.readouterr().err


def test_prompt_lookup_proposes_what_followed_the_latest_repeat():
    from weightsmith.speculative import LookupDrafter

    look = LookupDrafter(max_n=3)
    assert look.propose([1, 2, 3, 4, 9, 7, 1, 2, 3], 2) == [4, 9]
    assert look.propose([1, 2, 3, 4, 1, 2, 3, 5, 6, 1, 2, 3], 3) == [5, 6, 1]  # the latest repeat
    assert look.propose([8, 3, 4, 5, 6, 7, 3], 2) == [4, 5]  # no 3- or 2-gram repeat: the 1-gram
    assert look.propose([1, 2, 3, 4], 4) == []  # nothing repeats: nothing drafted
    assert LookupDrafter(max_n=2).propose([1, 2, 3, 1, 2], 1) == [3]
    assert LookupDrafter(max_n=3, min_n=3).propose([8, 3, 4, 5, 6, 7, 3], 2) == []  # no shorter match
    assert LookupDrafter(max_n=3, min_n=3).propose([1, 2, 3, 4, 1, 2, 3], 2) == [4, 1]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_prompt_lookup_gives_the_target_greedy_tokens(target, k):
    """Repetitive prompts (and a tiny random model's loops) give the lookup something to find;
    the tokens are the target's greedy ones whatever it proposes."""
    from weightsmith.speculative import LookupDrafter

    accepted = 0
    for prompt in ([*PROMPTS[1], *PROMPTS[1], *PROMPTS[1]], PROMPTS[0], [9, 8, 7, 9, 8, 7, 9]):
        res = speculative_generate(target.model, LookupDrafter(3), prompt, max_tokens=24, k=k,
                                   target_step=target.engine.decode_step())  # fmt: skip
        assert res.tokens == greedy(target, prompt, 24)
        assert res.target_forwards == 24 - res.accepted  # the prefill, then a forward per token not drafted
        accepted += res.accepted
    assert accepted > 0


def test_cli_generate_with_prompt_lookup(tiny_hf_dir, draft_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    base = ["generate", str(tiny_hf_dir), "-p", "Once upon a time, once upon a time, once upon", "--temperature",
            "0", "-n", "16", "--json"]  # fmt: skip
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--prompt-lookup", "2", "--draft-k", "5"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["text"] == plain["text"] and spec["usage"] == plain["usage"]
    assert spec["speculative"]["target_forwards"] == 16 - spec["speculative"]["accepted"]
    for bad, says in ((["--prompt-lookup", "0"], "at least 1"), (["--prompt-lookup", "2", "--draft", str(draft_dir)],
                      "choose one"), (["--prompt-lookup", "2", "--temperature", "0.7"], "greedy-only")):  # fmt: skip
        assert main([*base, *bad]) == 2
        assert says in capsys.readouterr().err
