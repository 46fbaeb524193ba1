"""`weightsmith eval` on tiny random models: the files it writes (lm-eval's results.json
layout, samples, report, comparison), group aggregation, the result cache, --limit,
few-shot prompts, --apply-chat-template and --json."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
from conftest import build_tiny_hf_dir

from weightsmith.cli.main import main

WORDS = "quick brown fox jumps over the lazy dog once upon a time there was small model learned talk".split()

MC_YAML = """
task: t_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: choices
doc_to_target: label
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""

GEN_YAML = """
task: t_gen
dataset_path: json
dataset_kwargs: {data_files: {test: gen.jsonl}}
output_type: generate_until
doc_to_text: "Say: {{prompt}}"
doc_to_target: answer
generation_kwargs: {until: ["\\n"], max_gen_toks: 4}
"""

GROUP_YAML = """
group: {name}
task: [t_mc, t_mc2]
aggregate_metric_list:
  - {{metric: acc, weight_by_size: {weighted}}}
  - {{metric: acc_norm, weight_by_size: {weighted}}}
"""

N_MC, N_MC2, N_GEN = 8, 5, 3
N_CHOICES = 4
#: Requests one run makes: a log-likelihood per choice, a generation per document.
N_REQUESTS = (N_MC + N_MC2) * N_CHOICES + N_GEN
TASK_FILES = ["group_w.yaml", "group_p.yaml", "gen.yaml"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("eval_tasks")

    def mc_rows(n: int, start: int) -> list[dict]:
        # Unique questions (numbered), so a prompt holding its own document is detectable.
        return [
            {
                "question": f"item {start + i}: {_phrase(rng, 4)}",
                "choices": [f"{_phrase(rng, rng.randint(1, 3))} {c}" for c in range(N_CHOICES)],
                "label": rng.randrange(N_CHOICES),
            }
            for i in range(n)
        ]

    _jsonl(d / "mc.jsonl", mc_rows(N_MC, 0))
    _jsonl(d / "mc2.jsonl", mc_rows(N_MC2, 100))
    _jsonl(d / "gen.jsonl", [{"prompt": _phrase(rng, 3), "answer": _phrase(rng, 1)} for _ in range(N_GEN)])
    (d / "mc.yaml").write_text(MC_YAML.format(data="mc.jsonl"))
    (d / "mc2.yaml").write_text(MC_YAML.format(data="mc2.jsonl").replace("task: t_mc", "task: t_mc2"))
    (d / "gen.yaml").write_text(GEN_YAML)
    (d / "group_w.yaml").write_text(GROUP_YAML.format(name="g_weighted", weighted="true"))
    (d / "group_p.yaml").write_text(GROUP_YAML.format(name="g_plain", weighted="false"))
    return d


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_dir(tmp_path_factory.mktemp("other") / "other-llama", seed=1)


class Eval:
    """Runs `weightsmith eval --json` in-process; returns the exit code and parsed stdout."""

    def __init__(self, model: Path, task_dir: Path) -> None:
        self.model = model
        self.task_dir = task_dir

    def __call__(self, *extra: str, tasks: list[str] | None = None) -> dict:
        files = ",".join(str(self.task_dir / t) for t in tasks or TASK_FILES)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(
                ["eval", str(self.model), "--tasks", files, "--json", "--bootstrap-iters", "50", *extra]
            )
        assert code == 0
        return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def run(tiny_hf_dir, task_dir) -> Eval:
    return Eval(tiny_hf_dir, task_dir)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """WEIGHTSMITH_HOME in a temp folder, where the default cache file would go."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSMITH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def cached(run, other_dir, tmp_path_factory, home) -> dict:
    """The same run twice on one cache file, then with another model as the reference."""
    tmp = tmp_path_factory.mktemp("cached")
    cache = str(tmp / "cache.sqlite")
    first = run("--cache-path", cache, "--out", str(tmp / "out"))
    second = run("--cache-path", cache)
    compared = run("--cache-path", cache, "--compare", str(other_dir), "--out", str(tmp / "cmp"))
    return {"tmp": tmp, "first": first, "second": second, "compared": compared}


def _samples(folder: Path, task: str) -> list[dict]:
    lines = (folder / f"samples_{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _docs(task_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (task_dir / name).read_text().splitlines()]


# ---- files ---------------------------------------------------------------------------------


def test_out_writes_lm_eval_results_samples_and_report(cached, task_dir) -> None:
    out = cached["tmp"] / "out"
    run = cached["first"]["runs"][0]
    folder = out / "tiny-llama"
    results = json.loads((folder / "results.json").read_text())
    for key in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                "higher_is_better", "n-samples", "config", "weightsmith"):  # fmt: skip
        assert key in results, key
    assert results["results"] == run["results"]
    assert set(results["results"]) == {"g_weighted", "g_plain", "t_mc", "t_mc2", "t_gen"}
    assert set(results["groups"]) == {"g_weighted", "g_plain"}
    assert results["group_subtasks"] == {
        "g_weighted": ["t_mc", "t_mc2"],
        "g_plain": ["t_mc", "t_mc2"],
        "t_gen": [],
    }
    assert set(results["configs"]) == {"t_mc", "t_mc2", "t_gen"}
    assert results["configs"]["t_mc"]["output_type"] == "multiple_choice"
    assert results["n-samples"]["t_mc"] == {"original": N_MC, "effective": N_MC}
    assert results["n-shot"] == {"t_mc": 0, "t_mc2": 0, "t_gen": 0}
    assert results["higher_is_better"]["t_mc"] == {"acc": True, "acc_norm": True}
    assert 0.0 <= results["results"]["t_mc"]["acc,none"] <= 1.0
    assert "acc_stderr,none" in results["results"]["t_mc"]
    assert "exact_match,none" in results["results"]["t_gen"]
    info = results["weightsmith"]
    assert len(info["model_hash"]) == 64 and int(info["model_hash"], 16) >= 0
    assert info["label"] == "tiny-llama" and info["cache_hits"] == 0

    for task, n, data in (
        ("t_mc", N_MC, "mc.jsonl"),
        ("t_mc2", N_MC2, "mc2.jsonl"),
        ("t_gen", N_GEN, "gen.jsonl"),
    ):
        records = _samples(folder, task)
        assert len(records) == n
        docs = _docs(task_dir, data)
        for i, r in enumerate(records):
            for key in ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "metrics"):
                assert key in r, (task, key)
            assert r["doc_id"] == i and r["doc"] == docs[i]
        if task == "t_gen":
            assert all(isinstance(r["resps"][0], str) for r in records)
            assert all(set(r["metrics"]) == {"exact_match,none"} for r in records)
        else:
            assert all(len(r["arguments"]) == N_CHOICES for r in records)
            assert all(r["target"] == docs[i]["label"] for i, r in enumerate(records))
            # The task's acc is the mean of the documents' acc.
            mean = sum(r["metrics"]["acc,none"] for r in records) / n
            assert results["results"][task]["acc,none"] == pytest.approx(mean)
    html = (out / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "t_mc" in html
    assert not (out / "comparison.json").exists()
    assert cached["first"]["written"]["report"] == str(out / "report.html")


def test_compare_writes_comparison_with_the_reference_first(cached) -> None:
    out = cached["tmp"] / "cmp"
    result = cached["compared"]
    assert [r["weightsmith"]["label"] for r in result["runs"]] == ["other-llama", "tiny-llama"]
    for label in ("other-llama", "tiny-llama"):
        assert (out / label / "results.json").is_file()
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison == result["comparison"]
    assert comparison["reference"] == "other-llama"
    rows = {(r["task"], r["metric"]) for r in comparison["rows"]}
    assert {("t_mc", "acc"), ("t_mc2", "acc_norm"), ("t_gen", "exact_match"), ("g_weighted", "acc")} <= rows
    row = next(r for r in comparison["rows"] if (r["task"], r["metric"]) == ("t_mc", "acc"))
    values = row["values"]
    assert row["delta"]["tiny-llama"] == pytest.approx(values["tiny-llama"] - values["other-llama"])
    assert row["test"] == "mcnemar" and row["n"]["tiny-llama"] == N_MC
    assert row["interval"] == {"method": "newcombe-paired", "level": 0.95}
    lo, hi = row["ci"]["tiny-llama"]
    assert lo <= row["delta"]["tiny-llama"] <= hi and lo < hi  # an interval, never a point
    assert (out / "report.html").is_file()


def test_printed_comparison_names_its_interval_method() -> None:
    from rich.console import Console

    from weightsmith.cli.eval import print_eval
    from weightsmith.eval.stats import compare_runs

    runs = [
        {"results": {"t": {"acc,none": v}}, "weightsmith": {"label": lab, "seconds": 1.0, "cache_hits": 0}}
        for lab, v in (("a", 1.0), ("b", 1.0))
    ]
    for r in runs:
        r["n-samples"] = {"t": {"effective": 15}}
    samples = [{"t": [{"doc_id": i, "metrics": {"acc,none": 1.0}} for i in range(15)]}] * 2
    console = Console(record=True, width=200)
    print_eval({"runs": runs, "comparison": compare_runs(runs, samples)}, console)
    text = console.export_text()
    assert "95% Newcombe paired" in text
    # 15 of 15 right in both runs: the difference is not certainly 0.
    assert "[0.0000, 0.0000]" not in text and "[-0.2" in text


def test_adapter_compared_with_its_base(run, adapter_dir, tmp_path, home) -> None:
    result = run("--adapter", str(adapter_dir), "--compare", "base", "--no-cache", "--out", str(tmp_path))
    base, fork = result["runs"]
    assert base["weightsmith"]["label"] == "tiny-llama" and base["weightsmith"]["adapter"] is None
    assert fork["weightsmith"]["label"] == "tiny-llama+adapter"
    assert fork["weightsmith"]["adapter"] == str(adapter_dir)
    assert base["weightsmith"]["model_hash"] != fork["weightsmith"]["model_hash"]
    assert result["comparison"]["reference"] == "tiny-llama"
    # The adapter changes the log-likelihoods.
    base_ll = _samples(tmp_path / "tiny-llama", "t_mc")[0]["resps"]
    fork_ll = _samples(tmp_path / "tiny-llama_adapter", "t_mc")[0]["resps"]
    assert base_ll != fork_ll
    assert (tmp_path / "comparison.json").is_file() and (tmp_path / "report.html").is_file()
    assert not (home / "eval-cache.sqlite").exists()  # --no-cache


# ---- groups --------------------------------------------------------------------------------


def test_group_is_the_size_weighted_or_plain_mean(cached) -> None:
    results = cached["first"]["runs"][0]["results"]
    for metric in ("acc,none", "acc_norm,none"):
        a, b = results["t_mc"][metric], results["t_mc2"][metric]
        weighted = (a * N_MC + b * N_MC2) / (N_MC + N_MC2)
        assert results["g_weighted"][metric] == pytest.approx(weighted)
        assert results["g_plain"][metric] == pytest.approx((a + b) / 2)
    # Otherwise the two means would coincide and the test could not tell them apart.
    assert results["g_weighted"]["acc,none"] != pytest.approx(results["g_plain"]["acc,none"])
    se_a, se_b = results["t_mc"]["acc_stderr,none"], results["t_mc2"]["acc_stderr,none"]
    assert results["g_plain"]["acc_stderr,none"] == pytest.approx(math.sqrt(se_a**2 + se_b**2) / 2)


# ---- cache ---------------------------------------------------------------------------------


def test_second_run_is_served_from_the_cache(cached) -> None:
    first, second = cached["first"]["runs"][0], cached["second"]["runs"][0]
    assert first["weightsmith"]["cache_hits"] == 0
    assert second["weightsmith"]["cache_hits"] == N_REQUESTS
    assert second["results"] == first["results"]
    assert second["weightsmith"]["model_hash"] == first["weightsmith"]["model_hash"]
    assert (cached["tmp"] / "cache.sqlite").is_file()


def test_another_model_gets_no_cache_hits(cached) -> None:
    other, same = cached["compared"]["runs"]
    assert other["weightsmith"]["cache_hits"] == 0
    assert same["weightsmith"]["cache_hits"] == N_REQUESTS
    assert other["weightsmith"]["model_hash"] != same["weightsmith"]["model_hash"]


def test_no_cache_writes_no_cache_file(run, home, tmp_path) -> None:
    result = run("--no-cache", tasks=["gen.yaml"])
    assert result["runs"][0]["weightsmith"]["cache_hits"] == 0
    assert not (home / "eval-cache.sqlite").exists()
    run("--cache-path", str(tmp_path / "c.sqlite"), tasks=["gen.yaml"])  # the control: a cache is written
    assert (tmp_path / "c.sqlite").is_file()


# ---- --limit -------------------------------------------------------------------------------


def test_limit_count_and_fraction(run, home) -> None:
    three = run("--limit", "3", "--no-cache")["runs"][0]
    assert three["n-samples"]["t_mc"] == {"original": N_MC, "effective": 3}
    assert three["n-samples"]["t_mc2"] == {"original": N_MC2, "effective": 3}
    assert three["config"]["limit"] == 3
    half = run("--limit", "0.5", "--no-cache")["runs"][0]
    assert half["n-samples"]["t_mc"]["effective"] == 4
    assert half["n-samples"]["t_mc2"]["effective"] == 3  # ceil(2.5), as lm-eval
    assert half["n-samples"]["t_gen"]["effective"] == 2  # ceil(1.5)


# ---- prompts -------------------------------------------------------------------------------


def test_num_fewshot_puts_that_many_other_documents_in_each_prompt(run, task_dir, tmp_path, home) -> None:
    result = run("--num-fewshot", "2", "--no-cache", "--out", str(tmp_path), tasks=["mc.yaml"])
    assert result["runs"][0]["n-shot"] == {"t_mc": 2}
    docs = _docs(task_dir, "mc.jsonl")
    shots_seen = set()
    for r in _samples(tmp_path / "tiny-llama", "t_mc"):
        context = r["arguments"][0][0]
        assert all(a[0] == context for a in r["arguments"])
        assert context.count("Q: ") == 3, context
        assert context.endswith(f"Q: {r['doc']['question']}\nA:")
        assert context.count(r["doc"]["question"]) == 1  # never the document itself
        shots = [d for d in docs if f"Q: {d['question']}\nA: " in context]
        assert len(shots) == 2 and r["doc"] not in shots
        for d in shots:  # each example answered with its gold choice
            assert f"Q: {d['question']}\nA: {d['choices'][d['label']]}\n\n" in context
        shots_seen.update(d["question"] for d in shots)
    assert len(shots_seen) > 2  # drawn per document, not one fixed pair


def test_apply_chat_template_wraps_prompts_and_drops_the_delimiter(run, tmp_path, home) -> None:
    run("--no-cache", "--out", str(tmp_path / "plain"), "--limit", "2", tasks=["mc.yaml", "gen.yaml"])
    run("--no-cache", "--out", str(tmp_path / "chat"), "--limit", "2", "--apply-chat-template",
        tasks=["mc.yaml", "gen.yaml"])  # fmt: skip
    for task in ("t_mc", "t_gen"):
        plain = _samples(tmp_path / "plain" / "tiny-llama", task)
        chat = _samples(tmp_path / "chat" / "tiny-llama", task)
        for p, c in zip(plain, chat, strict=True):
            text, wrapped = p["arguments"][0][0], c["arguments"][0][0]
            assert wrapped == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    for p, c in zip(_samples(tmp_path / "plain" / "tiny-llama", "t_mc"),
                    _samples(tmp_path / "chat" / "tiny-llama", "t_mc"), strict=True):  # fmt: skip
        assert [a[1] for a in p["arguments"]] == [" " + choice for choice in p["doc"]["choices"]]
        assert [a[1] for a in c["arguments"]] == c["doc"]["choices"]


def test_json_prints_one_valid_document(tiny_hf_dir, task_dir, capsys, home) -> None:
    code = main(["eval", str(tiny_hf_dir), "--tasks", str(task_dir / "gen.yaml"), "--json", "--no-cache"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert set(result) == {"runs", "comparison", "written"}
    assert result["runs"][0]["results"]["t_gen"]["alias"] == "t_gen"
    assert result["comparison"] is None


JUDGE_YAML = """
task: t_judged
dataset_path: json
dataset_kwargs: {data_files: {test: judged.jsonl}}
output_type: generate_until
doc_to_text: "Say: {{prompt}}"
doc_to_target: answer
generation_kwargs: {until: ["\\n"], max_gen_toks: 4}
judge:
  model: http://judge.invalid/v1
  rubric: "Q: {{ question }} A: {{ answer }} R: {{ reference }} id={{ doc.id }}"
  scale: [1, 5]
  pass_threshold: 4
  human_label: human
"""


def test_judge_scores_answers_and_reports_agreement(run, task_dir, monkeypatch, home) -> None:
    """The runner renders the rubric per document, asks the judge once per task, aggregates
    judge_score / judge_pass and compares with the human labels; checked by hand."""
    rows = [{"id": i, "prompt": _phrase(random.Random(i), 3), "answer": "yes", "human": h} for i, h in
            enumerate([5, 4, 2, 1])]  # fmt: skip
    _jsonl(task_dir / "judged.jsonl", rows)
    (task_dir / "judged.yaml").write_text(JUDGE_YAML)
    replies = {0: "Score: 5", 1: "score=3", 2: "Score: 2", 3: "I cannot say"}
    seen: list[str] = []

    class Scripted:
        def complete(self, prompts):
            seen.extend(p[-1]["content"] for p in prompts)
            return [replies[int(p[-1]["content"].split("id=")[1])] for p in prompts]

    monkeypatch.setattr("weightsmith.eval.runner.make_judge", lambda cfg, load_model, grants: Scripted())
    granted = ("--judge-endpoint", "http://judge.invalid/v1")
    result = run("--no-cache", *granted, tasks=["judged.yaml"])["runs"][0]["results"]["t_judged"]
    assert len(seen) == 4 and all(" R: yes " in s and s.startswith("Q: Say: ") for s in seen)
    assert result["judge_score,none"] == pytest.approx((5 + 3 + 2) / 3)  # the unparsable reply is left out
    assert result["judge_pass,none"] == pytest.approx(1 / 4)  # only 5 >= 4; unparsable counts as a fail
    assert result["judge_unparsable"] == 1
    agreement = result["judge_agreement"]
    assert agreement["n"] == 3 and agreement["exact_agreement"] == pytest.approx(2 / 3)
    assert agreement["within_one"] == pytest.approx(1.0)
