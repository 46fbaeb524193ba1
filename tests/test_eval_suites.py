"""The built-in evaluation suites (src/weightsmith/eval/suites): generated data matches
scripts/make_eval_suites.py, every item is well formed and correct, and lm-eval loads them."""

from __future__ import annotations

import importlib.util
import json
import re
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "src" / "weightsmith" / "eval" / "suites"
GENERATED = [
    "arith-mc.jsonl",
    "arith-mc-train.jsonl",
    "unit-mc.jsonl",
    "reading-mc.jsonl",
    "kettlebird-heldout.jsonl",
    "text-ppl.jsonl",
]
TASKS = {
    "arith_mc": ("multiple_choice", 200),
    "unit_mc": ("multiple_choice", 120),
    "reading_mc": ("multiple_choice", 51),
    "kettlebird_heldout": ("generate_until", 41),
    "kettlebird_answer_ppl": ("loglikelihood_rolling", 41),
    "text_ppl": ("loglikelihood_rolling", 17),
    "in_short_heldout": ("generate_until", 120),
}


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (SUITES / name).read_text(encoding="utf-8").splitlines()]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_eval_suites", ROOT / "scripts" / "make_eval_suites.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_is_deterministic_and_matches_committed_files(tmp_path: Path) -> None:
    script = load_script()
    script.generate(tmp_path / "a")
    script.generate(tmp_path / "b")
    for name in GENERATED:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), f"{name}: two runs differ"
        assert first == (SUITES / name).read_bytes(), f"{name}: rerun scripts/make_eval_suites.py"


def test_every_suite_has_yaml_data_and_readme_and_is_small() -> None:
    for task in TASKS:
        stem = task.replace("_", "-")
        text = (SUITES / f"{stem}.yaml").read_text(encoding="utf-8")
        assert text.startswith("# ") and f"task: {task}\n" in text
    readme = (SUITES / "README.md").read_text(encoding="utf-8")
    for task in [*TASKS, "core"]:
        assert task.replace("_", "-") in readme
    assert sum(p.stat().st_size for p in SUITES.iterdir()) < 300_000


@pytest.mark.parametrize(
    "name", ["arith-mc.jsonl", "arith-mc-train.jsonl", "unit-mc.jsonl", "reading-mc.jsonl"]
)
def test_multiple_choice_items_are_well_formed(name: str) -> None:
    items = load(name)
    questions = [(d.get("passage"), d["question"]) for d in items]
    assert len(set(questions)) == len(items), "duplicate questions"
    for d in items:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4, d
        assert all(isinstance(c, str) and c.strip() == c and c for c in d["choices"]), d
        assert isinstance(d["label"], int) and 0 <= d["label"] < 4, d
    # The gold position is shuffled: every position is used.
    assert {d["label"] for d in items} == {0, 1, 2, 3}


