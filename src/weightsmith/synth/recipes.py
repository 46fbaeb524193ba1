"""The four recipes: what each step asks for, and what the example is trained on.

- self-instruct (Wang et al. 2022): each request shows a few seed tasks and a few tasks
  generated so far, sampled afresh per request, and asks for a new one; it is then answered.
  Steps go on until `n` examples are kept (or `max_steps`).
- evolve (Evol-Instruct, Xu et al. 2023): each instruction of a data file is rewritten by one
  operation (deepen, broaden, concretise; chosen per item from the seed), then answered;
  round r rewrites what round r-1 kept.
- grounded: `questions_per_chunk` questions per chunk of the user's documents, each answered
  from its chunk; the example keeps the chunk's location.
- answer: the given prompts, answered by the (teacher) model: distillation.

A recipe proposes `Candidate`s from a cursor saved in the state, so a resumed run asks the same
things in the same order; every random choice comes from (seed, step, item).

Not here: filtering and answering (synth.pipeline), reading documents (synth.docs).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import UsageError
from weightsmith.synth.prompts import Prompts

EVOLVE_OPERATIONS = ("deepen", "broaden", "concretise")


@dataclass
class Candidate:
    """One example on its way: the request for its instruction (None: given), its context."""

    ask: list[dict] | None
    instruction: str = ""
    context: str | None = None  # grounded: the chunk the answer must come from
    conversation: list[dict] | None = None  # answer: a given conversation to continue
    meta: dict[str, Any] = field(default_factory=dict)


def check_operations(operations: list[str]) -> None:
    unknown = [op for op in operations if op not in EVOLVE_OPERATIONS]
    if unknown or not operations:
        raise UsageError(
            f"--operations: {', '.join(unknown) or 'none'}; choose from {', '.join(EVOLVE_OPERATIONS)}"
        )


def stable_int(*parts: Any) -> int:
    """A 31-bit integer from `parts`, the same in every process (seeds of requests)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def read_prompt_rows(path: Path, flag: str) -> list[dict[str, Any]]:
    """Instructions from a file: JSONL rows with "instruction" (+ "input"), "prompt", or chat
    "messages" (the conversation up to its last user turn); or a .txt file, one per line.
    Each row: {"instruction", "conversation" (or None), "source": "FILE:LINE"}."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read it ({e})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix.lower() == ".txt":
            rows.append({"instruction": line.strip(), "conversation": None, "source": where})
            continue
        rows.append({**_row(line, where), "source": where})
    if not rows:
        raise UsageError(
            f"{flag} {path}: the file has no examples; write one JSON object per line with an "
            '"instruction" (or "prompt", or chat "messages"), or a .txt file with one per line'
        )
    return rows


def _row(line: str, where: str) -> dict[str, Any]:
    from weightsmith.files import json_object_line

    obj = json_object_line(line, where, "example", UsageError)
    for key in ("instruction", "prompt"):
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            extra = obj.get("input")
            text = (
                f"{value.strip()}\n\n{extra.strip()}"
                if isinstance(extra, str) and extra.strip()
                else value.strip()
            )
            return {"instruction": text, "conversation": None}
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
        if users and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            last = users[-1]
            conversation = [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]
            return {"instruction": messages[last]["content"].strip(), "conversation": conversation}
    raise UsageError(f'{where}: no "instruction", "prompt" or chat "messages" with a user turn; add one')


class SelfInstruct:
    name = "self-instruct"
    templates = ("self_instruct", "answer")

    def __init__(self, seeds: list[dict], prompts: Prompts, *, n: int, batch: int, seed: int,
                 seed_examples: int = 3, generated_examples: int = 2, max_steps: int | None = None) -> None:  # fmt: skip
        self.seeds = [r["instruction"] for r in seeds]
        self.prompts, self.n, self.batch, self.seed = prompts, n, batch, seed
        self.seed_examples, self.generated_examples = seed_examples, generated_examples
        self.max_steps = max_steps if max_steps is not None else 10 * (-(-n // batch)) + 10
        self.target = n

    def known_instructions(self) -> list[str]:
        return list(self.seeds)

    def propose(self, step: int, cursor: dict, kept: list[dict]) -> tuple[list[Candidate], dict]:
        if len(kept) >= self.n or step >= self.max_steps:
            return [], cursor
        generated = [r["messages"][-2]["content"] for r in kept]
        out = []
        for i in range(self.batch):
            rng = random.Random(f"{self.seed}:{step}:{i}")
            examples = rng.sample(self.seeds, min(self.seed_examples, len(self.seeds)))
            examples += rng.sample(generated, min(self.generated_examples, len(generated)))
            rng.shuffle(examples)
            ask = [{"role": "user", "content": self.prompts.render("self_instruct", examples=examples)}]
            out.append(Candidate(ask, meta={"examples": len(examples)}))
        return out, cursor

    def answer_messages(self, c: Candidate) -> list[dict]:
        return [{"role": "user", "content": self.prompts.render("answer", instruction=c.instruction)}]


class Answer:
    name = "answer"
    templates = ("answer",)
    target = None

    def __init__(self, rows: list[dict], prompts: Prompts, *, batch: int) -> None:
        self.rows, self.prompts, self.batch = rows, prompts, batch

    def known_instructions(self) -> list[str]:
        return []

    def propose(self, step: int, cursor: dict, kept: list[dict]) -> tuple[list[Candidate], dict]:
        start = cursor.get("offset", 0)
        rows = self.rows[start : start + self.batch]
        out = [Candidate(None, r["instruction"], conversation=r["conversation"], meta={"source": r["source"]})
               for r in rows]  # fmt: skip
        return out, {"offset": start + len(rows)}

    def answer_messages(self, c: Candidate) -> list[dict]:
        if c.conversation is not None:
            return c.conversation
        return [{"role": "user", "content": self.prompts.render("answer", instruction=c.instruction)}]


class Evolve:
    name = "evolve"
    templates = ("evolve_deepen", "evolve_broaden", "evolve_concretise", "answer")
    target = None

    def __init__(self, rows: list[dict], prompts: Prompts, *, rounds: int, operations: list[str],
                 batch: int, seed: int) -> None:  # fmt: skip
        check_operations(operations)
        self.rows, self.prompts, self.rounds = rows, prompts, rounds
        self.operations, self.batch, self.seed = list(operations), batch, seed

    def known_instructions(self) -> list[str]:
        return []

    def _inputs(self, rnd: int, kept: list[dict]) -> list[tuple[str, str]]:
        if rnd == 1:
            return [(r["instruction"], r["source"]) for r in self.rows]
        return [
            (k["messages"][-2]["content"], k["meta"]["source"]) for k in kept if k["meta"]["round"] == rnd - 1
        ]

    def propose(self, step: int, cursor: dict, kept: list[dict]) -> tuple[list[Candidate], dict]:
        rnd, offset = cursor.get("round", 1), cursor.get("offset", 0)
        while rnd <= self.rounds:
            items = self._inputs(rnd, kept)[offset : offset + self.batch]
            if items:
                break
            rnd, offset = rnd + 1, 0
        else:
            return [], {"round": rnd, "offset": 0}
        out = []
        for j, (text, source) in enumerate(items, offset):
            op = self.operations[stable_int(self.seed, rnd, j) % len(self.operations)]
            ask = [{"role": "user", "content": self.prompts.render(f"evolve_{op}", instruction=text)}]
            out.append(
                Candidate(ask, meta={"round": rnd, "operation": op, "evolved_from": text, "source": source})
            )
        return out, {"round": rnd, "offset": offset + len(items)}

    def answer_messages(self, c: Candidate) -> list[dict]:
        return [{"role": "user", "content": self.prompts.render("answer", instruction=c.instruction)}]


class Grounded:
    name = "grounded"
    templates = ("grounded_question", "grounded_answer")
    target = None

    def __init__(self, chunks: list[Any], prompts: Prompts, *, questions: int, batch: int) -> None:
        self.items = [(c, q) for c in chunks for q in range(1, questions + 1)]
        self.prompts, self.batch = prompts, batch

    def known_instructions(self) -> list[str]:
        return []

    def propose(self, step: int, cursor: dict, kept: list[dict]) -> tuple[list[Candidate], dict]:
        start = cursor.get("offset", 0)
        items = self.items[start : start + self.batch]
        out = []
        for chunk, q in items:
            ask = [
                {
                    "role": "user",
                    "content": self.prompts.render("grounded_question", chunk=chunk.text, number=q),
                }
            ]
            out.append(Candidate(ask, context=chunk.text, meta={"source": chunk.location, "question": q}))
        return out, {"offset": start + len(items)}

    def answer_messages(self, c: Candidate) -> list[dict]:
        text = self.prompts.render("grounded_answer", chunk=c.context, question=c.instruction)
        return [{"role": "user", "content": text}]
