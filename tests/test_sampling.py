"""Next-token selection (weightsmith.sampling) against transformers' logits processors.

What is checked:
- `probabilities()` keeps exactly the tokens transformers' Temperature -> TopK -> TopP -> MinP
  warpers keep (the order transformers' `generate` applies them, and ours), with the same
  renormalised probabilities, on random logits with ties and -inf entries;
- `apply_repetition_penalty` equals `RepetitionPenaltyLogitsProcessor`, and `Sampler` applies it
  over the prompt and every token it has picked;
- `Sampler`: greedy is argmax, a seed fixes the sequence, different seeds differ, and empirical
  frequencies match the filtered distribution (a chi-square bound computed from the sample size);
- presence/frequency penalties: the logits reaching the filters follow OpenAI's formula over the
  generated tokens only (prompt excluded), after the repetition penalty; a frequency penalty
  changes greedy picks;
- `SamplingParams` rejects each bad value with a GenerationError that names the field.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsmith import sampling
from weightsmith.errors import GenerationError
from weightsmith.sampling import (
    Sampler,
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    probabilities,
)

transformers = pytest.importorskip("transformers")

VOCAB = 1000
CPU = torch.device("cpu")
NO_INPUT = torch.zeros((1, 1), dtype=torch.long)  # the warpers ignore input_ids


def random_logits(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    """Gaussian logits with many exact ties (one at the maximum) and a block of -inf entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(vocab, generator=g) * 3
    idx = torch.randperm(vocab, generator=g)
    x[idx[: vocab // 10]] = x[idx[vocab // 10 : vocab // 5]]  # 10% of tokens tie with another token
    x[idx[vocab // 5]] = x.max()  # a tie at the top
    x[idx[vocab // 4 : vocab // 4 + vocab // 20]] = float("-inf")
    return x


def reference_probabilities(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """transformers' warpers, switched on exactly when its `generate` switches them on."""
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(transformers.MinPLogitsWarper(min_p))
    scores = logits[None].clone()
    for warper in warpers:
        scores = warper(NO_INPUT, scores)
    return scores.softmax(-1)[0]


def top_p_boundary(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The tokens where a top-p rule may rightly differ from transformers': those tied with the
    least likely token transformers keeps (it splits a tie by its unstable sort's order; we keep
    the tie whole) and those whose mass at or below sits within float rounding of 1 - top_p."""
    if top_p >= 1.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    scores = transformers.TemperatureLogitsWarper(temperature)(NO_INPUT, logits[None].clone())
    if top_k:
        scores = transformers.TopKLogitsWarper(top_k)(NO_INPUT, scores)
    kept = transformers.TopPLogitsWarper(top_p)(NO_INPUT, scores.clone())[0] > float("-inf")
    x = scores[0]
    probs = x.double().softmax(-1)
    order = torch.sort(x).indices
    last_of_value = torch.searchsorted(x[order].contiguous(), x, right=True) - 1
    at_or_below = probs[order].cumsum(0)[last_of_value]  # the mass of the tokens no more likely
    near = (at_or_below - (1 - top_p)).abs() < 1e-5
    return near | (x == x[kept].min())


def assert_same_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
):
    ours = probabilities(logits, temperature, top_k, top_p, min_p)
    ref = reference_probabilities(logits, temperature, top_k, top_p, min_p)
    kept, ref_kept = ours > 0, ref > 0
    assert kept.any()
    differ = kept != ref_kept
    assert not (differ & ~top_p_boundary(logits, temperature, top_k, top_p)).any(), (
        f"kept {int(kept.sum())} tokens, transformers kept {int(ref_kept.sum())}; "
        f"differ at {torch.nonzero(differ).flatten().tolist()[:10]}"
    )
    if differ.any():  # a tie or a rounding at top-p's boundary: the rest of the chain on our tokens
        nucleus = probabilities(logits, temperature, top_k, top_p, 0.0) > 0
        scores = (logits / temperature).masked_fill(~nucleus, float("-inf"))[None]
        if min_p:
            scores = transformers.MinPLogitsWarper(min_p)(NO_INPUT, scores)
        ref = scores.softmax(-1)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(ours.sum()), 1.0, rel_tol=1e-5)


# ----- filtering parity ------------------------------------------------------------------------


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("top_k", [0, 1, 5, 50])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
def test_filters_match_transformers(top_p: float, top_k: int, min_p: float) -> None:
    for seed in range(3):
        logits = random_logits(seed)
        for temperature in (0.5, 1.0, 1.7):
            assert_same_distribution(logits, temperature, top_k, top_p, min_p)


@settings(max_examples=150, deadline=None, derandomize=True)  # `make test` is repeatable
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.sampled_from([2, 7, 64, VOCAB]),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, VOCAB + 10),
    top_p=st.floats(0.0, 1.0, exclude_min=True),
    min_p=st.floats(0.0, 1.0, exclude_max=True),
)
def test_filters_match_transformers_any_values(
    seed: int, vocab: int, temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3
    logits[: vocab // 3] = logits[vocab // 3 : 2 * (vocab // 3)]  # ties
    assert_same_distribution(logits, temperature, top_k, top_p, min_p)


def test_filters_keep_ties_at_the_top_k_boundary() -> None:
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, float("-inf")])
    assert torch.equal(probabilities(logits, 1.0, 2, 1.0, 0.0) > 0, torch.tensor([1, 1, 1, 1, 0, 0]).bool())
    assert_same_distribution(logits, 1.0, 2, 1.0, 0.0)


def test_top_p_keeps_a_tie_at_its_boundary_whole() -> None:
    """Top-p drops a token when the tokens no more likely than it hold at most 1 - top_p: two
    tied most likely tokens stay together however small top_p is (transformers keeps one of
    them, whichever its sort put last), and a tie lower down stays or goes as one."""
    two_top = torch.tensor([2.0, 0.0, 2.0, -1.0])
    assert (probabilities(two_top, 1.0, 0, 0.05, 0.0) > 0).tolist() == [True, False, True, False]
    hf = reference_probabilities(two_top, 1.0, 0, 0.05, 0.0) > 0
    assert int(hf.sum()) == 1 and bool(hf[0] | hf[2])
    # probabilities 0.5, 0.2, 0.2, 0.1: a top_p of 0.6 needs one of the 0.2s, so both stay
    tie_below = torch.tensor([0.5, 0.2, 0.2, 0.1]).log()
    assert (probabilities(tie_below, 1.0, 0, 0.6, 0.0) > 0).tolist() == [True, True, True, False]
    assert (probabilities(tie_below, 1.0, 0, 0.5, 0.0) > 0).tolist() == [True, False, False, False]


def test_top_p_widening_past_the_first_candidates_equals_sorting_everything(monkeypatch) -> None:
    """A flat distribution whose nucleus holds thousands of tokens widens the candidates until
    the mass outside them may be dropped; the kept tokens are those of one sort over the whole
    vocabulary, and a row keeps them whether or not its batch had to widen."""
    vocab = 49_152
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(vocab, generator=g) * 0.5
    peaked = torch.randn(vocab, generator=g) * 6
    rows = torch.stack([flat, peaked])
    widened = probabilities(rows, 1.0, 0, [0.97, 0.9], 0.0)
    assert int((widened[0] > 0).sum()) > 10 * sampling.NUCLEUS_FIRST
    assert torch.equal(widened[1], probabilities(peaked, 1.0, 0, 0.9, 0.0))  # alone: no widening
    monkeypatch.setattr(sampling, "NUCLEUS_FIRST", vocab)
    assert torch.equal(widened, probabilities(rows, 1.0, 0, [0.97, 0.9], 0.0))
    for row, top_p in ((flat, 0.97), (peaked, 0.9)):
        assert_same_distribution(row, 1.0, 0, top_p, 0.0)


def test_top_k_larger_than_the_finite_tokens_keeps_them_all() -> None:
    logits = torch.tensor([1.0, float("-inf"), 0.5, float("-inf")])
    probs = probabilities(logits, 1.0, 3, 1.0, 0.0)
    assert torch.equal(probs > 0, torch.tensor([True, False, True, False]))
    assert_same_distribution(logits, 1.0, 3, 1.0, 0.0)


# ----- repetition penalty -----------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repetition_penalty_matches_transformers(seed: int, penalty: float) -> None:
    logits = random_logits(seed)
    logits[:3] = torch.tensor([0.0, 2.5, -2.5])
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [torch.tensor([0, 1, 2, 1]), torch.randint(0, VOCAB, (200,), generator=g)]
    )  # with repeats
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[ids] = True
    assert (logits[seen] > 0).any() and (logits[seen] < 0).any() and (logits[~seen] > 0).any()

    ours = apply_repetition_penalty(logits, seen, penalty)
    ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids[None], logits[None].clone())[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.equal(ours[~seen], logits[~seen])
    assert not torch.equal(ours, logits)


def test_sampler_penalises_prompt_and_generated_tokens() -> None:
    """Greedy with a penalty: each pick equals argmax of transformers' processor over prompt + picks."""
    logits = torch.rand(VOCAB, generator=torch.Generator().manual_seed(0)) - 1  # in [-1, 0)
    a, b, c = 10, 20, 30
    logits[a], logits[b], logits[c] = 2.0, 1.8, 1.5
    prompt = [a, 5, 6, 5]
    penalty = 1.5
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=penalty), prompt, VOCAB, CPU)
    before = logits.clone()
    history = list(prompt)
    picks = []
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty)
    for _ in range(6):
        token = sampler(logits)
        expected = int(processor(torch.tensor([history]), logits[None].clone())[0].argmax())
        assert token == expected
        history.append(token)
        picks.append(token)
    assert torch.equal(logits, before), "the sampler must not modify the caller's logits"
    # The penalty mattered: the prompt's token lost the first pick, and picks are penalised too.
    assert picks[:3] == [b, c, a]


# ----- Sampler --------------------------------------------------------------------------------------


def test_greedy_picks_argmax() -> None:
    for seed in range(5):
        logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))
        sampler = Sampler(SamplingParams(temperature=0, top_k=3, top_p=0.5, seed=seed), [], VOCAB, CPU)
        assert sampler(logits) == int(logits.argmax())
    # Ties go to the first maximal index, as torch.argmax (and so transformers' greedy search) does.
    tied = torch.tensor([0.0, 5.0, 1.0, 5.0])
    assert Sampler(SamplingParams(temperature=0), [], 4, CPU)(tied) == 1


def draw(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    sampler = Sampler(params, [], logits.shape[-1], CPU)
    return [sampler(logits) for _ in range(n)]


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    runs = {seed: draw(SamplingParams(temperature=1.0, seed=seed), logits, 50) for seed in range(10)}
    for seed, tokens in runs.items():
        assert draw(SamplingParams(temperature=1.0, seed=seed), logits, 50) == tokens
        assert len(set(tokens)) > 1
    assert len({tuple(t) for t in runs.values()}) == len(runs)
    # Without a seed, two samplers draw from different random streams.
    unseeded = [draw(SamplingParams(temperature=1.0), logits, 50) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def chi_square_quantile(df: int, alpha: float) -> float:
    """Upper `alpha` quantile of the chi-square distribution (Wilson-Hilferty approximation)."""
    z = NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor, n: int) -> float:
    keep = expected_probs > 0
    expected = expected_probs[keep] * n
    return float(((counts[keep] - expected) ** 2 / expected).sum())


def test_sampled_frequencies_match_the_filtered_distribution() -> None:
    base = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0])
    logits = base.log()  # the last token is -inf
    temperature, top_k = 0.8, 5
    # Independent expectation: p^(1/T) renormalised over the five most likely tokens.
    expected = base ** (1 / temperature)
    expected[top_k:] = 0
    expected /= expected.sum()

    n = 20_000
    tokens = draw(SamplingParams(temperature=temperature, top_k=top_k, seed=1234), logits, n)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(base)).double()
    assert counts[top_k:].sum() == 0, "a filtered-out token was sampled"

    df = top_k - 1
    threshold = chi_square_quantile(df, alpha=1e-6)  # a false alarm once in a million seeds
    assert chi_square(counts, expected.double(), n) < threshold
    # The bound has power: the unfiltered, untempered distribution is rejected.
    wrong = base[:top_k].double() / base[:top_k].sum()
    assert chi_square(counts[:top_k], wrong, n) > threshold


def test_a_large_vocabulary_is_sampled_in_proportion_to_its_probabilities() -> None:
    """Inverse transform sampling over a 16,384-token vocabulary: the tokens, cut into 40 bins of about equal expected mass (the tail, where the float64 sums'
    rounding would show first, in bins of its own), are drawn at the rates the probabilities
    give, by a chi-square bound; a token of probability 0 is never drawn."""
    vocab, rows, steps = 16_384, 250, 40
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(vocab, generator=g) * 4
    logits[torch.randperm(vocab, generator=g)[:1000]] = float("-inf")
    probs = logits.double().softmax(-1)
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=s), [], vocab, CPU) for s in range(rows)]
    counts = torch.zeros(vocab, dtype=torch.float64)
    batch = logits.expand(rows, vocab)
    for _ in range(steps):
        counts += torch.bincount(torch.tensor(sampling.sample_batch(samplers, batch)), minlength=vocab)
    n = rows * steps
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    order = probs.argsort()  # least likely first: the low tail gets its own bins
    mass = probs[order].cumsum(0)
    bins = torch.bucketize(mass, torch.linspace(0, 1, 41)[1:-1].double())
    expected = torch.zeros(40, dtype=torch.float64).index_add_(0, bins, probs[order])
    observed = torch.zeros(40, dtype=torch.float64).index_add_(0, bins, counts[order])
    threshold = chi_square_quantile(39, alpha=1e-6)
    assert chi_square(observed, expected, n) < threshold
    # The bound has power: the same draws against probabilities at temperature 1.1 are rejected.
    hotter = (logits.double() / 1.1).softmax(-1)[order]
    wrong = torch.zeros(40, dtype=torch.float64).index_add_(0, bins, hotter)
    assert chi_square(observed, wrong, n) > threshold


