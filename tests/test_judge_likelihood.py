"""`arena judge --verdict likelihood`: a local judge that always votes, by scoring the three
verdicts instead of generating a reply; checked against log-likelihoods computed here with a
plain full forward pass."""

from __future__ import annotations

import torch

import weightsmith
from weightsmith.eval.judge_pairwise import LikelihoodVerdicts


def loglik(llm, context: list[int], ending: list[int]) -> float:
    ids = torch.tensor([context + ending])
    with torch.inference_mode():
        logp = torch.log_softmax(llm.model(ids).float(), dim=-1)[0]
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(ending))


def test_likelihood_verdicts_pick_the_likeliest_ending(tiny_hf_dir):
    llm = weightsmith.load(tiny_hf_dir)
    prompts = [[{"role": "user", "content": f"Which answer is better? {i} [[A]] or [[B]]"}] for i in range(3)]
    replies = LikelihoodVerdicts(llm).complete(prompts)
    for messages, reply in zip(prompts, replies, strict=True):
        context = llm.engine.chat_prompt(messages)
        scores = {
            c: loglik(llm, context, llm.tokenizer.encode(c, add_special_tokens=False))
            for c in LikelihoodVerdicts.CHOICES
        }
        assert reply == max(scores, key=scores.get), (reply, scores)
