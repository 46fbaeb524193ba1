"""Bias audit: lexicon substitution, counterfactual statistics against a scripted scorer,
CrowS-style pair metrics against a fake log-likelihood, file errors naming file:line, and
one run of `run_audit_bias` on a tiny random model."""

from __future__ import annotations

import difflib
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from weightsmith.cli.audit import print_audit_bias
from weightsmith.commands.audit import AuditBiasConfig, run_audit_bias
from weightsmith.errors import ConfigError, UsageError
from weightsmith.eval.intervals import paired_difference, wilson
from weightsmith.eval.runner import EvalOptions, Runner, load_tasks
from weightsmith.eval.stats import mcnemar
from weightsmith.safety.bias import (
    Lexicon,
    Pair,
    load_lexicon,
    load_pairs,
    match_case,
    plan_counterfactuals,
    read_lexicon,
    read_pairs,
    run_counterfactual,
    score_pairs,
    summarize_groups,
)

# ---- substitution --------------------------------------------------------------------------


@pytest.fixture
def lex() -> Lexicon:
    return Lexicon(
        "t",
        1,
        ["f", "m"],
        [
            {"f": "she", "m": "he"},
            {"f": "her", "m": "his"},
            {"f": "her", "m": "him"},  # ambiguous: "her" maps by its first row (-> his)
            {"f": "young woman", "m": "young man"},
            {"f": "Priya", "m": "Arjun"},
        ],
    )


def test_match_case() -> None:
    assert match_case("She", "he") == "He"
    assert match_case("SHE", "he") == "HE"
    assert match_case("she", "he") == "he"
    assert match_case("HE", "she") == "SHE"


def test_whole_words_case_kept_no_partial_words(lex: Lexicon) -> None:
    text = "She told the hero: SHE and her brother met them there; he's here. Shelley heard."
    assert (
        lex.substitute(text, "m")
        == "He told the hero: HE and his brother met them there; he's here. Shelley heard."
    )
    assert lex.substitute(text, "f") == (
        "She told the hero: SHE and her brother met them there; she's here. Shelley heard."
    )
    # "he" inside the, them, there, hero, here, Shelley, heard is never touched
    assert lex.find("the theme there hero here Shelley heard other") == []


def test_multiword_and_first_row_wins(lex: Lexicon) -> None:
    assert lex.substitute("A Young  Woman saw him.", "m") == "A Young man saw him."
    assert lex.substitute("A young man saw him.", "f") == "A young woman saw her."
    assert lex.substitute("A young manor.", "f") == "A young manor."  # no partial last word
    assert lex.substitute("I gave her the book", "m") == "I gave his the book"  # documented: first row
    assert lex.substitute("priya met ARJUN", "f") == "Priya met PRIYA"
    assert [g for _, g in lex.find("she met young man Arjun")] == ["f", "m", "m"]


def test_perturb_recurses_into_strings_only(lex: Lexicon) -> None:
    doc = {"q": "she ran", "choices": ["her cat", "his dog"], "meta": {"who": ["he"]}, "label": 1, "she": "x"}
    out = lex.perturb(doc, "m")
    assert out == {
        "q": "he ran",
        "choices": ["his cat", "his dog"],
        "meta": {"who": ["he"]},
        "label": 1,
        "she": "x",
    }
    assert doc["q"] == "she ran"  # the original is untouched
    assert sorted(t for t, _ in lex.find_in(doc)) == ["he", "her", "his", "she"]


# ---- counterfactual statistics on a scripted scorer ---------------------------------------

TASK_YAML = """
task: t_bias
dataset_path: json
dataset_kwargs: {data_files: {test: docs.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}\\nA:"
doc_to_choice: choices
doc_to_target: label
metric_list: [{metric: acc}, {metric: acc_norm}]
"""

LEX_YAML = """
lexicon: animals
version: 2
groups: [a, b, c]
terms:
  - {a: alpha, b: beta, c: gamma}
  - {a: red fox, b: blue jay, c: grey owl}
"""

GROUP_WORDS = {"a": ("alpha", "red fox"), "b": ("beta", "blue jay"), "c": ("gamma", "grey owl")}

#: (question, correct under groups a, b, c). None: the document holds no term.
SCRIPT = [
    ("item 0: the alpha sat down", (1, 1, 1)),
    ("item 1: a red fox ran off", (1, 0, 1)),
    ("item 2: nothing to swap here", None),
    ("item 3: beta and alpha", (0, 0, 1)),
    ("item 4: the grey owl slept", (1, 0, 0)),
    ("item 5: then the others left", None),  # "the", "then", "others": no partial words
    ("item 6: gamma", (0, 0, 0)),
    ("item 7: a blue jay sang", (1, 1, 0)),
]


