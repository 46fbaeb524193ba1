"""The bundled "In short" synth example (datasets/in-short: seeds and prompt templates) and its
held-out eval task (builtin:in-short-heldout): the files parse, the task's regex filter and
exact_match accept a reply in the format and reject near misses, the seeds themselves pass,
and the held-out questions share no question with the seeds. No model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightsmith.eval import metrics as M
from weightsmith.eval.runner import load_tasks
from weightsmith.synth.prompts import load_prompts
from weightsmith.synth.recipes import read_prompt_rows
from weightsmith.synth.rouge import rouge_l, tokenize

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "weightsmith" / "datasets" / "in-short"


@pytest.fixture(scope="module")
def task():
    (task,) = load_tasks(["builtin:in-short-heldout"]).tasks
    return task


def score(task, reply: str) -> float:
    cfg = task.cfg
    (values,) = M.generation(
        reply, task.doc_to_target(task.docs[0], 0), None, cfg.metrics, cfg.filters
    ).values()
    return values["exact_match"]


def test_the_task_has_120_distinct_questions_and_a_constant_target(task) -> None:
    questions = [d["question"] for d in task.docs]
    assert len(questions) == 120 == len(set(questions))
    assert {task.doc_to_target(d, i) for i, d in enumerate(task.docs)} == {"In short"}
    assert task.cfg.output_type == "generate_until"


@pytest.mark.parametrize(
    "reply",
    ["In short: Lava rises because it is lighter than the rock around it.", "In short: Yes.\n"],
)
def test_a_reply_in_the_format_scores_1(task, reply: str) -> None:
    assert score(task, reply) == 1.0


@pytest.mark.parametrize(
    "reply",
    [
        "Lava rises because it is lighter than the rock around it.",  # no opening
        "in short: lava rises.",  # the opening is case-sensitive
        "In short: Lava rises.\nIt is lighter than the rock around it.",  # more than one line
        "Sure! In short: lava rises.",  # not at the start
        "In short:",  # no answer
        "In short:Lava rises.",  # no space after the colon
        "",
    ],
)
def test_a_reply_not_in_the_format_scores_0(task, reply: str) -> None:
    assert score(task, reply) == 0.0


def test_the_seeds_parse_and_their_answers_are_in_the_format(task) -> None:
    import json

    rows = read_prompt_rows(EXAMPLE / "seeds.jsonl", "--seed")
    assert len(rows) == 20 == len({r["instruction"] for r in rows})
    answers = [json.loads(line)["answer"] for line in (EXAMPLE / "seeds.jsonl").read_text().splitlines()]
    assert all(score(task, a) == 1.0 for a in answers)


def test_no_held_out_question_is_a_seed_or_close_to_one(task) -> None:
    seeds = [tokenize(r["instruction"]) for r in read_prompt_rows(EXAMPLE / "seeds.jsonl", "--seed")]
    closest = max(rouge_l(tokenize(d["question"]), s) for d in task.docs for s in seeds)
    assert closest < 0.7  # below synth's own near-duplicate threshold


def test_the_templates_replace_the_shipped_ones_and_name_a_subject_per_request() -> None:
    prompts = load_prompts(str(EXAMPLE), ("self_instruct", "answer"))
    assert prompts.files["answer"] == EXAMPLE / "answer.txt"
    assert prompts.files["self_instruct"] == EXAMPLE / "self_instruct.txt"
    answer = prompts.render("answer", instruction="Why do rivers bend?")
    assert answer.endswith("Question: Why do rivers bend?") and answer.count("\nIn short: ") == 3
    seeds = [r["instruction"] for r in read_prompt_rows(EXAMPLE / "seeds.jsonl", "--seed")]
    asks = [prompts.render("self_instruct", examples=seeds[i : i + 3]) for i in range(18)]
    assert asks == [prompts.render("self_instruct", examples=seeds[i : i + 3]) for i in range(18)]
    subjects = {a.rsplit("Write one new question about ", 1)[1].split(",")[0] for a in asks}
    assert len(subjects) >= 6  # the requests spread over the subjects
