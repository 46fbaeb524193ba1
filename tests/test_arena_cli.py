"""`weightsmith arena judge|ratings|export|import` end to end, in-process, with a tiny random
model, a fake endpoint contestant and fake endpoint judges whose verdicts a test controls."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from arena_fakes import FakeServer, free_url, judged_answers
from conftest import run_cli

from weightsmith.arena.schema import SCHEMA_VERSION
from weightsmith.arena.store import ArenaStore
from weightsmith.cli.main import main

MARK = "far side"  # what the endpoint contestant always says


def fair(body: dict) -> str:
    """Prefers the endpoint contestant's answer wherever it stands: both orders agree."""
    a, b = judged_answers(body)
    return "It is clearer.\n[[A]]" if MARK in a and MARK not in b else "It is clearer.\n[[B]]"


def biased(body: dict) -> str:
    """Always picks the first answer (position bias): the two orders always disagree."""
    return "The first one. [[A]]"


run = run_cli


@pytest.fixture(scope="module")
def servers():
    with FakeServer(lambda body: f"hello from the {MARK}") as far, FakeServer(fair) as judge_fair:
        with FakeServer(biased) as judge_biased:
            yield far, judge_fair, judge_biased


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"prompt": "Say hello."}, {"messages": [{"role": "user", "content": "Count to three."}],
             "category": "counting"}]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def judged_db(tiny_hf_dir, servers, prompts_file, tmp_path_factory) -> Path:
    """Four battles fought and judged by the fair judge, then judged again by the biased one."""
    far, judge_fair, judge_biased = servers
    db = tmp_path_factory.mktemp("arena") / "arena.sqlite"
    capsys = None  # the module fixture runs main directly; outputs are checked in the tests
    code = main([
        "arena", "judge", "--db", str(db), "--judge", f"{judge_fair.url}#fair", "--battles", "4",
        "--contestants", f"{tiny_hf_dir},{far.url}#far", "--prompts", str(prompts_file),
        "--max-tokens", "4", "--device", "cpu", "--seed", "3", "--json",
    ])  # fmt: skip
    assert code == 0 and capsys is None
    assert main(["arena", "judge", "--db", str(db), "--judge", f"{judge_biased.url}#biased", "--json"]) == 0
    return db


def _votes(db: Path) -> list[tuple[str, str, str, str]]:
    with ArenaStore(db, create=False) as store:
        return [
            (v.voter_kind, v.choice, b.model_a, b.model_b)
            for b, votes in store.battles_with_votes()
            for v in votes
        ]


def test_judge_fights_battles_and_records_both_order_verdicts(judged_db, servers):
    votes = _votes(judged_db)
    fair_votes = [v for v in votes if v[0] == "judge:fair"]
    biased_votes = [v for v in votes if v[0] == "judge:biased"]
    assert len(fair_votes) == 4 and len(biased_votes) == 4
    for _, choice, a, b in fair_votes:  # the endpoint contestant wins, on whichever side it stood
        assert {a, b} == {"tiny-llama", "far"} and choice == ("a" if a == "far" else "b")
    assert {a for _, _, a, _ in fair_votes} == {"tiny-llama", "far"}  # sides were randomised
    assert all(choice == "tie" for _, choice, _, _ in biased_votes)  # the orders disagreed
    # Both orders were asked: two judge requests per battle, the answers swapped.
    _, judge_fair, _ = servers
    asked = [judged_answers(r["body"]) for r in judge_fair.requests]
    assert len(asked) == 8 and all(asked[2 * k] == asked[2 * k + 1][::-1] for k in range(4))
    with ArenaStore(judged_db, create=False) as store:
        battle = store.battles_with_votes()[0][0]
        assert {"seed_a", "seed_b", "temperature", "max_tokens"} <= set(battle.sampling)
        assert set(battle.timings) == {"a", "b"} and store.integrity_check() == []


def test_judge_resumes_without_voting_twice(judged_db, servers, capsys):
    _, judge_fair, _ = servers
    code, out, _ = run(
        ["arena", "judge", "--db", judged_db, "--judge", f"{judge_fair.url}#fair", "--json"], capsys
    )
    assert code == 0 and json.loads(out)["judged"] == 0
    assert len(_votes(judged_db)) == 8