def test_the_draw_never_passes_the_last_likely_token(monkeypatch) -> None:
    """The largest uniform torch can return (1 - 2**-53) still lands on a token of nonzero
    probability, not on the zero-probability tokens after it; u = 0 picks the first likely one."""
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0, 0.0], [0.0, 0.3, 0.7, 0.0, 0.0]])
    for u, want in ((1 - 2**-53, 2), (0.0, 1)):
        monkeypatch.setattr(
            sampling.torch, "rand", lambda *a, u=u, **k: torch.full((1,), u, dtype=torch.float64)
        )
        assert sampling.draw(probs, [None, None]).tolist() == [want, want]


@pytest.mark.parametrize("bad", ["nan", "all -inf"])
def test_a_row_that_cannot_be_sampled_is_refused_in_one_line(bad: str) -> None:
    """A NaN logit, or a row whose every logit is -inf, leaves no distribution to draw from
    (+inf is capped to the largest float before the softmax, so it is drawn)."""
    logits = torch.stack([random_logits(0), random_logits(1)])
    if bad == "nan":
        logits[1, 5] = float("nan")
    else:
        logits[1] = float("-inf")
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=s), [], VOCAB, CPU) for s in range(2)]
    with pytest.raises(GenerationError, match="not finite"):
        sampling.sample_batch(samplers, logits)
    logits[1] = random_logits(2)
    logits[1, 9] = float("inf")
    assert sampling.sample_batch(samplers, logits)[1] == 9