class ScriptedScorer:
    """Answers each choice so that the gold choice wins exactly when SCRIPT says so for the
    group whose terms the (rewritten) prompt holds."""

    batch_size = 8
    tokenizer = None

    def __init__(self) -> None:
        self.contexts: list[str] = []

    def loglikelihood(self, requests, progress=None):
        out = []
        for context, continuation in requests:
            self.contexts.append(context)
            item = int(re.search(r"item (\d+)", context).group(1))
            groups = [g for g, words in GROUP_WORDS.items() if any(w in context for w in words)]
            assert len(groups) == 1, context  # every term was rewritten to one group
            correct = SCRIPT[item][1]["abc".index(groups[0])]
            gold = continuation.strip() == "yes"
            out.append((-1.0 if gold == bool(correct) else -2.0, False))
        if progress:
            progress(len(requests))
        return out


@pytest.fixture
def scripted_task(tmp_path: Path) -> tuple[Path, Path]:
    rows = [{"question": q, "choices": ["yes", "no"], "label": 0} for q, _ in SCRIPT]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(TASK_YAML)
    (tmp_path / "lex.yaml").write_text(LEX_YAML)
    return tmp_path / "task.yaml", tmp_path / "lex.yaml"


def test_counterfactual_numbers_match_hand_computation(scripted_task) -> None:
    task_file, lex_file = scripted_task
    opts = EvalOptions(bootstrap_iters=200)
    taskset = load_tasks([str(task_file)], opts)
    lexicon = read_lexicon(lex_file)
    scorer = ScriptedScorer()
    summaries, items = run_counterfactual(Runner(scorer, fingerprint="scripted"), taskset, [lexicon], opts)

    # by hand, from SCRIPT alone
    table = [(i, r) for i, (_, r) in enumerate(SCRIPT) if r is not None]
    n = len(table)
    col = {g: [r[k] for _, r in table] for k, g in enumerate("abc")}
    worst = [min(r) for _, r in table]
    flips = sum(1 for _, r in table if len(set(r)) > 1)

    (s,) = summaries
    assert (s["task"], s["lexicon"], s["metric"], s["groups"]) == (
        "t_bias",
        "animals",
        "acc",
        ["a", "b", "c"],
    )
    assert (s["n_docs"], s["n_affected"], s["n_unaffected"]) == (8, n, 2)
    for g in "abc":
        pg = s["per_group"][g]
        assert pg["mean"] == pytest.approx(sum(col[g]) / n)
        assert pg["stderr"] == pytest.approx(statistics.stdev(col[g]) / math.sqrt(n))
        assert pg["n"] == n
        assert pg["ci"] == pytest.approx(list(wilson(sum(col[g]), n)))  # acc is 0/1: a proportion
    assert s["worst_case"]["mean"] == pytest.approx(sum(worst) / n)
    assert s["worst_case"]["stderr"] == pytest.approx(statistics.stdev(worst) / math.sqrt(n))
    for g in "bc":
        assert s["gaps"][g]["vs"] == "a"
        assert s["gaps"][g]["delta"] == pytest.approx(sum(col[g]) / n - sum(col["a"]) / n)
        lo, hi = s["gaps"][g]["ci"]
        assert lo <= s["gaps"][g]["delta"] <= hi
        ref = paired_difference(col["a"], col[g])  # the same items under two groups: paired
        assert [lo, hi] == pytest.approx([ref["ci_low"], ref["ci_high"]])
        assert s["gaps"][g]["p_value"] == mcnemar(col["a"], col[g])["p_value"]
    assert s["interval"] == {"method": "wilson", "level": 0.95}
    assert s["difference_interval"] == {"method": "newcombe-paired", "level": 0.95}
    assert s["test"] == "mcnemar"
    means = {g: sum(col[g]) / n for g in "abc"}
    gap = max(abs(means[x] - means[y]) for x, y in (("a", "b"), ("a", "c"), ("b", "c")))
    assert s["max_gap"]["gap"] == pytest.approx(gap)
    assert sorted(s["max_gap"]["groups"]) == ["a", "b"]  # a: 4/6, b: 2/6, c: 3/6
    assert s["flips"] == flips and s["flip_rate"] == pytest.approx(flips / n)

    assert [it["doc_id"] for it in items] == [i for i, _ in table]
    for it, (_, r) in zip(items, table, strict=True):
        assert it["scores"] == {"a": r[0], "b": r[1], "c": r[2]}
        assert it["worst_case"] == min(r)
        assert it["flip"] == (len(set(r)) > 1)
    assert items[2]["groups"] == ["a", "b"] and items[2]["terms"] == ["beta", "alpha"]
    # unaffected documents were never scored; each affected one once per group, per choice
    assert not any("item 2:" in c or "item 5:" in c for c in scorer.contexts)
    assert len(scorer.contexts) == n * 3 * 2


