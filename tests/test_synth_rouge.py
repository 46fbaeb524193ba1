"""ROUGE-L and near-duplicate search against the reference: the `rouge-score` package's
ROUGE-L F-measure on hypothesis-made strings (same tokens, scores to 1e-9), and the kept set of
the prefix-filtered index equal to an all-pairs rouge-score loop's."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsmith.synth.rouge import NearDupIndex, dedup, lcs_length, min_overlap, rouge_l, tokenize

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
rouge_tokenize = pytest.importorskip("rouge_score.tokenize")

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

# Few distinct words, so strings share tokens and subsequences; punctuation, case, digits and
# non-ASCII letters exercise the tokenisation.
WORDS = ["the", "The", "cat", "CAT", "sat", "on", "a", "mat", "mat.", "42", "x-ray", "naïve", "café", "",
         "!", "dog's", "a1", "İstanbul", "ß", "\t", "\n", "run", "runs", "running"]  # fmt: skip
texts = st.lists(st.sampled_from(WORDS), max_size=25).map(" ".join) | st.text(max_size=60)


@settings(max_examples=400, deadline=None, derandomize=True)  # `make test` is repeatable
@given(texts, texts)
def test_rouge_l_equals_rouge_score(a: str, b: str) -> None:
    assert tokenize(a) == rouge_tokenize.tokenize(a, None)
    reference = SCORER.score(a, b)["rougeL"].fmeasure
    assert abs(rouge_l(a, b) - reference) <= 1e-9
    assert rouge_l(b, a) == pytest.approx(reference, abs=1e-9)  # F is symmetric


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from("abcde"), max_size=80), st.lists(st.sampled_from("abcde"), max_size=80))
def test_bit_parallel_lcs_equals_the_table(a: list[str], b: list[str]) -> None:
    table = rouge_scorer._lcs_table(a, b)  # the reference's own dynamic-programming table
    assert lcs_length(a, b) == table[-1][-1]


def _corpus(seed: int, n: int) -> list[str]:
    """Instructions with many rewordings of a few templates, so near-duplicates are common."""
    rng = random.Random(seed)
    subjects = ["the ocean", "a cat", "machine learning", "the moon", "tax law", "bread", "a river", "chess"]
    verbs = [
        "Write a poem about",
        "Explain",
        "Summarise the history of",
        "List three facts about",
        "Describe",
    ]
    extras = ["", "in simple words", "for a child", "in two sentences", "with an example", "briefly, please"]
    out = []
    for _ in range(n):
        words = f"{rng.choice(verbs)} {rng.choice(subjects)} {rng.choice(extras)}".split()
        if rng.random() < 0.3 and len(words) > 2:
            del words[rng.randrange(len(words))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["now", "quickly", "the", "and"]))
        out.append(" ".join(words))
    return out


def _brute_force(texts: list[str], threshold: float) -> list[int]:
    kept: list[int] = []
    for i, t in enumerate(texts):
        if all(SCORER.score(texts[j], t)["rougeL"].fmeasure < threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize(("seed", "threshold"), [(0, 0.7), (1, 0.7), (2, 0.5), (3, 0.9)])
def test_dedup_keeps_what_all_pairs_rouge_score_keeps(seed: int, threshold: float) -> None:
    texts = _corpus(seed, 300)
    kept = dedup(texts, threshold)
    assert kept == _brute_force(texts, threshold)
    assert 10 < len(kept) < 290  # the corpus really has duplicates and non-duplicates


def test_dedup_with_a_reference_order_unrelated_to_the_texts_keeps_the_same() -> None:
    texts = _corpus(4, 200)
    assert dedup(texts, 0.7, reference=["chess chess chess", "the the", "zebra"]) == dedup(texts, 0.7)


def test_prefix_filter_skips_most_pairs() -> None:
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(5, 15))) for _ in range(400)]
    texts += [t + " again" for t in texts[:50]]  # and some near-duplicates
    index = NearDupIndex(0.7, texts)
    brute = 0
    for t in texts:
        brute += len(index)  # what an all-pairs loop compares this one with
        tokens = tokenize(t)
        if index.nearest(tokens) is None:
            index.add(tokens, t)
    assert len(index) == 400
    assert index.comparisons < brute / 5


def test_nearest_does_not_depend_on_the_order_things_were_added() -> None:
    texts = _corpus(6, 60)
    one, two = NearDupIndex(0.5, texts), NearDupIndex(0.5, texts)
    for t in texts:
        one.add(tokenize(t), t)
    for t in reversed(texts):
        two.add(tokenize(t), t)
    for q in _corpus(7, 40):
        a, b = one.nearest(tokenize(q)), two.nearest(tokenize(q))
        assert (a is None) == (b is None)
        if a is not None:
            assert (one.text(a[0]), a[1]) == (two.text(b[0]), b[1])


def test_min_overlap_is_the_bound_at_the_threshold() -> None:
    # 7 shared tokens of 10 and 10: F = 0.7 exactly; one fewer must not be needed
    assert min_overlap(10, 0.7) <= 7
    assert rouge_l("a b c d e f g h i j", "a b c d e f g x y z") == pytest.approx(0.7)
    assert dedup(["a b c d e f g h i j", "a b c d e f g x y z"], 0.7) == [0]
    assert dedup(["", "!!", "a"], 0.7) == [0, 1, 2]  # no tokens: never a duplicate


def test_parse_instruction_takes_the_task_out_of_a_chatty_reply() -> None:
    from weightsmith.synth.filters import parse_instruction

    assert parse_instruction('Here\'s a new task:\n\nTask 7: "Name a blue fruit."') == "Name a blue fruit."
    assert parse_instruction("1. Write a limerick about tea\n2. another") == "Write a limerick about tea"
    assert parse_instruction("Sure! Here is one:") == ""