# ----- SamplingParams validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", -0.5),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("min_p", -0.01),
        ("min_p", 1.0),
        ("min_p", float("nan")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -3),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", float("nan")),
        ("stop", [""]),
        ("stop", ["ok", ""]),
        ("stop", ""),
    ],
)
def test_bad_sampling_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value})


def test_boundary_sampling_params_are_accepted() -> None:
    p = SamplingParams(max_tokens=1, temperature=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1e-3)
    assert p.greedy
    assert not SamplingParams(temperature=1e-3).greedy
    assert SamplingParams(stop="END").stop == ["END"]
    for value in (-2.0, 2.0):
        SamplingParams(presence_penalty=value, frequency_penalty=value)


# ----- presence and frequency penalties -------------------------------------------------------------


@pytest.mark.parametrize("repetition", [1.0, 2.0])
def test_presence_and_frequency_penalties_follow_openais_formula(monkeypatch, repetition: float) -> None:
    """The logits handed to the temperature/filter stage, step by step, for scripted picks:
    logit - count * frequency - (count > 0) * presence, counting generated tokens only, applied
    after the repetition penalty (which does count the prompt)."""
    base = [2.0, 1.0, -1.0, 0.5, 0.0, 3.0]
    prompt = [3, 3, 4]
    script = [0, 0, 2, 5, 0, 3]  # the tokens the fake filter stage makes the sampler pick
    presence, frequency = 0.5, 0.25
    seen_by_filters: list[torch.Tensor] = []

    def scripted(logits, temperature, top_k, top_p, min_p):  # one row: (1, V)
        seen_by_filters.append(logits[0].clone())
        return torch.nn.functional.one_hot(
            torch.tensor([script[len(seen_by_filters) - 1]]), len(base)
        ).float()

    monkeypatch.setattr(sampling, "probabilities", scripted)
    params = SamplingParams(
        temperature=0.5, repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency
    )
    sampler = Sampler(params, prompt, len(base), CPU)
    picks = [sampler(torch.tensor(base)) for _ in script]
    assert picks == script

    counts = [0] * len(base)
    for step, got in enumerate(seen_by_filters):
        seen = set(prompt) | set(script[:step])
        expected = []
        for j, logit in enumerate(base):
            if j in seen:
                logit = logit / repetition if logit > 0 else logit * repetition
            expected.append(logit - counts[j] * frequency - (presence if counts[j] > 0 else 0.0))
        torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)
        counts[script[step]] += 1
    # Before the last pick token 0 had been generated three times, token 3 only prompted.
    last = seen_by_filters[-1]
    assert math.isclose(float(last[0]), 2.0 / repetition - 3 * 0.25 - 0.5, abs_tol=1e-6)
    assert math.isclose(float(last[3]), 0.5 / repetition, abs_tol=1e-6)


