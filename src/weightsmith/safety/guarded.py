"""A guardrail policy around generation: input rails, the model, output rails.

`GuardedReply` is what one guarded turn produced. `guarded_replies` runs a batch of
conversations through a `Guard` and any `generate` function (the in-process engine, an
OpenAI endpoint, the red-team's scripted model), so chat, generate, serve and redteam
apply a policy the same way:

  1. input rails over the user messages: a block answers with the policy's refusal and
     `finish_reason="content_filter"` (OpenAI's value for filtered output) without
     calling the model; redactions rewrite the messages the model sees;
  2. the model answers the conversations that passed;
  3. output rails over each answer: a block replaces it with the refusal (again
     `content_filter`), a redaction rewrites it.

Output rails need the whole answer, so a guarded stream with output rails is held back
until the answer is complete (input-only policies stream as usual).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from weightsmith.grants import Grants

#: finish_reason of an answer a guard replaced, as OpenAI reports filtered content.
CONTENT_FILTER = "content_filter"


@dataclass(frozen=True)
class GuardedReply:
    """One conversation's final answer and what the guard did to it."""

    text: str
    finish_reason: str
    #: "input" or "output" when a rail blocked or redacted, else None.
    stage: str | None = None
    action: str = "allow"  # allow | redact | block
    rule: str | None = None
    category: str | None = None
    matched: str | None = None
    #: the model's own answer before output rails (None when input rails blocked it).
    raw: str | None = None

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def guard_record(self) -> dict[str, Any] | None:
        """The guard's part for transcripts (None when it let everything through)."""
        if self.action == "allow":
            return None
        return {
            "stage": self.stage,
            "action": self.action,
            "rule": self.rule,
            "category": self.category,
            "matched": self.matched,
        }


def _from_verdict(verdict: Any, stage: str, text: str, finish: str, raw: str | None) -> GuardedReply:
    return GuardedReply(
        text, finish, stage, verdict.action, verdict.rule, verdict.category, verdict.matched, raw
    )


#: Answers conversations: one (text, finish_reason) per conversation, in order.
Generate = Callable[[list[list[dict]]], list[tuple[str, str]]]


def guarded_replies(
    guard: Any, conversations: Sequence[list[dict]], generate: Generate
) -> list[GuardedReply]:
    """Answer `conversations` through `guard` (a `safety.policy.Guard`, or None for no guard)."""
    if guard is None:
        return [GuardedReply(t, f, raw=t) for t, f in generate(list(conversations))]
    out: list[GuardedReply | None] = [None] * len(conversations)
    inputs: dict[int, Any] = {}
    todo: list[int] = []
    sent: list[list[dict]] = []
    for i, messages in enumerate(conversations):
        verdict, rewritten = guard.guard_messages(list(messages))
        if verdict.blocked:
            out[i] = _from_verdict(verdict, "input", verdict.refusal or "", CONTENT_FILTER, None)
        else:
            inputs[i] = verdict
            todo.append(i)
            sent.append(rewritten)
    answers = generate(sent) if sent else []
    verdicts = guard.check_many([t for t, _ in answers], "output") if guard.has_output_rails else None
    for k, (i, (text, finish)) in enumerate(zip(todo, answers, strict=True)):
        ov = verdicts[k] if verdicts is not None else None
        if ov is not None and ov.blocked:
            out[i] = _from_verdict(ov, "output", ov.refusal or "", CONTENT_FILTER, text)
        elif ov is not None and ov.action == "redact":
            out[i] = _from_verdict(ov, "output", ov.text, finish, text)
        elif inputs[i].action == "redact":
            out[i] = _from_verdict(inputs[i], "input", text, finish, text)
        else:
            out[i] = GuardedReply(text, finish, raw=text)
    return [r for r in out if r is not None]


def load_guard(
    spec: str | None, *, load_model: Callable[[str], Any] | None = None, grants: Grants | None = None
) -> Any:
    """`Guard.load(spec)` (None -> None); a local classifier model loads on first use, an
    endpoint classifier must be granted by `grants` (`ClassifierAccess.grants()`) now."""
    if spec is None:
        return None
    from weightsmith.safety.policy import Guard

    return Guard.load(spec, load_model=load_model, grants=grants)
