"""Log-likelihoods and generations equal lm-eval's Hugging Face backend (transformers)
on a tiny random model, whatever the batch size and the order of requests."""

from __future__ import annotations

import random

import pytest
import torch

from weightsmith import load
from weightsmith.eval.scorer import Scorer, TokenRequest

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def hflm(tiny_hf_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_hf_dir), batch_size=1, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_llm(tiny_hf_dir):
    return load(str(tiny_hf_dir), dtype="float32")


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


CONTEXTS = [
    "Question: What is 7 + 5?\nAnswer:",
    "The quick brown fox jumps over the",
    "Once upon a time there was a small model ",  # trailing space moves to the continuation
    "Bonjour le monde!",
]
CHOICES = [" 12", " 13", " twelve apples", " lazy dog. 0123", "", " Grüße aus Köln 🙂"]


def _requests():
    reqs = [(c, x) for c in CONTEXTS for x in CHOICES if x]
    reqs.append(("", "Once upon a time"))  # empty context: conditioned on the prefix token
    long_context = " ".join(["quick brown fox"] * 120)  # past the 256-token context: left-truncated
    reqs.append((long_context, " jumps over the lazy dog"))
    return reqs


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_loglikelihood_equals_lm_eval_hf(hflm, tiny_llm, batch_size):
    reqs = _requests()
    expected = hflm.loglikelihood(_instances("loglikelihood", reqs), disable_tqdm=True)
    order = list(range(len(reqs)))
    random.Random(batch_size).shuffle(order)
    scorer = Scorer(tiny_llm.model, tiny_llm.tokenizer, batch_size=batch_size)
    got = scorer.loglikelihood([reqs[i] for i in order])
    for k, i in enumerate(order):
        assert got[k][0] == pytest.approx(expected[i][0], rel=1e-4, abs=1e-4), reqs[i]
        assert got[k][1] == expected[i][1], reqs[i]


def test_tokenization_equals_lm_eval(hflm, tiny_llm):
    scorer = Scorer(tiny_llm.model, tiny_llm.tokenizer)
    for context, cont in _requests()[:-1]:
        if context:
            ctx, x = hflm._encode_pair(context, cont)
            assert scorer.encode_pair(context, cont) == TokenRequest(tuple(ctx), tuple(x))


def test_loglikelihood_equals_transformers_directly(tiny_hf_dir, tiny_llm):
    """The same numbers from a plain transformers forward pass over context + continuation."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    scorer = Scorer(tiny_llm.model, tiny_llm.tokenizer, batch_size=4)
    reqs = [
        TokenRequest((5, 9, 11), (40, 41, 42)),
        TokenRequest((5, 9, 11), (77,)),
        TokenRequest((3,), (8, 8)),
    ]
    got = scorer.score(reqs)
    for req, (ll, greedy) in zip(reqs, got, strict=True):
        ids = torch.tensor([list(req.context + req.continuation)])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
        n = len(req.context)
        targets = ids[0, n:]
        expected = logp[n - 1 : -1].gather(1, targets[:, None]).sum().item()
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logp[n - 1 : -1].argmax(-1) == targets).all())


def test_rolling_loglikelihood_equals_lm_eval_hf(hflm, tiny_llm):
    texts = ["The quick brown fox jumps over the lazy dog.", " ".join(["Once upon a time"] * 90)]
    expected = hflm.loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True
    )
    scorer = Scorer(tiny_llm.model, tiny_llm.tokenizer, batch_size=3)
    assert len(scorer.rolling_windows(texts[1])) > 1  # the long text needs several windows
    got = scorer.loglikelihood_rolling(texts)
    assert got == pytest.approx(expected, rel=1e-4)


def test_generate_until_equals_lm_eval_hf(hflm, tiny_llm):
    reqs = [
        ("Once upon a time", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
        ("The quick brown", {"until": ["\n\n", "fox"], "max_gen_toks": 16, "do_sample": False}),
        ("Bonjour", {"until": [], "max_gen_toks": 8, "do_sample": False}),
    ]
    expected = hflm.generate_until(_instances("generate_until", reqs), disable_tqdm=True)
    scorer = Scorer(tiny_llm.model, tiny_llm.tokenizer, batch_size=2)
    assert scorer.generate_until(reqs) == expected


def test_continuation_longer_than_context_is_refused(tiny_llm):
    from weightsmith.errors import GenerationError

    scorer = Scorer(tiny_llm.model, tiny_llm.tokenizer, max_length=8)
    with pytest.raises(GenerationError, match="does not fit"):
        scorer.score([TokenRequest((1,), tuple(range(20, 30)))])
