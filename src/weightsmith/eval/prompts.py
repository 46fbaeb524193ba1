"""Documents to prompts and requests, as lm-eval builds them.

A field name picks a document field; anything else is a Jinja template (rendered in
a sandbox with strict undefined names); a template whose text is a digit (when the
task has choices) or a list literal becomes that value, as in lm-eval. Few-shot
examples come from a seeded `random.Random` drawn in document order (lm-eval's
default sampler with its seed 1234), so the same examples are chosen. Every
document is rendered before any model work, so a missing field or a gold index out
of range stops the run at once, naming the task file, the field and the document.

Not here: reading task files (`eval/tasks.py`), running requests (`eval/scorer.py`).
"""

from __future__ import annotations

import ast
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from weightsmith.eval.tasks import TaskConfig, read_split


def _regex_replace(
    text: str, pattern: str, replacement: str = "", count: int = 0, ignorecase: bool = False
) -> str:
    return re.compile(pattern, flags=re.I if ignorecase else 0).sub(replacement, text, count=count)


_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace

#: Renders chat messages to the prompt text (the tokenizer's template, generation prompt on).
ChatFormatter = Callable[[list[dict[str, str]]], str]


@dataclass
class DocRequests:
    """One document's prompt and the requests it makes."""

    doc_id: int
    doc: dict[str, Any]
    context: str
    target: Any
    choices: list[str] | None
    arguments: list[tuple]
    responses: list[Any] = field(default_factory=list)  # one per argument, once answered