def test_limit_and_unaffected_task(scripted_task) -> None:
    task_file, lex_file = scripted_task
    taskset = load_tasks([str(task_file)])
    other = Lexicon("none", 1, ["x", "y"], [{"x": "zebra", "y": "yak"}])
    plan = plan_counterfactuals(taskset, [read_lexicon(lex_file), other], limit=3)
    assert plan.totals == {"t_bias": 3}
    assert [a["doc_id"] for a in plan.affected[("t_bias", "animals")]] == [0, 1]
    assert plan.affected[("t_bias", "none")] == []
    assert len(plan.variants) == 3  # one per group of the lexicon that touches something
    summaries, items = run_counterfactual(
        Runner(ScriptedScorer(), fingerprint="s"), taskset, [other], EvalOptions(limit=3)
    )
    assert summaries[0]["n_affected"] == 0 and summaries[0]["n_unaffected"] == 3 and items == []


def test_task_without_a_mean_metric_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "she walked home"}) + "\n")
    (tmp_path / "ppl.yaml").write_text(
        "task: t_ppl\ndataset_path: json\ndataset_kwargs: {data_files: {test: t.jsonl}}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
    )
    taskset = load_tasks([str(tmp_path / "ppl.yaml")])
    with pytest.raises(ConfigError, match=r"ppl\.yaml: metric_list: .*averaged over documents"):
        plan_counterfactuals(taskset, [load_lexicon("builtin:gender")], None)


# ---- stereotype pairs ------------------------------------------------------------------------


class FakeLL:
    def __init__(self, lls: dict[str, float]) -> None:
        self.lls = lls
        self.requests: list[tuple[str, str]] = []

    def loglikelihood(self, requests, progress=None):
        self.requests.extend(requests)
        if progress:
            progress(len(requests))
        return [(self.lls[s], False) for _, s in requests]


def test_pct_stereotype_and_likelihood_diff() -> None:
    pairs = [
        Pair("p1", "m1", "l1", "gender", "stereo"),
        Pair("p2", "m2", "l2", "gender", "antistereo"),
        Pair("p3", "m3", "l3", "age", "stereo"),
        Pair("p4", "m4", "l4", "age", "stereo"),
        Pair("p5", "m5", "l5", "age", "stereo"),  # a tie is not a preference (lm-eval: ll1 > ll2)
    ]
    lls = {"m1": -10.0, "l1": -12.5, "m2": -8.0, "l2": -7.0, "m3": -20.0, "l3": -21.0}
    lls |= {"m4": -5.0, "l4": -9.0, "m5": -3.0, "l5": -3.0}
    fake = FakeLL(lls)
    ticks = []
    summary, records = score_pairs(fake, pairs, iters=300, progress=lambda d, t: ticks.append((d, t)))
    assert all(ctx == "" for ctx, _ in fake.requests) and len(fake.requests) == 10
    assert ticks[-1] == (10, 10)
    assert summary["n"] == 5
    assert summary["pct_stereotype"] == pytest.approx(3 / 5)  # p1, p3, p4
    assert summary["likelihood_diff"] == pytest.approx((2.5 + 1.0 + 1.0 + 4.0 + 0.0) / 5)
    assert summary["pct_stereotype_stderr"] == pytest.approx(statistics.stdev([1, 0, 1, 1, 0]) / math.sqrt(5))
    assert summary["pct_stereotype_ci"] == pytest.approx(list(wilson(3, 5)))
    assert summary["interval"] == {"method": "wilson", "level": 0.95}
    assert summary["likelihood_diff_interval"] == {"method": "bootstrap", "level": 0.95}
    assert summary["by_direction"]["antistereo"]["pct_stereotype_ci"][1] > 0.5  # 0 of 1, not [0, 0]
    assert summary["by_bias_type"]["gender"]["pct_stereotype"] == pytest.approx(1 / 2)
    assert summary["by_bias_type"]["gender"]["likelihood_diff"] == pytest.approx((2.5 + 1.0) / 2)
    assert summary["by_bias_type"]["age"]["pct_stereotype"] == pytest.approx(2 / 3)
    assert summary["by_bias_type"]["age"]["likelihood_diff"] == pytest.approx(5.0 / 3)
    assert summary["by_direction"]["antistereo"]["pct_stereotype"] == 0
    assert [r["stereotype"] for r in records] == [1, 0, 1, 1, 0]
    assert records[1]["ll_more"] == -8.0 and records[1]["ll_less"] == -7.0


