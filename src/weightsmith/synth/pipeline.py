"""One synth run, step by step: ask for instructions, filter them, answer them, filter the
answers, judge them, and commit what was kept and dropped (and why) before the next step.

Per candidate, in this order (each drop has its funnel reason):
  1. generate the instruction (recipes that have one to generate): `instruction_request_failed`
  2. its length and format, refusals, boilerplate: `instruction_*` (synth.filters);
     evolve: `evolve_unchanged` when the rewrite is the instruction it started from
  3. decontamination: `contaminated` (an n-gram shared with an eval document)
  4. near-duplicates: `near_duplicate` (ROUGE-L >= threshold against every instruction that
     passed this point before, the recipe's own inputs for self-instruct included: a dropped
     answer does not make its instruction new again)
  5. generate the answer: `answer_request_failed`; its checks: `answer_*`; decontamination of
     the whole example: `contaminated`
  6. the judge (optional): `judge_request_failed`, `judge_unparseable`, `judge_below_threshold`
Every dropped candidate is written to dropped.jsonl with what it had; nothing generated is lost.

A step in which every request failed stops the run with the first error (what earlier steps
kept is committed; rerunning continues).

Not here: the recipes' prompts (synth.recipes), the files (synth.store, synth.output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.synth.filters import (
    Contamination,
    Limits,
    answer_problem,
    instruction_problem,
    parse_instruction,
)
from weightsmith.synth.generation import Request
from weightsmith.synth.recipes import Candidate, stable_int
from weightsmith.synth.rouge import NearDupIndex, tokenize
from weightsmith.synth.store import WorkStore


@dataclass
class Judge:
    """An LLM judge: a generator (greedy), the rubric's JudgeConfig, the threshold."""

    generator: Any
    config: Any  # eval.judge.JudgeConfig


