"""What keeps a generated example out of the data set, each check with its own reason name
(the reasons are the funnel's rows).

- `parse_instruction`: the first line of a reply, with list numbers, "Task:" labels and
  quotes taken off (a small model's reply rarely is the bare task).
- `instruction_problem` / `answer_problem`: length and format (empty, too few or too many
  words, cut off at the token limit, mostly not words; an answer not matching the user's
  `--answer-pattern`), refusals (safety.detectors'
  refusal patterns) and boilerplate (the assistant talking about itself instead of doing
  the task), degenerate repetition.
- `Contamination`: 13-gram overlap (GPT-3's decontamination rule, Brown et al. 2020, App. C)
  with the documents of the built-in eval suites and any task files named; words are
  rouge-score's tokens, so punctuation and case do not hide an overlap.

Not here: near-duplicates (synth.rouge) and the LLM judge (synth.pipeline asks it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from weightsmith.safety.detectors import RefusalPatterns
from weightsmith.synth.rouge import tokenize

#: The assistant describing itself or wrapping the task instead of doing it.
BOILERPLATE = (
    r"\bas an? (?:ai|artificial intelligence|large language model|language model)\b",
    r"\bi (?:am|'m) (?:just )?an? (?:ai|language model|assistant)\b",
    r"\bmy (?:knowledge|training) (?:cutoff|cut-off|data)\b",
    r"\bi (?:do not|don't) have (?:access to|personal|the ability)\b",
    r"^\W*(?:sure|certainly|of course|okay|ok)[!,.]?\s*(?:here(?:'s| is| are)\b.*)?$",
    r"^\W*(?:here(?:'s| is| are) (?:a|an|the|your|some) (?:new |rewritten |revised )?(?:task|question|instruction)s?\W*)$",
)
_BOILER = [re.compile(p, re.IGNORECASE) for p in BOILERPLATE]
_LABEL = re.compile(
    r"^\s*(?:[-*•]\s*|\d+\s*[.):]\s*|(?:new |rewritten |revised )?(?:task|question|instruction)"
    r"(?:\s*\d+)?\s*[:.-]\s*)+",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Limits:
    min_instruction_words: int = 3
    max_instruction_words: int = 150
    min_answer_words: int = 1
    max_answer_words: int = 1000
    answer_pattern: re.Pattern[str] | None = None  # the answer format: kept only when it matches


_INTRO = re.compile(r"^\W*(?:sure|okay|ok|certainly|of course|here)\b.*:\W*$", re.IGNORECASE)


def parse_instruction(text: str) -> str:
    """The task in a reply: its first non-empty line that is not an intro ("Here's a new task:"),
    without labels, numbers or quotes."""
    for line in (text or "").splitlines():
        if _INTRO.match(line.strip()):
            continue
        line = _LABEL.sub("", line).strip().strip("\"'`*“”").strip()
        if line:
            return line
    return ""


def _boilerplate(text: str) -> bool:
    head = " ".join(text.split())[:300]
    return any(p.search(head) for p in _BOILER)


def _repetitive(words: list[str]) -> bool:
    """A degenerate loop: among 30 or more word trigrams, under 30% distinct."""
    grams = list(zip(words, words[1:], words[2:], strict=False))
    return len(grams) >= 30 and len(set(grams)) < 0.3 * len(grams)


def _mostly_symbols(text: str) -> bool:
    letters = sum(c.isalnum() for c in text)
    return letters < 0.5 * len(text.replace(" ", ""))


_REFUSALS = RefusalPatterns()


def instruction_problem(text: str, cut_off: bool, limits: Limits) -> str | None:
    """Why a parsed instruction is not kept (a funnel reason), or None; `cut_off`: the reply
    hit the token limit inside its first line."""
    if not text:
        return "instruction_empty"
    if cut_off:
        return "instruction_cut_off"
    words = text.split()
    if len(words) < limits.min_instruction_words:
        return "instruction_too_short"
    if len(words) > limits.max_instruction_words:
        return "instruction_too_long"
    if _mostly_symbols(text):
        return "instruction_not_text"
    if _REFUSALS.match(text) is not None:
        return "instruction_refusal"
    if _boilerplate(text):
        return "instruction_boilerplate"
    return None


def answer_problem(text: str, finish: str, limits: Limits) -> str | None:
    """Why an answer is not kept (a funnel reason), or None."""
    text = (text or "").strip()
    if not text:
        return "answer_empty"
    if finish == "length":
        return "answer_cut_off"
    if limits.answer_pattern is not None and limits.answer_pattern.search(text) is None:
        return "answer_format"
    words = text.split()
    if len(words) < limits.min_answer_words:
        return "answer_too_short"
    if len(words) > limits.max_answer_words:
        return "answer_too_long"
    if _mostly_symbols(text):
        return "answer_not_text"
    if _REFUSALS.match(text) is not None:
        return "answer_refusal"
    if _boilerplate(text):
        return "answer_boilerplate"
    if _repetitive(words):
        return "answer_repetitive"
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


class Contamination:
    """Every n-gram of the eval documents; `find(text)` gives one shared n-gram, or None."""

    def __init__(self, n: int = 13) -> None:
        self.n = n
        self._grams: dict[tuple[str, ...], str] = {}  # n-gram -> the task it came from
        self.tasks: dict[str, int] = {}  # task -> documents indexed

    def add_document(self, task: str, doc: Any) -> None:
        for text in _strings(doc):
            words = tokenize(text)
            for i in range(len(words) - self.n + 1):
                self._grams.setdefault(tuple(words[i : i + self.n]), task)
        self.tasks[task] = self.tasks.get(task, 0) + 1

    def find(self, text: str) -> tuple[str, str] | None:
        """(task, the shared n-gram) for the first n-gram of `text` found in the eval documents."""
        words = tokenize(text)
        for i in range(len(words) - self.n + 1):
            gram = tuple(words[i : i + self.n])
            task = self._grams.get(gram)
            if task is not None:
                return task, " ".join(gram)
        return None

    def __len__(self) -> int:
        return len(self._grams)


def load_contamination(specs: list[str], n: int) -> Contamination:
    """The n-grams of the tasks `specs` names ("builtin": every built-in suite; "none": nothing;
    else eval task specs: files, folders, builtin:NAME), read with eval's task loader."""
    from pathlib import Path

    from weightsmith.eval.runner import load_tasks

    index = Contamination(n)
    wanted: list[str] = []
    for spec in specs:
        if spec == "none":
            continue
        if spec == "builtin":
            suites = Path(__file__).resolve().parents[1] / "eval" / "suites"
            wanted += [f"builtin:{p.stem}" for p in sorted(suites.glob("*.yaml")) if p.stem != "core"]
        else:
            wanted.append(spec)
    if wanted:
        for task in load_tasks(wanted).tasks:
            for doc in task.docs:
                index.add_document(task.cfg.task, doc)
    return index