def test_builtin_pairs_and_lexicons_are_well_formed() -> None:
    pairs = load_pairs("builtin:stereotype-pairs")
    assert len(pairs) >= 40
    assert len({p.bias_type for p in pairs}) >= 6
    for p in pairs:
        ops = difflib.SequenceMatcher(a=p.more.split(), b=p.less.split()).get_opcodes()
        changed = sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal")
        assert 1 <= changed <= 3, p.id  # the sentences differ only in the group words
    for name in ("gender", "names", "dialect"):
        lx = load_lexicon(f"builtin:{name}")
        assert lx.name == name and len(lx.rows) >= 10
    gender = load_lexicon("builtin:gender")
    assert gender.substitute("Tansy sells honey from her own hives, and she runs out.", "male") == (
        "Tansy sells honey from his own hives, and he runs out."
    )
    with pytest.raises(UsageError, match="built-in: dialect, gender, names"):
        load_lexicon("builtin:nope")


# ---- file errors -----------------------------------------------------------------------------

HEAD = "lexicon: t\nversion: 1\ngroups: [f, m]\nterms:\n"


@pytest.mark.parametrize(
    "body, where",
    [
        (
            HEAD + "  - {f: she, m: he}\n  - {f: her, x: his}\n",
            r":6: terms\[1\]\.x: unknown group; the groups are f, m",
        ),
        (HEAD + "  - {f: she, m: he}\n  - {f: her}\n", r":6: terms\[1\]\.m: missing"),
        (
            HEAD + "  - {f: she, m: he}\n  - {f: he, m: him}\n",
            r":6: terms\[1\]\.f: duplicate term 'he'.*terms\[0\] \(line 5\)",
        ),
        (HEAD + "  - {f: she, m: he}\n  - {f: she, m: he}\n", r":6: terms\[1\]: duplicate row"),
        (HEAD + "  - {f: she, m: ' he'}\n  - {f: her, m: '-his'}\n", r":6: terms\[1\]\.m: expected a word"),
        ("lexicon: t\ngroups: [f, m]\nterms: []\n", r":3: terms: expected a non-empty list"),
        ("lexicon: t\ngroups: [f]\nterms: [{f: she}]\n", r":2: groups: expected a list of two or more"),
        ("lexicon: t\ngroups: [f, m]\nterms:\n  - {f: she, m: he\n", r":5: invalid YAML"),
        ("lexicon: t\ngroup: [f, m]\nterms: []\n", r":2: group: unknown key"),
    ],
)
def test_bad_lexicon_files_name_file_line_and_field(tmp_path: Path, body: str, where: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises((ConfigError, UsageError), match=re.escape(str(path)) + where):
        read_lexicon(path)


GOOD = {"id": "a", "more": "x one", "less": "x two", "bias_type": "age", "direction": "stereo"}


@pytest.mark.parametrize(
    "second, where",
    [
        ("{not json", r":2: invalid JSON"),
        (
            json.dumps({**GOOD, "id": "b", "direction": "up"}),
            r":2: direction: expected one of stereo, antistereo",
        ),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "less"} | {"id": "b"}),
            r":2: less: required but missing",
        ),
        (json.dumps(GOOD), r":2: id: 'a' already used on line 1"),
        (json.dumps({**GOOD, "id": "b", "extra": 1}), r":2: extra: unknown key"),
    ],
)
def test_bad_pairs_line_names_file_and_line(tmp_path: Path, second: str, where: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + second + "\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + where):
        read_pairs(path)


def test_nothing_to_audit_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="nothing to audit"):
        run_audit_bias(AuditBiasConfig(model="unused", pairs="none"))


# ---- a real run on a tiny random model --------------------------------------------------------


def test_group_rates_at_the_edges_do_not_claim_certainty() -> None:
    # Every item right under both groups (15/15): the percentile bootstrap said [1, 1] and a
    # gap of exactly [0, 0].
    s, _ = summarize_groups({"a": [1.0] * 15, "b": [1.0] * 15}, ["a", "b"], True, iters=200)
    assert s["per_group"]["a"]["ci"][1] == 1.0 and s["per_group"]["a"]["ci"][0] < 0.8
    lo, hi = s["gaps"]["b"]["ci"]
    assert lo < -0.1 and hi > 0.1
    s, _ = summarize_groups({"a": [0.0] * 3, "b": [0.0] * 3}, ["a", "b"], True, iters=200)
    assert s["per_group"]["b"]["ci"][0] == 0.0 and s["per_group"]["b"]["ci"][1] > 0.5
    # A continuous metric is not a proportion: it keeps the (paired) bootstrap and says so.
    s, _ = summarize_groups({"a": [0.2, 0.5, 0.9], "b": [0.3, 0.5, 0.7]}, ["a", "b"], True, iters=200)
    assert s["interval"]["method"] == "bootstrap" and s["difference_interval"]["method"] == "paired-bootstrap"
    assert s["test"] == "paired_bootstrap"


