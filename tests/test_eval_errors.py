"""Bad task files are refused before any model loads, each with one line naming the file,
the field (and its line in the YAML) and, for data, the data file and its line; bad
`weightsmith eval` options likewise."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from weightsmith.cli.main import main
from weightsmith.errors import WeightsmithError
from weightsmith.eval.runner import load_tasks

DOCS = [
    {"question": f"what is {i} plus one", "choices": ["a", "b", "c", "d"], "label": i % 4, "answer": "b"}
    for i in range(4)
]
TRAIN = DOCS[:3]

#: One key a line (values in flow style), so a key's line is its position.
MC = {
    "task": "t_mc",
    "dataset_path": "json",
    "dataset_kwargs": "{data_files: {test: mc.jsonl, train: train.jsonl}}",
    "test_split": "test",
    "fewshot_split": "train",
    "output_type": "multiple_choice",
    "doc_to_text": '"Q: {{question}}"',
    "doc_to_choice": '"{{choices}}"',
    "doc_to_target": "label",
}
GEN = {
    "task": "t_gen",
    "dataset_path": "json",
    "dataset_kwargs": "{data_files: {test: mc.jsonl}}",
    "output_type": "generate_until",
    "doc_to_text": '"Q: {{question}}"',
    "doc_to_target": "answer",
    "generation_kwargs": '{until: ["\\n"], max_gen_toks: 4}',
}


def task_yaml(base: dict[str, str], **changes: str | None) -> str:
    """`base` with keys replaced (None: removed) or appended, one `key: value` a line."""
    keys = {**base, **changes}
    return "".join(f"{k}: {v}\n" for k, v in keys.items() if v is not None)


def line_of(text: str, key: str) -> int:
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(f"{key}:"):
            return n
    raise AssertionError(f"{key} not in the YAML")


@dataclass
class Case:
    id: str
    yaml: str
    #: The key named in the message (also the YAML key whose line it must give, if `line_key`).
    field: str | None
    contains: tuple[str, ...] = ()
    line_key: str | None = None
    #: Files beside the task file: name -> text (None: use the good data).
    files: dict[str, str] = field(default_factory=dict)
    #: The file the message must name: "task" (the YAML), or a file name from `files`.
    names: str = "task"
    #: The line in `names` the message must give (data files).
    line: int | None = None
    spec: str | None = None  # what to pass to load_tasks instead of the task file


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def mc_case(id: str, fld: str, contains=(), *, line_key=True, **changes) -> Case:
    text = task_yaml(MC, **changes)
    return Case(id, text, fld, tuple(contains), fld.split(".")[0] if line_key else None)


def gen_case(id: str, fld: str, contains=(), *, line_key=True, **changes) -> Case:
    text = task_yaml(GEN, **changes)
    return Case(id, text, fld, tuple(contains), fld.split(".")[0] if line_key else None)


GROUP_OK = "group: g\ntask: [t_mc]\naggregate_metric_list:\n  - {metric: acc, weight_by_size: true}\n"

CASES = [
    mc_case("unknown-output-type", "output_type", ["multiple_choise", "generate_until"], output_type="multiple_choise"),
    mc_case("typo-key-did-you-mean", "doc_to_txt", ["did you mean 'doc_to_text'"], doc_to_text=None, doc_to_txt='"{{question}}"'),
    mc_case("python-function", "process_docs", ["!function utils.process_docs", "not supported"], process_docs="!function utils.process_docs"),
    mc_case("python-function-template", "doc_to_text", ["!function utils.doc_to_text"], doc_to_text="!function utils.doc_to_text"),
    mc_case("hub-dataset", "dataset_path", ["json or csv", "super_glue"], dataset_path="super_glue"),
    mc_case("missing-data-file", "dataset_kwargs.data_files.test", ["data file not found", "nope.jsonl"],
            dataset_kwargs="{data_files: {test: nope.jsonl, train: train.jsonl}}"),
    mc_case("split-not-in-data-files", "test_split", ["'validation'", "test, train"], test_split="validation"),
    mc_case("missing-template-field", "doc_to_text", ["'questoin'", "document 0", "question"], doc_to_text='"{{questoin}}"'),
    mc_case("gold-string-not-a-choice", "doc_to_target", ["'zz'", "document 0"], doc_to_target="'zz'"),
    mc_case("choice-template-not-a-list", "doc_to_choice", ["document 0", "not a list literal"], doc_to_choice='"{{question}}"'),
    mc_case("choice-list-of-numbers", "doc_to_choice", ["document 0", "list of strings"], doc_to_choice="'{{[1, 2]}}'"),
    mc_case("mc-without-choices", "doc_to_choice", ["multiple_choice task needs doc_to_choice"], line_key=False, doc_to_choice=None),
    mc_case("metric-not-for-output-type", "metric_list", ["word_perplexity", "multiple_choice", "acc_norm"],
            metric_list="[{metric: word_perplexity}]"),
    mc_case("unknown-aggregation", "metric_list", ["'median'"], metric_list="[{metric: acc, aggregation: median}]"),
    mc_case("negative-num-fewshot", "num_fewshot", ["-1"], num_fewshot="-1"),
    mc_case("num-fewshot-over-pool", "num_fewshot", ["5 examples", "has 3"], num_fewshot="5"),
    mc_case("bad-fewshot-sampler", "fewshot_config", ["'random'"], fewshot_config="{sampler: random}"),
    mc_case("filters-on-mc", "filter_list", ["generate_until tasks only"], filter_list="[{name: f, filter: [{function: take_first}]}]"),
    gen_case("bad-filter-function", "filter_list", ["'strip'", "take_first"], filter_list="[{name: f, filter: [{function: strip}]}]"),
    gen_case("bad-filter-regex", "filter_list", ["regex_pattern", "step 0"],
             filter_list='[{name: f, filter: [{function: regex, regex_pattern: "(unclosed"}]}]'),
    gen_case("unknown-generation-kwarg", "generation_kwargs.max_tokens", ["unknown key"],
             generation_kwargs="{until: [x], max_tokens: 5}"),
    gen_case("bad-max-gen-toks", "generation_kwargs.max_gen_toks", ["positive integer"], generation_kwargs="{max_gen_toks: 0}"),
    gen_case("unknown-metric-option", "metric_list", ["'ignore_spaces'"], metric_list="[{metric: exact_match, ignore_spaces: true}]"),
    gen_case("judge-bad-scale", "judge.scale", ["low < high"], judge="{model: tiny, rubric: 'Rate {{answer}}', scale: [5, 1]}"),
    gen_case("judge-unknown-key", "judge.rubrik", ["unknown key"], judge="{model: tiny, rubrik: 'Rate it'}"),
    gen_case("judge-missing-rubric", "judge.rubric", ["required"], judge="{model: tiny}"),
    gen_case("repeats", "repeats", ["repeats: 1"], repeats="3"),
    # A gold index out of range: document 2 has label 7 but 4 choices.
    Case("gold-index-out-of-range", task_yaml(MC), "doc_to_target", ("document 2", "gold index 7", "4 choices"),
         "doc_to_target", files={"mc.jsonl": jsonl([DOCS[0], DOCS[1], {**DOCS[2], "label": 7}])}),
    Case("broken-json-line", task_yaml(MC), None, ("invalid JSON line: Expecting property name enclosed in double quotes (column 19)",),
         files={"mc.jsonl": jsonl(DOCS[:2]) + '{"question": "x", \n' + jsonl(DOCS[2:])}, names="mc.jsonl", line=3),
    Case("document-not-an-object", task_yaml(MC), None, ("JSON object", "list"),
         files={"mc.jsonl": jsonl(DOCS[:1]) + "[1, 2]\n"}, names="mc.jsonl", line=2),
    Case("empty-dataset", task_yaml(MC), "test_split", ("has no documents", "mc.jsonl"), "test_split",
         files={"mc.jsonl": "\n"}),
    Case("yaml-syntax-error", "task: t\ndataset_path: json\ndoc_to_text: [unclosed\noutput_type: x\n", None,
         ("invalid YAML",), line=4),
    Case("yaml-not-a-mapping", "- task: t\n", None, ("expected a mapping",)),
    Case("group-names-unknown-task", "group: g\ntask: [t_mc, t_nope]\n", "task", ("'t_nope'", "group 'g'"), "task",
         files={"mc_task.yaml": task_yaml(MC)}),
    Case("group-non-mean-aggregation",
         "group: g\ntask: [t_mc]\naggregate_metric_list:\n  - {metric: acc, aggregation: median}\n",
         "aggregate_metric_list", ("only aggregation: mean",), "aggregate_metric_list",
         files={"mc_task.yaml": task_yaml(MC)}),
    Case("group-unknown-key", GROUP_OK + "weights: [1]\n", "weights", ("unknown key",), "weights",
         files={"mc_task.yaml": task_yaml(MC)}),
    Case("group-member-broken", GROUP_OK, "doc_to_text", ("'questoin'",), "doc_to_text",
         files={"t_mc.yaml": task_yaml(MC, doc_to_text='"{{questoin}}"')}, names="t_mc.yaml"),
]  # fmt: skip


def write_case(tmp_path: Path, case: Case) -> Path:
    files = {"mc.jsonl": jsonl(DOCS), "train.jsonl": jsonl(TRAIN), **case.files}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    path = tmp_path / "task.yaml"
    path.write_text(case.yaml, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_task_file_is_one_line_naming_file_field_and_line(case: Case, tmp_path: Path) -> None:
    path = write_case(tmp_path, case)
    with pytest.raises(WeightsmithError) as info:
        load_tasks([str(path)])
    message = str(info.value)
    assert "\n" not in message, message
    named = path if case.names == "task" else tmp_path / case.names
    assert str(named) in message, message
    if case.field is not None:
        assert f": {case.field}: " in message, message
    if case.line_key is not None:
        source = named.read_text(encoding="utf-8")
        assert f"{named}:{line_of(source, case.line_key)}: " in message, message
    if case.line is not None:
        assert f"{named}:{case.line}: " in message, message
    for text in case.contains:
        assert text in message, message


def test_every_case_is_valid_once_fixed(tmp_path: Path) -> None:
    """The base task files load, so each case above fails for the reason it names."""
    for i, base in enumerate((MC, GEN)):
        folder = tmp_path / str(i)
        folder.mkdir()
        path = write_case(folder, Case("ok", task_yaml(base), None))
        taskset = load_tasks([str(path)])
        assert [len(t.build()) for t in taskset.tasks] == [len(DOCS)]
    (tmp_path / "0" / "group.yaml").write_text(GROUP_OK)
    taskset = load_tasks([str(tmp_path / "0" / "group.yaml")])
    assert [t.name for t in taskset.tasks] == ["t_mc"] and taskset.groups[0].group == "g"


def test_build_time_errors_also_come_from_task_build(tmp_path: Path) -> None:
    """load_tasks catches them by rendering every document; Task.build gives the same line."""
    from weightsmith.eval.prompts import Task
    from weightsmith.eval.tasks import read_task_file

    path = write_case(tmp_path, Case("x", task_yaml(MC, doc_to_text='"{{questoin}}"'), None))
    with pytest.raises(WeightsmithError) as early:
        load_tasks([str(path)])
    with pytest.raises(WeightsmithError) as late:
        Task(read_task_file(path)).build()
    assert str(early.value) == str(late.value)


def test_num_fewshot_option_is_checked_against_the_pool_up_front(tmp_path: Path) -> None:
    from weightsmith.eval.runner import EvalOptions

    path = write_case(tmp_path, Case("x", task_yaml(MC), None))
    load_tasks([str(path)], EvalOptions(num_fewshot=3))
    with pytest.raises(WeightsmithError, match=r"num_fewshot: 4 examples asked, the few-shot split has 3"):
        load_tasks([str(path)], EvalOptions(num_fewshot=4))


@pytest.mark.parametrize(
    ("spec", "contains"),
    [
        ("builtin:cor", ["unknown built-in suite 'builtin:cor'", "did you mean 'builtin:core'"]),
        ("builtin:nope", ["unknown built-in suite 'builtin:nope'", "arith-mc", "core"]),
        ("{tmp}/empty", ["{tmp}/empty: no task files"]),
        ("{tmp}/missing.yaml", ["task file not found: {tmp}/missing.yaml"]),
    ],
)
def test_bad_task_spec(spec: str, contains: list[str], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a task")
    with pytest.raises(WeightsmithError) as info:
        load_tasks([spec.format(tmp=tmp_path)])
    message = str(info.value)
    assert "\n" not in message
    for text in contains:
        assert text.format(tmp=tmp_path) in message, message


# ---- the command ---------------------------------------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    """Every error below must come before a model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("weightsmith.commands.eval.load_model", refuse)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


