"""`arena judge --reward`: votes from rewards that score each answer alone (verifiable
rewards read the prompt line's reference fields; a reward model reads prompt and answer),
checked end to end with fake endpoint contestants whose answers a test controls, and the
reward model's verdicts against transformers' own scores."""

from __future__ import annotations

import json
import logging
import random
import sqlite3
from pathlib import Path

import pytest
import torch
from arena_fakes import FakeServer, judged_answers
from conftest import run_cli

from weightsmith.arena.contestants import parse_contestant
from weightsmith.arena.records import Battle, Prompt
from weightsmith.arena.reward_judge import RewardJudge
from weightsmith.arena.schema import SCHEMA_VERSION
from weightsmith.arena.store import ArenaStore
from weightsmith.errors import ConfigError
from weightsmith.train.rewards import RewardContext, RewardError, parse_rewards

QUESTIONS = {"What is 2 + 3?": 5, "What is 7 times 6?": 42, "What is 10 - 4?": 6, "What is 9 + 9?": 18}


def _question(body: dict) -> str:
    return body["messages"][-1]["content"]


def right(body: dict) -> str:
    return f"The answer is {QUESTIONS[_question(body)]}."


def wrong(body: dict) -> str:
    return "The answer is 1000."


def half(body: dict) -> str:
    """Right on the first two questions only."""
    q = _question(body)
    return right(body) if q in list(QUESTIONS)[:2] else wrong(body)


@pytest.fixture(scope="module")
def servers():
    with FakeServer(right) as r, FakeServer(wrong) as w, FakeServer(half) as h:
        yield r, w, h


@pytest.fixture(scope="module")
def answer_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in QUESTIONS.items()))
    return path


def _contestants(servers) -> str:
    r, w, h = servers
    return f"{r.url}#right,{w.url}#wrong,{h.url}#half"


@pytest.fixture(scope="module")
def judged(servers, answer_prompts, tmp_path_factory) -> tuple[Path, dict]:
    db = tmp_path_factory.mktemp("arena") / "arena.sqlite"
    import io
    from contextlib import redirect_stdout

    from weightsmith.cli.main import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["arena", "judge", "--db", str(db), "--reward", "answer", "--battles", "24",
                     "--contestants", _contestants(servers), "--prompts", str(answer_prompts),
                     "--max-tokens", "16", "--seed", "5", "--json"])  # fmt: skip
    assert code == 0
    return db, json.loads(buf.getvalue())


def _votes(db: Path) -> list[tuple[str, str, Battle]]:
    with ArenaStore(db, create=False) as store:
        return [(v.voter_kind, v.choice, b) for b, votes in store.battles_with_votes() for v in votes]


def _correct(answer: str, battle: Battle) -> bool:
    return str(QUESTIONS[battle.prompt[-1]["content"]]) in answer


def test_votes_go_to_the_right_answer_on_either_side(judged):
    db, result = judged
    votes = _votes(db)
    assert result["judged"] == result["created"] == 24 == len(votes)
    assert {kind for kind, _, _ in votes} == {"judge:reward-answer"} and result[
        "voter"
    ] == "judge:reward-answer"
    sides = set()
    for _, choice, battle in votes:
        a, b = _correct(battle.answer_a, battle), _correct(battle.answer_b, battle)
        assert choice == ("tie" if a == b else "a" if a else "b"), (battle, choice)
        if a != b:
            sides.add(choice)
    assert sides == {"a", "b"}  # the better answer stood on both sides: no position preference
    assert result["disagreements"] == 0 and result["unscored"] == 0
    means = {name: s["mean"] for name, s in result["scores"].items()}
    assert means["right"] == 1.0 and means["wrong"] == 0.0 and 0.0 < means["half"] < 1.0
    assert sum(s["n"] for s in result["scores"].values()) == 48