def test_penalty_helper_on_handmade_counts() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, float("-inf")])
    counts = torch.tensor([0.0, 1.0, 4.0, 2.0])
    got = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=-0.25)
    expected = torch.tensor([1.0, 1.0 + 0.25 - 0.5, 1.0 + 1.0 - 0.5, float("-inf")])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_frequency_penalty_changes_the_greedy_choice_and_ignores_the_prompt() -> None:
    a, b = 3, 7
    logits = torch.full((10,), -1.0)
    logits[a], logits[b] = 2.0, 1.5

    def greedy(prompt: list[int], **penalties: float) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=0, **penalties), prompt, 10, CPU)
        return [sampler(logits) for _ in range(5)]

    assert greedy([]) == [a] * 5
    # a's logit after n picks of a: 2.0 - 0.3 n; it loses to b (1.5, then 1.2) and back in turn.
    assert greedy([], frequency_penalty=0.3) == [a, a, b, a, b]
    # A prompt full of a changes nothing: only generated tokens count.
    assert greedy([a] * 6, frequency_penalty=0.3) == [a, a, b, a, b]
    # Presence alone: a loses once it has appeared (2.0 - 0.6 < 1.5), then both are penalised alike.
    assert greedy([a, a], presence_penalty=0.6) == [a, b, a, a, a]