def test_ratings_with_kappa_export_and_import_round_trip(judged_db, tmp_path, capsys):
    db = tmp_path / "copy.sqlite"
    with ArenaStore(judged_db, create=False) as src, sqlite3.connect(db) as dst:
        sqlite3.connect(src.path).backup(dst)
    with ArenaStore(db, create=False) as store:  # people agree with the fair judge
        for battle, _ in store.battles_with_votes():
            store.record_vote(battle.id, "a" if battle.model_a == "far" else "b", f"person-{battle.id}")
        sha = store.content_hash()
    code, out, _ = run(
        ["arena", "ratings", "--db", db, "--out", tmp_path / "report", "--rounds", "20"], capsys
    )
    assert code == 0 and "far" in out and "tiny-llama" in out and "Cohen's kappa" in out
    ratings = json.loads((tmp_path / "report" / "ratings.json").read_text())
    names = [r["name"] for r in ratings["overall"]["ratings"]]
    assert names == ["far", "tiny-llama"] and ratings["agreement"]["battles"] == 4
    assert (tmp_path / "report" / "report.html").is_file()

    code, out, _ = run(["arena", "export", "--db", db, "--out", tmp_path / "pairs.jsonl", "--json"], capsys)
    assert code == 0 and json.loads(out)["rows"] == 4
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert all(MARK in r["chosen"][0]["content"] for r in rows)
    meta = json.loads((tmp_path / "pairs.meta.json").read_text())
    assert meta["source"]["sha256"] == sha and len(meta["battle_ids"]) == 4
    kto = ["arena", "export", "--db", db, "--out", tmp_path / "kto.jsonl", "--format", "kto", "--json"]
    code, out, _ = run(kto, capsys)
    assert code == 0 and json.loads(out)["rows"] == 8  # each battle's two answers, labelled
    rows = [json.loads(x) for x in (tmp_path / "kto.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, False] * 4
    assert all((MARK in r["completion"][0]["content"]) == r["label"] for r in rows)
    assert json.loads((tmp_path / "kto.lineage.json").read_text())["config"]["format"] == "kto"

    log = tmp_path / "theirs.jsonl"
    log.write_text(
        "".join(
            json.dumps({"question_id": f"q{i}", "model_a": "x", "model_b": "y", "winner": w}) + "\n"
            for i, w in enumerate(["model_a", "model_b", "tie", "model_a"])
        )
    )
    code, out, _ = run(["arena", "import", "--db", db, "--battles", log, "--json"], capsys)
    assert code == 0 and json.loads(out)["battles_added"] == 4
    code, out, _ = run(["arena", "import", "--db", db, "--battles", log, "--json"], capsys)
    assert json.loads(out)["battles_skipped"] == 4  # a re-import adds nothing
    code, out, _ = run(
        ["arena", "ratings", "--db", db, "--voters", "import", "--rounds", "5", "--json"], capsys
    )
    assert code == 0 and {r["name"] for r in json.loads(out)["overall"]["ratings"]} == {"x", "y"}


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code != 0 and err.count("\n") == 1 and err.startswith("weightsmith arena"), err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("sub", ["ratings", "export", "import"])
def test_a_missing_db_is_an_error_and_not_created(sub, tmp_path, capsys):
    db = tmp_path / "nope.sqlite"
    extra = {
        "ratings": [],
        "export": ["--out", tmp_path / "p.jsonl"],
        "import": ["--battles", tmp_path / "x"],
    }
    code, _, err = run(["arena", sub, "--db", db, *extra[sub]], capsys)
    _one_line_error(code, err, str(db), "no such arena DB")
    assert not db.exists() and not (tmp_path / "p.jsonl").exists()


def test_a_newer_db_is_refused(tmp_path, capsys):
    db = tmp_path / "new.sqlite"
    ArenaStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    for argv in (["arena", "ratings", "--db", db], ["arena", "judge", "--db", db, "--judge", free_url()]):
        code, _, err = run(argv, capsys)
        _one_line_error(code, err, "upgrade weightsmith")


def test_a_bad_prompts_line_names_file_and_line(servers, tmp_path, capsys):
    far, judge_fair, _ = servers
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"promt": "typo"}\n')
    db = tmp_path / "arena.sqlite"
    code, _, err = run(["arena", "judge", "--db", db, "--judge", f"{judge_fair.url}#fair", "--battles", "2",
                        "--contestants", f"{far.url}#far,{far.url}#far2", "--prompts", prompts], capsys)  # fmt: skip
    _one_line_error(code, err, f"{prompts}:2:", "promt")
    assert not db.exists()


def test_an_unreachable_contestant_is_named_at_start(servers, prompts_file, tmp_path, capsys):
    far, judge_fair, _ = servers
    db = tmp_path / "arena.sqlite"
    code, _, err = run(["arena", "judge", "--db", db, "--judge", f"{judge_fair.url}#fair", "--battles", "2",
                        "--contestants", f"{far.url}#far,{free_url()}#gone", "--prompts", prompts_file], capsys)  # fmt: skip
    _one_line_error(code, err, "'gone'", "unreachable")
    assert not db.exists()


def test_an_unreachable_judge_stops_the_start(judged_db, servers, prompts_file, tmp_path, capsys):
    far, _, _ = servers
    gone = f"{free_url()}#gone-judge"
    db = tmp_path / "arena.sqlite"
    code, _, err = run(["arena", "judge", "--db", db, "--judge", gone, "--battles", "2",
                        "--contestants", f"{far.url}#far,{far.url}#far2", "--prompts", prompts_file], capsys)  # fmt: skip
    _one_line_error(code, err, "judge:", "unreachable", "--judge")
    assert not db.exists()
    asked = len(far.requests)
    copy = tmp_path / "copy.sqlite"
    with sqlite3.connect(judged_db) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    code, _, err = run(["arena", "judge", "--db", copy, "--judge", gone, "--json"], capsys)
    _one_line_error(code, err, "judge:", "unreachable")
    assert len(_votes(copy)) == 8 and len(far.requests) == asked  # nothing judged, nothing fought


def test_judge_fights_guarded_contestants(servers, prompts_file, tmp_path, capsys):
    far, judge_fair, _ = servers
    db = tmp_path / "arena.sqlite"
    code, out, _ = run(["arena", "judge", "--db", db, "--judge", f"{judge_fair.url}#fair", "--battles", "2",
                        "--contestants", f"{far.url}#far,{far.url}#far@builtin:school", "--prompts", prompts_file,
                        "--json"], capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["judged"] == 2
    with ArenaStore(db, create=False) as store:
        contestants = {c.name: c.spec for c in store.contestants()}
    assert contestants == {"far": f"{far.url}#far", "far@builtin:school": f"{far.url}#far@builtin:school"}
    assert {(a, b) for _, _, a, b in _votes(db)} <= {
        ("far", "far@builtin:school"),
        ("far@builtin:school", "far"),
    }
    bad = tmp_path / "missing.yaml"
    code, _, err = run(["arena", "judge", "--db", db, "--judge", f"{judge_fair.url}#fair", "--battles", "1",
                        "--contestants", f"{far.url}#far,{far.url}#far@{bad}", "--prompts", prompts_file], capsys)  # fmt: skip
    _one_line_error(code, err, "policy file not found", str(bad))


def test_a_bad_battle_log_adds_nothing(judged_db, tmp_path, capsys):
    db = tmp_path / "copy.sqlite"
    with sqlite3.connect(judged_db) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    log = tmp_path / "bad.jsonl"
    log.write_text(
        '{"model_a": "x", "model_b": "y", "winner": "model_a"}\n{"model_a": "x", "winner": "nobody"}\n'
    )
    code, _, err = run(["arena", "import", "--db", db, "--battles", log], capsys)
    _one_line_error(code, err, f"{log}:2")
    assert len(_votes(db)) == 8


@pytest.mark.parametrize("sub", [[], ["judge"], ["ratings"], ["export"], ["import"]])
def test_help_shows_an_example(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main(["arena", *sub, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and ("weightsmith arena" in out if sub else "ratings" in out)