def test_ratings_rank_the_right_contestant_first_and_pairs_export(judged, tmp_path, capsys):
    db, _ = judged
    code, out, _ = run_cli(["arena", "ratings", "--db", db, "--rounds", "20", "--json"], capsys)
    assert code == 0
    order = [r["name"] for r in json.loads(out)["overall"]["ratings"]]
    assert order == ["right", "half", "wrong"]
    pairs = tmp_path / "pairs.jsonl"
    code, out, _ = run_cli(
        ["arena", "export", "--db", db, "--out", pairs, "--voters", "judge", "--json"], capsys
    )
    assert code == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all("1000" in row["rejected"][-1]["content"] for row in rows)


def test_a_second_run_judges_stored_prompts_and_passes_over_typed_ones(judged, servers, tmp_path, capsys):
    db = tmp_path / "copy.sqlite"
    with sqlite3.connect(judged[0]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    with ArenaStore(db) as store:  # a typed prompt (no reference fields) with an answered battle
        (pid,) = store.add_prompts([Prompt([{"role": "user", "content": "hi"}], source="typed")])
        battle = store.create_battle("right", "wrong", pid, sampling={})
        store.record_answers(battle.id, "hello", "hey", timings={})
    code, out, _ = run_cli(["arena", "judge", "--db", db, "--reward", "answer", "--battles", "3",
                            "--contestants", _contestants(servers), "--json"], capsys)  # fmt: skip
    result = json.loads(out)
    assert code == 0 and result["created"] == 3 and result["judged"] == 3 and result["unreferenced"] == 1
    new = [b for _, _, b in _votes(db)][-3:]
    assert all(b.prompt[-1]["content"] in QUESTIONS and b.fields for b in new)


def test_the_judge_name_and_a_second_reward_are_votes_of_their_own(judged, tmp_path, capsys):
    db = tmp_path / "copy.sqlite"
    with sqlite3.connect(judged[0]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    code, out, _ = run_cli(["arena", "judge", "--db", db, "--reward", "answer", "--reward", "json:0.5",
                            "--judge-name", "checker", "--json"], capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["judged"] == 24 and json.loads(out)["voter"] == "judge:checker"
    code, out, _ = run_cli(["arena", "judge", "--db", db, "--reward", "answer", "--json"], capsys)
    assert code == 0 and json.loads(out)["judged"] == 0  # reward-answer already voted on each battle


# -- the decisions themselves ---------------------------------------------------------------


def _battle(a: str, b: str, fields: dict | None, question: str = "q?") -> Battle:
    return Battle("id", "x", "y", [{"role": "user", "content": question}], a, b, fields=fields)


def _judge(*specs: str, margin: float = 0.0) -> RewardJudge:
    return RewardJudge(parse_rewards(list(specs), RewardContext(16)), margin)


def test_swapping_the_answers_swaps_the_verdict():
    judge = _judge("contains", "think:0.5")
    rng = random.Random(0)
    words = ["kettle", "wifi", "<think>x</think> wifi", "descale", "kettle wifi", "nothing"]
    battles = [
        _battle(
            rng.choice(words), rng.choice(words), {"contains": rng.sample(["kettle", "wifi", "descale"], 2)}
        )
        for _ in range(40)
    ]
    forward = judge(battles)
    backward = judge([_battle(b.answer_b, b.answer_a, b.fields) for b in battles])
    flip = {"a": "b", "b": "a", "tie": "tie"}
    assert [flip[d.choice] for d in forward] == [d.choice for d in backward]
    assert {d.choice for d in forward} == {"a", "b", "tie"}
    for battle, d in zip(battles, forward, strict=True):  # the weighted totals, by hand

        def total(text: str, want: list[str]) -> float:
            found = sum(w in text for w in want) / len(want)
            return found + 0.5 * float(text.startswith("<think>"))

        assert d.scores == pytest.approx((total(battle.answer_a, battle.fields["contains"]),
                                          total(battle.answer_b, battle.fields["contains"])))  # fmt: skip


def test_the_margin_makes_close_totals_a_tie():
    fields = {"contains": ["a1", "b2", "c3", "d4"]}
    battle = _battle("a1 b2 c3", "a1 b2", fields)
    assert _judge("contains")([battle])[0].choice == "a"
    assert _judge("contains", margin=0.25)([battle])[0].choice == "tie"
    assert _judge("contains", margin=0.2)([battle])[0].choice == "a"


def test_a_reward_that_does_not_apply_sits_out(tmp_path):
    code = tmp_path / "only_long.py"
    code.write_text(
        "def only_long(completions, rows, lengths):\n"
        "    assert all(n is None for n in lengths)\n"
        "    return [float(len(c)) if r.get('long') else None for c, r in zip(completions, rows)]\n"
    )
    judge = _judge(f"{code}:only_long")
    long, short = judge([_battle("abc", "abcdef", {"long": True}), _battle("abc", "abcdef", {})])
    assert long.choice == "b" and long.scores == (3.0, 6.0)
    assert short.choice is None and short.unscored


def test_a_trl_style_function_gets_the_conversation(tmp_path):
    code = tmp_path / "trl_reward.py"
    code.write_text(
        "def polite(prompts, completions, **kw):\n"
        "    assert prompts[0][-1]['role'] == 'user' and completions[0][0]['role'] == 'assistant'\n"
        "    return [float('please' in c[0]['content']) + kw['bonus'][i] for i, c in enumerate(completions)]\n"
    )
    (d,) = _judge(f"{code}:polite")([_battle("no", "yes please", {"bonus": 0.25})])
    assert d.choice == "b" and d.scores == (0.25, 1.25)


def test_rewards_the_arena_cannot_compute_or_bad_margins_are_refused():
    with pytest.raises(ConfigError, match="--reward length: it counts the answers' tokens"):
        _judge("answer", "length")
    with pytest.raises(ConfigError, match="--margin must be a finite number of at least 0"):
        _judge("answer", margin=-1.0)


def test_a_function_that_fails_is_named(tmp_path):
    code = tmp_path / "broken.py"
    code.write_text("def broken(completions, rows, lengths):\n    return [1 / 0 for _ in completions]\n")
    with pytest.raises(RewardError, match="the broken reward .*broken.py:broken.* raised ZeroDivisionError"):
        _judge(f"{code}:broken")([_battle("a", "b", None)])


# -- bad input: one line, nothing written ---------------------------------------------------


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code != 0 and err.count("\n") == 1 and err.startswith("weightsmith arena judge"), err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize(
    ("line", "words"),
    [({"prompt": "What is 2 + 3?"}, ["p.jsonl:2", "answer: missing", "the answer reward needs it"]),
     ({"prompt": "What is 2 + 3?", "answer": []}, ["p.jsonl:2", "answer: is an empty list"]),
     ({"promt": "What is 2 + 3?", "answer": 5}, ["p.jsonl:2", "promt: unknown key; did you mean 'prompt'"])],
)  # fmt: skip
def test_a_prompt_line_the_rewards_cannot_use_stops_the_start(servers, tmp_path, capsys, line, words):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "What is 9 + 9?", "answer": 18}) + "\n" + json.dumps(line) + "\n"
    )
    db = tmp_path / "arena.sqlite"
    code, _, err = run_cli(["arena", "judge", "--db", db, "--reward", "answer", "--battles", "2",
                            "--contestants", _contestants(servers), "--prompts", prompts], capsys)  # fmt: skip
    _one_line_error(code, err, *words)
    assert not db.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [([], ["give the judge: --judge MODEL", "--reward SPEC"]),
     (["--judge", "x", "--reward", "answer"], ["not both"]),
     (["--reward", "answer", "--verdict", "likelihood"], ["--verdict is an LLM judge's"]),
     (["--reward", "length"], ["--reward length: it counts the answers' tokens"]),
     (["--reward", "nope"], ["unknown reward 'nope'"]),
     (["--reward", "model:/nowhere/rm"], ["/nowhere/rm holds no reward model"])],
)  # fmt: skip
def test_bad_judge_options_are_one_line(tmp_path, capsys, args, words):
    db = tmp_path / "arena.sqlite"
    code, _, err = run_cli(["arena", "judge", "--db", db, *args], capsys)
    _one_line_error(code, err, *words)
    assert not db.exists()