CLI_CASES = {c.id: c for c in CASES}


@pytest.mark.parametrize(
    "case_id",
    ["missing-template-field", "gold-index-out-of-range", "broken-json-line", "typo-key-did-you-mean", "yaml-syntax-error"],
)  # fmt: skip
def test_cli_reports_a_bad_task_file_in_one_line(
    case_id, tmp_path, tiny_hf_dir, capsys, no_model_load
) -> None:
    case = CLI_CASES[case_id]
    path = write_case(tmp_path, case)
    code, err = run_cli([str(tiny_hf_dir), "--tasks", str(path), "--no-cache"], capsys)
    assert code in (1, 2)
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("weightsmith eval: error: "), err
    named = path if case.names == "task" else tmp_path / case.names
    assert str(named) in lines[0]
    for text in case.contains:
        assert text in lines[0]


@pytest.mark.parametrize(
    ("extra", "code", "contains"),
    [
        (["--limit", "0"], 2, "--limit"),
        (["--limit", "-3"], 2, "--limit"),
        (["--batch-size", "0"], 2, "--batch-size"),
        (["--num-fewshot", "-1"], 2, "--num-fewshot"),
        (["--compare", "base"], 2, "--adapter"),
        (["--compare", "adapter:/no/such/dir"], 2, "/no/such/dir"),
        (["--num-fewshot", "9"], 1, "num_fewshot: 9 examples asked"),
    ],
)
def test_cli_option_errors(extra, code, contains, tmp_path, tiny_hf_dir, capsys, no_model_load) -> None:
    path = write_case(tmp_path, Case("ok", task_yaml(MC), None))
    got, err = run_cli([str(tiny_hf_dir), "--tasks", str(path), "--no-cache", *extra], capsys)
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("weightsmith eval: error: "), err
    assert contains in err


def test_cli_without_tasks(tiny_hf_dir, capsys, no_model_load) -> None:
    code, err = run_cli([str(tiny_hf_dir), "--no-cache"], capsys)
    assert code == 2
    assert err.startswith("weightsmith eval: error: --tasks") and err.count("\n") == 1, err