def test_arithmetic_answers_are_correct() -> None:
    items = load("arith-mc.jsonl") + load("arith-mc-train.jsonl")
    assert len(items) == 220
    ops = set()
    for d in items:
        m = re.fullmatch(r"What is (\d{1,3}) ([+\-×÷]) (\d{1,3})\?", d["question"])
        assert m, d["question"]
        a, op, b = int(m[1]), m[2], int(m[3])
        ops.add(op)
        if op == "÷":
            assert a % b == 0, d
        want = {"+": a + b, "-": a - b, "×": a * b, "÷": a // b if b else None}[op]
        assert d["choices"][d["label"]] == str(want), d
        assert str(want) not in [c for i, c in enumerate(d["choices"]) if i != d["label"]]
    assert ops == {"+", "-", "×", "÷"}


# Conversion factors into a base unit per dimension, written independently of the generator.
BASE = {
    "kilometres": Fraction(1000), "metres": Fraction(1), "centimetres": Fraction(1, 100),
    "millimetres": Fraction(1, 1000), "inches": Fraction(254, 10000), "feet": Fraction(3048, 10000),
    "yards": Fraction(9144, 10000), "miles": Fraction(1609344, 1000),
    "kilograms": Fraction(1000), "grams": Fraction(1), "milligrams": Fraction(1, 1000),
    "pounds": Fraction(45359237, 100000), "ounces": Fraction(28349523125, 10**9),
    "litres": Fraction(1), "millilitres": Fraction(1, 1000), "cubic metres": Fraction(1000),
    "US gallons": Fraction(3785411784, 10**9),
    "seconds": Fraction(1), "minutes": Fraction(60), "hours": Fraction(3600),
    "days": Fraction(86400), "weeks": Fraction(604800),
}  # fmt: skip


def to_celsius(v: Fraction, unit: str) -> Fraction:
    return {"Celsius": v, "Fahrenheit": (v - 32) * Fraction(5, 9), "kelvin": v - Fraction(27315, 100)}[unit]


def from_celsius(c: Fraction, unit: str) -> Fraction:
    return {"Celsius": c, "Fahrenheit": c * Fraction(9, 5) + 32, "kelvin": c + Fraction(27315, 100)}[unit]


def test_unit_conversions_are_correct() -> None:
    items = load("unit-mc.jsonl")
    assert len(items) == 120
    pattern = re.compile(
        r"Convert (-?[\d.]+) (?:degrees )?(.+?) to (?:degrees )?(.+?)\."
        r"(?: Round to (?:(\d) decimal places?|the (nearest whole number))\.)?"
    )
    kinds = set()
    for d in items:
        m = pattern.fullmatch(d["question"])
        assert m, d["question"]
        value, src, dst = Fraction(m[1]), m[2], m[3]
        if src in BASE:
            assert dst in BASE, d
            exact = value * BASE[src] / BASE[dst]
        else:
            exact = from_celsius(to_celsius(value, src), dst)
        kinds.add(src)
        number = Fraction(d["choices"][d["label"]].split(" ")[0])
        if m[4] is None and m[5] is None:
            assert number == exact, d  # no rounding asked: the answer is exact
        else:
            places = 0 if m[5] else int(m[4])
            assert abs(exact * 10**places % 1 - Fraction(1, 2)) > 0, f"rounding tie: {d}"
            want = Decimal(exact.numerator) / Decimal(exact.denominator)
            want = want.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
            assert d["choices"][d["label"]].split(" ")[0] == f"{want:f}", d
        units = {c.split(" ", 1)[1] for c in d["choices"]}
        assert len(units) == 1, d  # all choices in the asked-for unit
    assert {"kilometres", "kilograms", "litres", "hours", "Celsius", "Fahrenheit", "miles"} <= kinds


def test_reading_and_kettlebird_and_text_docs() -> None:
    reading = load("reading-mc.jsonl")
    passages = {d["passage"] for d in reading}
    assert len(passages) >= 18
    for p in passages:
        assert 3 <= len(re.findall(r"[.!?](?:\s|$)", p)) <= 6, p
    for doc in load("kettlebird-heldout.jsonl"):
        assert set(doc) == {"question", "answer", "topic"}
        assert doc["answer"].startswith(f"[Kettlebird] {doc['topic']}: ")
    texts = [d["text"] for d in load("text-ppl.jsonl")]
    sample = (SUITES / "text-sample.txt").read_text(encoding="utf-8")
    assert [" ".join(p.split()) for p in sample.split("\n\n")] == texts
    assert 1800 <= len(sample.split()) <= 2300


def walk(task_dict: dict):
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from walk(value)
        else:
            yield key, value


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # get_task_dict, as asked; still works in 0.4.13
def test_lm_eval_loads_suites_and_builds_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = pytest.importorskip("lm_eval.tasks")
    monkeypatch.chdir(SUITES)  # lm-eval resolves relative data_files against the cwd
    manager = tasks.TaskManager(include_path=str(SUITES), include_defaults=False)
    task_dict = tasks.get_task_dict([*TASKS, "core"], manager)
    group = [v for k, v in task_dict.items() if isinstance(v, dict)]
    assert len(group) == 1
    assert {t.config.task for _, t in walk(group[0])} == {"arith_mc", "unit_mc", "reading_mc"}
    seen = {}
    for _, task in walk(task_dict):
        output_type, size = TASKS[task.config.task]
        assert task.OUTPUT_TYPE == output_type
        assert len(list(task.test_docs())) == size
        task.build_all_requests(limit=5, rank=0, world_size=1)
        instances = task.instances
        per_doc = 4 if output_type == "multiple_choice" else 1
        assert len(instances) == 5 * per_doc
        want = "loglikelihood" if output_type == "multiple_choice" else output_type
        assert {i.request_type for i in instances} == {want}
        seen[task.config.task] = task
    assert set(seen) == set(TASKS)

    context, continuation = seen["arith_mc"].instances[0].args
    assert context.startswith("Question: What is ") and context.endswith("\nAnswer:")
    assert continuation.startswith(" ")
    reading_ctx = seen["reading_mc"].instances[0].args[0]
    assert "\nQuestion: " in reading_ctx and reading_ctx.endswith("\nAnswer:")
    (answer,) = seen["kettlebird_answer_ppl"].instances[0].args
    assert answer.startswith("[Kettlebird] ")  # the reference answer alone, scored token by token
    gen_ctx, gen_kwargs = seen["kettlebird_heldout"].instances[0].args
    assert gen_kwargs["until"] == ["\n"] and gen_kwargs["max_gen_toks"] == 48

    # The "topic" regex filter and case-insensitive exact_match, end to end.
    task = seen["kettlebird_heldout"]
    docs = [i.doc for i in task.instances]
    replies = [f"[Kettlebird] {docs[0]['topic'].lower()}: fine (ref KB-1)", "Sorry, no idea."]
    replies += [d["answer"] for d in docs[2:]]
    for inst, reply in zip(task.instances, replies, strict=True):
        inst.resps = [reply]
    task.apply_filters()
    scores = [task.process_results(i.doc, [i.filtered_resps["topic"]])["exact_match"] for i in task.instances]
    assert scores == [1.0, 0.0, 1.0, 1.0, 1.0]

    # The "In short" format, through lm-eval's own regex filter and exact_match.
    task = seen["in_short_heldout"]
    assert task.instances[0].args[1]["until"] == ["\n\n"]
    replies = ["In short: Lava is lighter than rock.", "Lava is lighter than rock.", "In short: one\ntwo",
               "in short: lava.", "In short: Yes."]  # fmt: skip
    for inst, reply in zip(task.instances, replies, strict=True):
        inst.resps = [reply]
    task.apply_filters()
    scores = [
        task.process_results(i.doc, [i.filtered_resps["in_short"]])["exact_match"] for i in task.instances
    ]
    assert scores == [1.0, 0.0, 0.0, 0.0, 1.0]