def test_penalty_counts_are_only_allocated_when_used() -> None:
    assert Sampler(SamplingParams(), [1, 2], VOCAB, CPU).counts is None
    assert Sampler(SamplingParams(presence_penalty=0.1), [1, 2], VOCAB, CPU).counts.sum() == 0


# ----- the batched pass --------------------------------------------------------------------------


def test_a_batch_samples_what_each_row_samples_alone() -> None:
    """sample_batch over rows with every mix of settings (greedy, temperature, top-k, top-p,
    min-p, penalties, seeds) picks, step after step, exactly the tokens each row's sampler picks
    when it is called alone on that row's logits."""
    settings = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.3, top_k=7, seed=2),
        SamplingParams(temperature=0.7, top_p=0.6, seed=3),
        SamplingParams(temperature=1.0, min_p=0.2, seed=4),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=5),
        SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(temperature=1.1, frequency_penalty=-0.5, seed=6),
    ]
    prompts = [[1, 2, 3], [4], [5, 5], [], [7, 8], [9, 9, 9], [10], [11]]
    batch = [Sampler(p, prompt, VOCAB, CPU) for p, prompt in zip(settings, prompts, strict=True)]
    alone = [Sampler(p, prompt, VOCAB, CPU) for p, prompt in zip(settings, prompts, strict=True)]
    for step in range(12):
        logits = torch.stack([random_logits(100 * step + row) for row in range(len(settings))])
        picks = sampling.sample_batch(batch, logits)
        assert picks == [s(logits[row]) for row, s in enumerate(alone)], f"step {step}"
    # The batch's logits are left as they were (the server reads log-probabilities from them).
    assert torch.equal(logits, torch.stack([random_logits(1100 + row) for row in range(len(settings))]))


def test_probabilities_per_row_settings_equal_one_row_at_a_time() -> None:
    rows = torch.stack([random_logits(s) for s in range(4)])
    temps, ks, ps, mins = [0.5, 1.0, 2.0, 0.9], [0, 5, 300, 0], [1.0, 0.5, 0.95, 0.8], [0.0, 0.1, 0.0, 0.3]
    batch = probabilities(rows, temps, ks, ps, mins)
    for i in range(4):
        assert torch.equal(batch[i], probabilities(rows[i], temps[i], ks[i], ps[i], mins[i]))