def test_a_stored_field_the_rewards_cannot_use_is_named_before_any_vote(judged, tmp_path, capsys):
    db = tmp_path / "copy.sqlite"
    with sqlite3.connect(judged[0]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
        dst.execute("UPDATE prompts SET fields = ? WHERE id = 1", (json.dumps({"contains": []}),))
    code, _, err = run_cli(["arena", "judge", "--db", db, "--reward", "contains"], capsys)
    _one_line_error(code, err, "math.jsonl:1", "contains: is an empty list")
    assert [k for k, _, _ in _votes(db)] == ["judge:reward-answer"] * 24


# -- the store keeps the fields ---------------------------------------------------------------


def test_fields_are_stored_replaced_when_given_again_and_kept_otherwise(tmp_path):
    path = tmp_path / "arena.sqlite"
    messages = [{"role": "user", "content": "q"}]
    with ArenaStore(path) as store:
        (pid,) = store.add_prompts([Prompt(messages, source="a.jsonl:1", fields={"answer": 1})])
        assert store.add_prompts([Prompt(messages, source="typed")]) == [pid]
        assert store.prompts()[0].fields == {"answer": 1}  # a plain prompt leaves them
        store.add_prompts([Prompt(messages, source="b.jsonl:4", fields={"answer": 2})])
        (stored,) = store.prompts()
        assert stored.fields == {"answer": 2} and stored.source == "b.jsonl:4"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_a_version_3_db_gains_the_fields_column(tmp_path):
    path = tmp_path / "old.sqlite"
    with ArenaStore(path) as store:
        store.add_prompts([Prompt([{"role": "user", "content": "q"}], source="old")])
    with sqlite3.connect(path) as conn:  # back to version 3: no fields column
        conn.execute("ALTER TABLE prompts DROP COLUMN fields")
        conn.execute("PRAGMA user_version = 3")
    with ArenaStore(path) as store:
        (prompt,) = store.prompts()
        assert prompt.fields is None and prompt.source == "old"


# -- a reward model as the judge ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """A random full reward model (one score head) on the tiny model, saved by transformers."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_hf_dir, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    out = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tiny_hf_dir).save_pretrained(out)
    return out


def test_a_reward_model_votes_for_the_answer_transformers_scores_higher(
    reward_model_dir, servers, tmp_path, capsys
):
    import transformers

    prompts = tmp_path / "open.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    db = tmp_path / "arena.sqlite"
    code, out, _ = run_cli(["arena", "judge", "--db", db, "--reward", f"model:{reward_model_dir}", "--battles", "6",
                            "--contestants", _contestants(servers), "--prompts", prompts, "--device", "cpu",
                            "--json"], capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["judged"] == 6

    tokenizer = transformers.AutoTokenizer.from_pretrained(reward_model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()

    def hf_score(messages: list[dict], answer: str) -> float:
        text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    votes = _votes(db)
    decisive = 0
    for kind, choice, battle in votes:
        a, b = hf_score(battle.prompt, battle.answer_a), hf_score(battle.prompt, battle.answer_b)
        assert kind == "judge:reward-model"
        if battle.answer_a == battle.answer_b:
            assert choice == "tie"
        else:
            assert abs(a - b) > 1e-4 and choice == ("a" if a > b else "b"), (a, b, choice)
            decisive += 1
    assert decisive >= 3


def test_the_demo_arena_prompts_score_the_held_out_answer_full_marks(tmp_path):
    """The demo's arena prompts: each held-out conversation before its last answer, whose own
    answer scores 1 under --reward contains, and an answer in no house style 0."""
    from weightsmith.arena.prompt_file import read_prompts
    from weightsmith.cli.demo_arena import arena_prompts
    from weightsmith.datasets import sample_path

    path = tmp_path / "prompts.jsonl"
    path.write_text(arena_prompts())
    prompts = read_prompts(path, max_chars=20_000)
    judge = _judge("contains")
    judge.check(prompts)
    held_out = [
        json.loads(line)["messages"]
        for line in sample_path("kettlebird/valid.jsonl").read_text().splitlines()
    ]
    assert len(prompts) == len(held_out) > 30
    for prompt, conversation in zip(prompts, held_out, strict=True):
        assert prompt.messages == conversation[:-1] and prompt.messages[-1]["role"] == "user"
        battle = Battle("id", "x", "y", prompt.messages, conversation[-1]["content"], "Sure, happy to help!",
                        fields=prompt.fields)  # fmt: skip
        (d,) = judge([battle])
        assert d.choice == "a" and d.scores == (1.0, 0.0)


def test_a_reward_adapter_on_a_local_contestant_s_base_judges(tiny_hf_dir, servers, tmp_path, capsys, caplog):
    """An adapter reward model's base may be a path the command line names as a contestant;
    with endpoint contestants only, that path is a shared file's word and is refused."""
    from test_dpo import pair_rows, write_jsonl
    from test_reward_model import TRAIN, reward_config

    from weightsmith.train.reward_model import run_reward

    rm = tmp_path / "rm"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    run_reward(reward_config(tiny_hf_dir, pairs, rm, train={**TRAIN, "max_steps": 2, "eval_every": 0}))
    prompts = tmp_path / "open.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    right_url = servers[0].url
    db = tmp_path / "arena.sqlite"
    args = ["arena", "judge", "--db", db, "--reward", f"model:{rm}", "--battles", "2", "--prompts", prompts,
            "--max-tokens", "4", "--device", "cpu", "--json"]  # fmt: skip
    code, _, err = run_cli([*args, "--contestants", f"{right_url}#right,{servers[1].url}#wrong"], capsys)
    _one_line_error(code, err, f"model:{rm}", "not a model the command line names")
    assert not db.exists()
    with caplog.at_level(logging.INFO, logger="weightsmith"):
        code, out, _ = run_cli([*args, "--contestants", f"{tiny_hf_dir},{right_url}#right"], capsys)
    assert code == 0 and json.loads(out)["judged"] == 2 and json.loads(out)["scores"]["right"]["n"] == 2
    # the adapter ran on the contestant's loaded weights, and scored as its own copy scores
    assert "no second copy of the base model" in caplog.text
    from weightsmith.arena.store import ArenaStore
    from weightsmith.train.rewards import RewardContext, parse_rewards

    (alone,) = parse_rewards([f"model:{rm}"], RewardContext(4))
    alone.fn.load(torch.device("cpu"), tiny_hf_dir)
    with ArenaStore(db, create=False) as store:
        battles = [b for b, _ in store.battles_with_votes()]
    by_name: dict[str, list[float]] = {}
    for b in battles:
        for name, answer in ((b.model_a, b.answer_a), (b.model_b, b.answer_b)):
            by_name.setdefault(name, []).extend(alone.fn([answer], [{"prompt": b.prompt}], [0]))
    assert len(battles) == 2 and {
        k: v["mean"] for k, v in json.loads(out)["scores"].items()
    } == pytest.approx({k: sum(v) / len(v) for k, v in by_name.items()}, abs=1e-5)


# -- checking an LLM judge against the reward judge: arena ratings --agree ---------------------


def checker(body: dict) -> str:
    """An LLM judge that knows the answers: [[A]] or [[B]] for the one right answer, else [[C]]."""
    a, b = judged_answers(body)
    ok_a, ok_b = ("1000" not in a), ("1000" not in b)
    return "[[C]]" if ok_a == ok_b else "[[A]]" if ok_a else "[[B]]"


def test_ratings_agree_compares_an_llm_judge_with_the_reward_judge(judged, tmp_path, capsys):
    db = tmp_path / "copy.sqlite"
    with sqlite3.connect(judged[0]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    with FakeServer(checker) as good, FakeServer(lambda body: "[[A]]") as first:
        for url, name in ((good.url, "checker"), (first.url, "first")):
            code, out, _ = run_cli(
                ["arena", "judge", "--db", db, "--judge", f"{url}#{name}", "--json"], capsys
            )
            assert code == 0 and json.loads(out)["judged"] == 24
    rate = ["arena", "ratings", "--db", db, "--rounds", "20", "--json"]
    code, out, _ = run_cli([*rate, "--agree", "judge:reward-answer,judge:checker"], capsys)
    agreement = json.loads(out)["agreement"]
    assert (
        code == 0
        and agreement["battles"] == 24
        and agreement["observed"] == 1.0
        and agreement["kappa"] == 1.0
    )
    # A judge that always says the first answer ties every battle (its two orders disagree):
    # it agrees exactly as often as chance predicts, kappa 0.
    code, out, _ = run_cli([*rate, "--agree", "judge:reward-answer,judge:first"], capsys)
    agreement = json.loads(out)["agreement"]
    ties = sum(choice == "tie" for _, choice, _ in _votes(judged[0]))
    assert agreement["observed"] == pytest.approx(ties / 24) and agreement["kappa"] == pytest.approx(
        0.0, abs=1e-12
    )
    code, out, _ = run_cli([*rate, "--voters", "judge:reward-answer"], capsys)
    assert code == 0 and json.loads(out)["source"]["votes"] == 24  # one judge's votes alone
    code, out, _ = run_cli(
        [*rate, "--voters", "judge", "--agree", "judge:reward-answer,judge:checker"], capsys
    )
    assert json.loads(out)["source"]["votes"] == 72


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--agree", "judge,judge:checker"], ["the two overlap"]),
     (["--agree", "human"], ["--agree takes two voters"]),
     (["--agree", "human,jugde"], ["--agree 'jugde'"]),
     (["--voters", "jugde"], ["--voters 'jugde'", "judge:NAME"])],
)  # fmt: skip
def test_bad_agree_and_voters_options_are_one_line(judged, capsys, args, words):
    code, _, err = run_cli(["arena", "ratings", "--db", judged[0], *args], capsys)
    assert code != 0 and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def test_a_reference_file_judges_battles_fought_without_one(tmp_path, capsys):
    """Battles fought over plain prompts (the page's) are judged once `--prompts` gives their
    references: the file's fields replace the stored ones (here a bad one), then the votes go
    to the right answers; a battle whose prompt the file leaves out stays unjudged."""
    db = tmp_path / "arena.sqlite"
    questions = list(QUESTIONS)
    with ArenaStore(db) as store:
        store.add_contestants([parse_contestant("x", {}), parse_contestant("y", {})])
        ids = store.add_prompts(
            [Prompt([{"role": "user", "content": q}], source="page.jsonl") for q in questions]
        )
        for i, (pid, q) in enumerate(zip(ids, questions, strict=True)):
            good, bad = right({"messages": [{"content": q}]}), "No idea."
            battle = store.create_battle("x", "y", pid, sampling={})
            store.record_answers(battle.id, *((good, bad) if i % 2 else (bad, good)), timings={})
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE prompts SET fields = ? WHERE id = ?", (json.dumps({"answer": []}), ids[0]))
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": q, "answer": QUESTIONS[q]}) + "\n" for q in questions[:3]))
    code, out, err = run_cli(
        ["arena", "judge", "--db", db, "--reward", "answer", "--prompts", refs, "--json"], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["judged"] == 3 and result["unreferenced"] == 1
    votes = _votes(db)
    assert [choice for _, choice, _ in votes] == ["b", "a", "b"]  # the right answer's side, each time
    assert all(b.prompt_source == "refs.jsonl:" + str(i + 1) for i, (_, _, b) in enumerate(votes))
