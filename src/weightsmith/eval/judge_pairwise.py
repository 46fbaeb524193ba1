"""The LLM judge's pairwise mode: which of two answers to one prompt is better.

A pairwise judge is a `JudgeConfig` (judge.py) like any other: the same model reference or
endpoint, grants, API-key variable, sandboxed rubric and backends (`make_judge`). What
differs is the rubric (it shows both answers, as `doc.answer_a` and `doc.answer_b`) and the
reply: a verdict `[[A]]`, `[[B]]` or `[[C]]` (a tie), the bracketed form MT-Bench's pairwise
judge uses, parsed by the config's own pattern (one capture group, the letter).

LLM judges favour one position (Zheng et al. 2023, "Judging LLM-as-a-judge"), so
`judge_both_orders` asks about each pair twice, swapped, and keeps a verdict only when both
orders agree on the same answer; when they disagree the pair is a tie.

Not here: which battles to judge and storing the votes (weightsmith.arena, the arena
commands).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.eval.judge import JudgeBackend, JudgeConfig
from weightsmith.eval.scorer import Scorer, TokenRequest

PAIRWISE_RUBRIC = """\
You are judging two assistant answers to the same conversation. Decide which answer serves \
the user better: correct, helpful, relevant, clear and safe. Ignore which answer comes first \
and how long each is.

[Conversation]
{{ question }}

[Answer A]
{{ doc.answer_a }}

[Answer B]
{{ doc.answer_b }}

Explain your reasoning in one or two sentences, then give your verdict on the last line as \
exactly one of: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] for a tie."""

#: The rubric for `LikelihoodVerdicts`: the verdict is the reply, with no reasoning before it.
LIKELIHOOD_RUBRIC = (
    PAIRWISE_RUBRIC.rsplit("\n\n", 1)[0]
    + """

Reply with exactly one of: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] \
for a tie."""
)

#: The verdict's letter; the last one in the reply counts (a judge may quote the choices first).
VERDICT_PATTERN = r"\[\[\s*([ABC])\s*\]\]"
_VERDICTS = {"A": "a", "B": "b", "C": "tie"}


def pairwise_config(
    model: str,
    *,
    endpoint_model: str = "default",
    api_key_env: str | None = None,
    max_tokens: int = 128,
    rubric: str = PAIRWISE_RUBRIC,
    source: str = "--judge",
) -> JudgeConfig:
    """A judge config for pairwise verdicts (the scale is unused: verdicts are letters)."""
    return JudgeConfig(
        model=model,
        rubric=rubric,
        endpoint_model=endpoint_model,
        api_key_env=api_key_env,
        score_pattern=VERDICT_PATTERN,
        max_tokens=max_tokens,
        source=source,
    )


class LikelihoodVerdicts:
    """A local judge that always gives a verdict: rather than generating a reply, it scores the
    three verdicts `[[A]]`, `[[B]]` and `[[C]]` as the start of its answer and replies with the
    likeliest (the multiple-choice method of lm-eval). For small local judges, whose free
    replies often carry no verdict; use it with `LIKELIHOOD_RUBRIC`."""

    CHOICES = ("[[A]]", "[[B]]", "[[C]]")

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.scorer = Scorer(llm.model, llm.tokenizer)

    def complete(self, prompts: list[list[dict]]) -> list[str]:
        tokenizer, engine = self.llm.tokenizer, self.llm.engine
        endings = [tuple(tokenizer.encode(c, add_special_tokens=False)) for c in self.CHOICES]
        requests = []
        for messages in prompts:
            context = tuple(engine.chat_prompt(messages))
            requests.extend(TokenRequest(context, ending) for ending in endings)
        scores = [logprob for logprob, _ in self.scorer.score(requests)]
        n = len(self.CHOICES)
        return [
            self.CHOICES[max(range(n), key=lambda j, i=i: scores[i * n + j])] for i in range(len(prompts))
        ]


def conversation_text(messages: list[dict]) -> str:
    """A conversation as the judge reads it: one "role: text" paragraph per turn (a single user
    turn is shown as its text alone)."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def parse_verdict(cfg: JudgeConfig, text: str) -> str | None:
    """ "a", "b" or "tie" from the reply's last verdict mark; None when it has none."""
    found = re.findall(cfg.score_pattern, text or "")
    return _VERDICTS[found[-1].upper()] if found else None


@dataclass
class PairVerdict:
    """Both orders' verdicts on one pair (in the pair's own terms) and what is recorded."""

    forward: str | None  # judging (A, B) as given
    backward: str | None  # judging (B, A), mapped back: "a" still means the pair's A
    raw: tuple[str, str]

    @property
    def choice(self) -> str | None:
        """The recorded verdict: the agreed one; a tie when the orders disagree; None when a
        reply had no verdict (nothing is recorded)."""
        if self.forward is None or self.backward is None:
            return None
        return self.forward if self.forward == self.backward else "tie"


def judge_both_orders(
    cfg: JudgeConfig, backend: JudgeBackend, pairs: list[tuple[list[dict], str, str]]
) -> list[PairVerdict]:
    """Judge each (conversation, answer A, answer B) in both orders, in one backend call."""
    prompts = []
    for i, (messages, a, b) in enumerate(pairs):
        question = conversation_text(messages)
        for first, second in ((a, b), (b, a)):
            item = {"question": question, "doc": {"answer_a": first, "answer_b": second}}
            prompts.append(cfg.render(item, i))
    if not prompts:
        return []
    replies = backend.complete(prompts)
    if len(replies) != len(prompts):
        raise WeightsmithError(f"the judge returned {len(replies)} replies for {len(prompts)} prompts")
    swap = {"a": "b", "b": "a", "tie": "tie", None: None}
    out = []
    for k in range(len(pairs)):
        fwd, bwd = replies[2 * k], replies[2 * k + 1]
        out.append(PairVerdict(parse_verdict(cfg, fwd), swap[parse_verdict(cfg, bwd)], (fwd, bwd)))
    return out


__all__ = [
    "LIKELIHOOD_RUBRIC",
    "PAIRWISE_RUBRIC",
    "LikelihoodVerdicts",
    "VERDICT_PATTERN",
    "PairVerdict",
    "conversation_text",
    "judge_both_orders",
    "pairwise_config",
    "parse_verdict",
]