class Task:
    """A task file plus its documents."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.docs = read_split(cfg, cfg.eval_split)
        if not self.docs:
            key = "test_split" if cfg.test_split else "validation_split"
            raise cfg.error(
                key if key in cfg.raw else None,
                f"split {cfg.eval_split!r} has no documents ({_files(cfg, cfg.eval_split)})",
            )
        self.fields = set().union(*(d.keys() for d in self.docs))
        self._fewshot: list[dict] | None = None
        self._templates: dict[str, Any] = {}  # compiled once: every document is rendered twice

    @property
    def name(self) -> str:
        return self.cfg.task

    def fewshot_docs(self) -> list[dict[str, Any]]:
        """lm-eval's rule: fewshot_split, else the training split, else validation, else test."""
        if self._fewshot is None:
            cfg = self.cfg
            split = cfg.fewshot_split or cfg.training_split or cfg.validation_split or cfg.test_split
            self._fewshot = read_split(cfg, split)
        return self._fewshot

    # -- fields -------------------------------------------------------------

    def _render(self, key: str, expr: str, doc: dict, doc_id: int) -> str:
        try:
            if expr not in self._templates:
                self._templates[expr] = _ENV.from_string(expr)
            return self._templates[expr].render(**doc)
        except UndefinedError as exc:
            fields = ", ".join(sorted(self.fields)) or "none"
            raise self.cfg.error(
                key, f"{_undefined_name(exc)} in document {doc_id} (the documents' fields: {fields})"
            ) from None
        except TemplateError as exc:
            raise self.cfg.error(key, f"bad template: {exc}") from None

    def doc_to_text(self, doc: dict, doc_id: int) -> str | int:
        expr = self.cfg.doc_to_text
        if isinstance(expr, int):
            return expr
        if not isinstance(expr, str):
            raise self.cfg.error("doc_to_text", "expected a field name or a template string")
        if expr in self.fields:
            return doc[expr]
        text = self._render("doc_to_text", expr, doc, doc_id)
        if text.isdigit() and self.cfg.doc_to_choice is not None:
            return ast.literal_eval(text)
        return text

    def doc_to_target(self, doc: dict, doc_id: int) -> Any:
        expr = self.cfg.doc_to_target
        if isinstance(expr, (int, list)):
            return expr
        if not isinstance(expr, str):
            raise self.cfg.error(
                "doc_to_target", "expected a field name, a template string, an integer or a list"
            )
        if expr in self.fields:
            return doc[expr]
        text = self._render("doc_to_target", expr, doc, doc_id)
        if text.isdigit() and self.cfg.doc_to_choice is not None:
            return ast.literal_eval(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def doc_to_choice(self, doc: dict, doc_id: int) -> list[str]:
        expr = self.cfg.doc_to_choice
        if isinstance(expr, list):
            choices = expr
        elif isinstance(expr, dict):
            choices = list(expr.values())
        elif isinstance(expr, str) and expr in self.fields:
            choices = doc[expr]
        elif isinstance(expr, str):
            text = self._render("doc_to_choice", expr, doc, doc_id)
            try:
                choices = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                raise self.cfg.error(
                    "doc_to_choice", f"document {doc_id}: the template gave {text[:60]!r}, not a list literal"
                ) from None
        else:
            raise self.cfg.error("doc_to_choice", "expected a field name, a template or a list")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise self.cfg.error("doc_to_choice", f"document {doc_id}: expected a non-empty list of strings")
        return choices

    # -- requests -----------------------------------------------------------

    def select_docs(self, limit: float | None) -> list[tuple[int, dict]]:
        """The first `limit` documents (a fraction below 1 means that share, rounded up)."""
        n = len(self.docs)
        if limit is not None:
            n = min(n, math.ceil(n * limit) if limit < 1 else int(limit))
        return list(enumerate(self.docs[:n]))

    def build(
        self,
        *,
        limit: float | None = None,
        num_fewshot: int | None = None,
        seed: int = 1234,
        chat: ChatFormatter | None = None,
        system_instruction: str | None = None,
    ) -> list[DocRequests]:
        cfg = self.cfg
        shots = cfg.num_fewshot if num_fewshot is None else num_fewshot
        rnd = random.Random(seed)
        out = []
        for doc_id, doc in self.select_docs(limit):
            context = self._context(doc, doc_id, shots, rnd, chat, system_instruction)
            out.append(self._requests(doc, doc_id, context, chat is not None))
        return out

    def _context(self, doc, doc_id, shots, rnd, chat, system_instruction) -> str:
        cfg = self.cfg
        description = self._render("description", cfg.description, doc, doc_id) if cfg.description else ""
        system = _delimit(system_instruction, description, cfg.fewshot_delimiter)
        turns: list[list[str]] = []  # [role, content, delimiter]
        for fs in self._sample(doc, shots, rnd):
            fs_id = -1
            q = self.doc_to_text(fs, fs_id)
            a = self.doc_to_target(fs, fs_id)
            if cfg.doc_to_choice is not None and isinstance(a, int):
                a = self.doc_to_choice(fs, fs_id)[a]
            elif isinstance(a, list):
                a = a[0]
            has_answer = a is not None and a != ""
            turns.append(["user", str(q), cfg.target_delimiter if has_answer else ""])
            if has_answer:
                turns.append(["assistant", str(a), cfg.fewshot_delimiter])
        q = self.doc_to_text(doc, doc_id)
        if not isinstance(q, str):
            raise cfg.error("doc_to_text", f"document {doc_id}: expected text, got {q!r}")
        turns.append(["user", q, ""])
        if chat is None:
            return system + "".join(content + delim for _, content, delim in turns)
        # lm-eval's default (few-shot not as multi-turn): one user message holding it all.
        turns[-1][2] = ""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": "".join(c + d for _, c, d in turns)})
        return chat(messages)

    def _sample(self, doc: dict, n: int, rnd: random.Random) -> list[dict]:
        if n == 0:
            return []
        pool = self.fewshot_docs()
        cfg = self.cfg
        exclude = cfg.fewshot_split == cfg.test_split  # lm-eval drops the doc itself then
        if cfg.fewshot_sampler == "first_n":
            pool = [d for d in pool if d != doc] if exclude else pool
            if n > len(pool):
                raise cfg.error("num_fewshot", f"{n} examples asked, the few-shot split has {len(pool)}")
            return pool[:n]
        if n + int(exclude) > len(pool):
            raise cfg.error("num_fewshot", f"{n} examples asked, the few-shot split has {len(pool)}")
        if not exclude:
            return rnd.sample(pool, n)
        picked = [d for d in rnd.sample(pool, n + 1) if d != doc][:n]
        if len(picked) < n:
            picked = rnd.sample([d for d in pool if d != doc], n)
        return picked

    def _requests(self, doc: dict, doc_id: int, context: str, chat: bool) -> DocRequests:
        cfg = self.cfg
        kind = cfg.output_type
        target = self.doc_to_target(doc, doc_id)
        choices = None
        if kind == "multiple_choice":
            choices = self.doc_to_choice(doc, doc_id)
            _check_gold(cfg, target, choices, doc_id)
            delim = "" if chat else cfg.target_delimiter
            args = [(context, f"{delim}{c}") for c in choices]
        elif kind == "loglikelihood":
            if not isinstance(target, str):
                raise cfg.error("doc_to_target", f"document {doc_id}: expected text to score, got {target!r}")
            args = [(context, target)]
        elif kind == "loglikelihood_rolling":
            if not isinstance(target, str) or not target:
                raise cfg.error(
                    "doc_to_target", f"document {doc_id}: expected non-empty text, got {target!r}"
                )
            args = [(target,)]
        else:
            if cfg.doc_to_choice is not None:
                choices = self.doc_to_choice(doc, doc_id)
                _check_gold(cfg, target, choices, doc_id)
            args = [(context, dict(cfg.generation_kwargs))]
        return DocRequests(doc_id, doc, context, target, choices, args)


def _check_gold(cfg: TaskConfig, target: Any, choices: list[str], doc_id: int) -> None:
    golds = target if isinstance(target, list) else [target]
    for gold in golds:
        if isinstance(gold, bool) or not isinstance(gold, (int, str)):
            raise cfg.error(
                "doc_to_target", f"document {doc_id}: expected a choice index or text, got {gold!r}"
            )
        if isinstance(gold, int) and not 0 <= gold < len(choices):
            raise cfg.error(
                "doc_to_target",
                f"document {doc_id}: gold index {gold} is out of range for its {len(choices)} choices",
            )
        if isinstance(gold, str) and gold not in choices:
            raise cfg.error("doc_to_target", f"document {doc_id}: gold {gold!r} is not one of its choices")


def _delimit(prefix: str | None, suffix: str | None, delimiter: str) -> str:
    """lm-eval's `maybe_delimit`: join with the delimiter unless either side brings whitespace."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() else prefix + delimiter + suffix


def _undefined_name(exc: UndefinedError) -> str:
    match = re.search(r"'([^']+)' is undefined", str(exc))
    return (
        f"the template uses field {match.group(1)!r}, which is missing" if match else f"template error: {exc}"
    )


def _files(cfg: TaskConfig, split: str) -> str:
    return ", ".join(str(p) for p in cfg.data_files[split])


def gold_index(target: Any, choices: list[str]) -> int | list[int]:
    """The gold choice(s) as indices."""
    if isinstance(target, list):
        return [t if isinstance(t, int) else choices.index(t) for t in target]
    return target if isinstance(target, int) else choices.index(target)


__all__ = ["ChatFormatter", "DocRequests", "Task", "gold_index"]