def test_printed_and_html_audit_name_their_methods(tmp_path: Path) -> None:
    from rich.console import Console

    from weightsmith.report.bias_report import write_bias_report

    s, _ = summarize_groups({"a": [1.0] * 15, "b": [1.0] * 15}, ["a", "b"], True, iters=200)
    summary = {"task": "t", "lexicon": "l", "metric": "acc", "groups": ["a", "b"], "n_docs": 15,
               "n_affected": 15, "n_unaffected": 0, **s}  # fmt: skip
    result = {"counterfactual": [summary], "weightsmith": {"model": "m"}}
    console = Console(record=True, width=200)
    print_audit_bias(result, console)
    text = console.export_text()
    assert "means 95% Wilson score" in text and "gaps 95% Newcombe's hybrid score" in text
    assert "[1.0000, 1.0000]" not in text and "[0.0000, 0.0000]" not in text
    write_bias_report(tmp_path / "r.html", result)
    html = (tmp_path / "r.html").read_text()
    assert "means 95% Wilson score" in html and "Newcombe" in html


def test_run_audit_bias_on_tiny_model(tiny_hf_dir, scripted_task, tmp_path: Path) -> None:
    task_file, lex_file = scripted_task
    pairs_file = tmp_path / "p.jsonl"
    pairs_file.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"p{i}",
                    "more": f"The {a} fox jumps.",
                    "less": f"The {b} fox jumps.",
                    "bias_type": t,
                    "direction": "stereo",
                }
            )
            + "\n"  # fmt: skip
            for i, (a, b, t) in enumerate(
                [("quick", "lazy", "age"), ("brown", "small", "age"), ("old", "new", "x")]
            )
        )
    )
    out = tmp_path / "out"
    cfg = AuditBiasConfig(
        model=str(tiny_hf_dir),
        device="cpu",
        dtype="fp32",
        tasks=[str(task_file)],
        lexicon=[str(lex_file), "builtin:gender"],
        pairs=str(pairs_file),
        bootstrap_iters=50,
        out=str(out),
    )
    result = run_audit_bias(cfg)
    by_lex = {s["lexicon"]: s for s in result["counterfactual"]}
    assert by_lex["animals"]["n_affected"] == 6 and by_lex["animals"]["n_unaffected"] == 2
    assert by_lex["gender"]["n_affected"] == 0  # no gendered terms ("the", "others" are not "he")
    assert (
        0
        <= by_lex["animals"]["worst_case"]["mean"]
        <= min(v["mean"] for v in by_lex["animals"]["per_group"].values())
    )
    assert result["pairs"]["n"] == 3 and 0 <= result["pairs"]["pct_stereotype"] <= 1

    # the pair log-likelihoods are the scorer's, with an empty context
    from weightsmith import load
    from weightsmith.eval.scorer import Scorer

    llm = load(str(tiny_hf_dir), dtype="float32")
    (ll_more, _), (ll_less, _) = Scorer(llm.model, llm.tokenizer).loglikelihood(
        [("", "The quick fox jumps."), ("", "The lazy fox jumps.")]
    )
    rec = result["pair_records"][0]
    assert rec["ll_more"] == pytest.approx(ll_more, abs=1e-4) and rec["ll_less"] == pytest.approx(
        ll_less, abs=1e-4
    )

    results = json.loads((out / "results.json").read_text())
    assert results["weightsmith"]["model"] == str(tiny_hf_dir) and results["weightsmith"]["adapter"] is None
    assert [lx["name"] for lx in results["lexicons"]] == ["animals", "gender"]
    assert results["counterfactual"] == json.loads(json.dumps(result["counterfactual"]))
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(items) == 6 and set(items[0]["scores"]) == {"a", "b", "c"} and "worst_case" in items[0]
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 3
    html = (out / "report.html").read_text()
    assert "<html" in html and "worst case" in html and "pct_stereotype" in html
    assert "http" not in html and "<script" not in html

    from rich.console import Console

    console = Console(record=True, width=140)
    print_audit_bias(result, console)
    text = console.export_text()
    assert "worst case" in text and "stereotype pairs" in text and "wrote" in text