@dataclass
class Pipeline:
    recipe: Any
    generator: Any
    limits: Limits
    index: NearDupIndex
    contamination: Contamination
    seed: int
    judge: Judge | None = None
    progress: Callable[[str, int, int | None], None] | None = None

    def _say(self, what: str, done: int, total: int | None) -> None:
        if self.progress:
            self.progress(what, done, total)

    def _generate(self, gen: Any, messages: list[list[dict]], step: int, phase: str) -> list[Any]:
        requests = [Request(m, stable_int(self.seed, step, phase, i)) for i, m in enumerate(messages)]
        replies = gen.complete(requests) if requests else []
        errors = [r.error for r in replies if r.error]
        if requests and len(errors) == len(requests):
            raise WeightsmithError(
                f"every {phase} request of step {step + 1} failed; first: {errors[0]} "
                "(what earlier steps kept is saved; rerun the same command to continue)"
            )
        return replies

    def step(self, step: int, candidates: list[Candidate]) -> tuple[list[dict], list[dict]]:
        """Run one step's candidates through every stage: (kept rows, dropped rows)."""
        dropped: list[dict] = []

        def drop(c: Candidate, reason: str, **extra: Any) -> None:
            dropped.append(
                {"step": step, "reason": reason, "instruction": c.instruction, **extra, "meta": c.meta}
            )

        alive = self._instructions(step, candidates, drop)
        alive = [c for c in alive if not self._screen(c, drop)]
        answers = self._generate(
            self.generator, [self.recipe.answer_messages(c) for c in alive], step, "answer"
        )
        scored: list[tuple[Candidate, str]] = []
        for c, reply in zip(alive, answers, strict=True):
            if reply.error:
                drop(c, "answer_request_failed", detail=reply.error)
                continue
            text = reply.text.strip()
            problem = answer_problem(text, reply.finish, self.limits)
            found = None if problem else self.contamination.find(f"{c.instruction}\n{text}")
            if problem or found:
                drop(c, problem or "contaminated", answer=text, **({"detail": list(found)} if found else {}))
                continue
            scored.append((c, text))
        scores = self._judge(step, scored, drop)
        kept = []
        for (c, text), score in zip(scored, scores, strict=True):
            if score is ...:
                continue
            conversation = c.conversation or [{"role": "user", "content": c.instruction}]
            meta = {"recipe": self.recipe.name, "step": step, **c.meta}
            if score is not None:
                meta["judge_score"] = score
            kept.append({"messages": [*conversation, {"role": "assistant", "content": text}], "meta": meta})
        return kept, dropped

    def _instructions(self, step: int, candidates: list[Candidate], drop: Callable) -> list[Candidate]:
        asks = [c for c in candidates if c.ask is not None]
        replies = self._generate(self.generator, [c.ask for c in asks], step, "instruction")
        for c, reply in zip(asks, replies, strict=True):
            if reply.error:
                c.instruction = ""
                drop(c, "instruction_request_failed", detail=reply.error)
                c.meta["_dropped"] = True
                continue
            raw = reply.text.strip()
            c.instruction = parse_instruction(raw)
            cut = reply.finish == "length" and "\n" not in raw
            problem = instruction_problem(c.instruction, cut, self.limits)
            if problem is None and c.meta.get("evolved_from", "").strip() == c.instruction:
                problem = "evolve_unchanged"
            if problem:
                drop(c, problem, raw=raw)
                c.meta["_dropped"] = True
        alive = [c for c in candidates if not c.meta.pop("_dropped", False)]
        for c in alive:
            if c.ask is None:  # given instructions get the same format checks
                problem = instruction_problem(c.instruction, False, self.limits)
                if problem:
                    drop(c, problem)
                    c.meta["_dropped"] = True
        return [c for c in alive if not c.meta.pop("_dropped", False)]

    def _screen(self, c: Candidate, drop: Callable) -> bool:
        """Decontamination and near-duplicates; True when `c` is dropped."""
        found = self.contamination.find(c.instruction)
        if found:
            drop(c, "contaminated", detail=list(found))
            return True
        tokens = tokenize(c.instruction)
        near = self.index.nearest(tokens)
        if near is not None:
            drop(c, "near_duplicate", detail={"rouge_l": near[1], "of": self.index.text(near[0])})
            return True
        self.index.add(tokens, c.instruction)
        return False

    def _judge(self, step: int, scored: list[tuple[Candidate, str]], drop: Callable) -> list[Any]:
        """Per example: its score (None without a judge), or ... when dropped."""
        if self.judge is None or not scored:
            return [None] * len(scored)
        cfg = self.judge.config
        items = [
            {"question": c.instruction, "answer": a, "reference": c.context or "", "doc": {}}
            for c, a in scored
        ]
        replies = self._generate(
            self.judge.generator, [cfg.render(it, i) for i, it in enumerate(items)], step, "judge"
        )
        out: list[Any] = []
        for (c, text), reply in zip(scored, replies, strict=True):
            score = None if reply.error else cfg.parse(reply.text)
            if reply.error:
                drop(c, "judge_request_failed", answer=text, detail=reply.error)
            elif score is None:
                drop(c, "judge_unparseable", answer=text, detail=reply.text)
            elif score < cfg.pass_threshold:
                drop(c, "judge_below_threshold", answer=text, detail=score)
            else:
                out.append(score)
                continue
            out.append(...)
        return out

    def run(self, store: WorkStore) -> None:
        """Steps until the recipe has nothing more to propose (or its target is kept)."""
        recipe = self.recipe
        while not store.state.done:
            candidates, cursor = recipe.propose(store.state.step, store.state.cursor, store.kept)
            if not candidates:
                store.commit([], [], cursor=cursor, done=True)
                break
            kept, dropped = self.step(store.state.step, candidates)
            if recipe.target is not None:  # past the target: kept in dropped.jsonl, counted
                room = max(recipe.target - len(store.kept), 0)
                dropped += [{"step": store.state.step, "reason": "beyond_n", "instruction": k["messages"][-2]["content"],
                             "answer": k["messages"][-1]["content"], "meta": k["meta"]} for k in kept[room:]]  # fmt: skip
                kept = kept[:room]
            store.commit(kept, dropped, cursor=cursor)
            funnel = store.state.funnel
            self._say(recipe.name, funnel["kept"], recipe.target)


def passed_screen(row: dict) -> bool:
    """Whether a dropped row's instruction had passed the near-duplicate filter."""
    reason = row["reason"]
    return (
        reason.startswith(("answer_", "judge_"))
        or reason == "beyond_n"
        or (reason == "contaminated" and "answer" in row)
    )


def rebuild_index(threshold: float, reference: list[str], recipe: Any, store: WorkStore) -> NearDupIndex:
    """The near-duplicate index as the run left it: the recipe's known instructions, then every
    instruction that passed the filter in earlier steps (kept, or dropped later)."""
    index = NearDupIndex(threshold, reference)
    texts = list(recipe.known_instructions())
    texts += [r["messages"][-2]["content"] for r in store.kept]
    texts += [r["instruction"] for r in store.dropped if passed_screen(r)]
    for text in texts:
        index.add(tokenize(text), text)
    return index