def test_greedy_rows_follow_torchs_argmax_with_ties_nan_and_inf() -> None:
    """The greedy picks (numpy's argmax on the CPU) keep torch.argmax's rule: the first maximum
    wins, a NaN counts as the maximum; for bf16 logits and a strided view too, and beside a
    sampled row."""
    rows = torch.stack([random_logits(s) for s in range(6)])
    rows[1, [9, 3]] = rows[1].max() + 1  # a tie: the first index
    rows[2, [11, 7]] = float("nan")
    rows[3, [5, 2]] = float("inf")
    rows[4] = float("-inf")
    rows[5, 1], rows[5, 4] = float("inf"), float("nan")
    greedy = [Sampler(SamplingParams(temperature=0), [], VOCAB, CPU) for _ in range(6)]
    for logits in (rows, rows.bfloat16(), rows[:, 1::2]):
        assert sampling.sample_batch(greedy, logits) == [int(torch.argmax(r)) for r in logits]
    assert [int(torch.argmax(r)) for r in rows] == [int(torch.argmax(rows[0])), 3, 7, 2, 0, 4]
    rows[5] = random_logits(9)  # a row to sample from
    mixed = greedy[:5] + [Sampler(SamplingParams(temperature=0.8, seed=3), [], VOCAB, CPU)]
    alone = Sampler(SamplingParams(temperature=0.8, seed=3), [], VOCAB, CPU)
    assert sampling.sample_batch(mixed, rows) == [int(torch.argmax(r)) for r in rows[:5]] + [alone(rows[5])]


def test_sampling_among_the_top_k_draws_what_the_whole_vocabulary_would(monkeypatch) -> None:
    """When every row has a top-k, the CPU samples among the candidates alone (`_among_top_k`):
    over many steps and seeds, with top-p, min-p and temperature on top, it draws exactly the
    token the whole-vocabulary path draws with the same generators; a tie at a row's k-th
    logit keeps every tied token, however many (the candidates widen past it)."""
    vocab = 5000
    settings = [
        SamplingParams(temperature=0.8, top_k=1, seed=1),
        SamplingParams(temperature=1.0, top_k=5, seed=2),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=3),
        SamplingParams(temperature=1.2, top_k=300, min_p=0.02, seed=4),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.5, min_p=0.1, seed=5),
    ]
    used: list[torch.Tensor | None] = []
    real = sampling._among_top_k

    def spy(*args):
        used.append(real(*args))
        return used[-1]

    monkeypatch.setattr(sampling, "_among_top_k", spy)
    fast = [Sampler(p, [], vocab, CPU) for p in settings]
    full = [Sampler(p, [], vocab, CPU) for p in settings]
    g = torch.Generator().manual_seed(0)
    for step in range(200):
        logits = torch.randn(len(settings), vocab, generator=g) * 2.5
        picks = sampling.sample_batch(fast, logits)
        monkeypatch.setattr(sampling, "_among_top_k", lambda *a: None)
        assert picks == sampling.sample_batch(full, logits), f"step {step}"
        monkeypatch.setattr(sampling, "_among_top_k", spy)
    assert len(used) == 200 and all(u is not None for u in used)  # the candidates' path drew them all
    assert len({tuple(sampling.sample_batch(fast, logits)) for _ in range(20)}) > 1  # it does sample

    tie = torch.randn(1, vocab, generator=g)
    tie[0, :3] = 10.0  # three tokens tied at the top: top-k 2 keeps all three
    tie[0, 100:140] = 9.0  # and forty tied at the 5th: top-k 5 keeps 42, past its first candidates
    for k, want in ((2, set(range(3))), (5, {0, 1, 2, *range(100, 140)})):
        rows = [SamplingParams(temperature=1.0, top_k=k, seed=s) for s in range(400)]
        assert real(tie, rows[:1], [None]) is not None  # the candidates widened past the tie
        drawn = {sampling.sample_batch([Sampler(p, [], vocab, CPU)], tie)[0] for p in rows}
        assert drawn == want, k
    monkeypatch.setattr(sampling, "_among_top_k", lambda *a: None)
    assert sampling.sample_batch([Sampler(rows[0], [], vocab, CPU)], tie) == [
        real(tie, rows[:1], [Sampler(rows[0], [], vocab, CPU).generator]).item()
    ]  # the same draw as the whole vocabulary's


def test_a_nan_row_among_top_k_rows_is_refused_in_one_line() -> None:
    logits = torch.randn(2, 3000)
    logits[1, 7] = float("nan")
    samplers = [Sampler(SamplingParams(temperature=1.0, top_k=20, seed=s), [], 3000, CPU) for s in range(2)]
    with pytest.raises(GenerationError, match="not finite") as err:
        sampling.sample_batch(samplers, logits)
    assert "\n" not in str(err.value)
