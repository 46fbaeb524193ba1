"""Arena files: battle logs in (good files, every bad line one FILE:LINE error), preference
pairs out (TRL's conversational format, filters, majority, the meta file, atomic writes), and
the ratings report (escaped, no scripts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from weightsmith.arena.agreement import cohen_kappa
from weightsmith.arena.battles import ExportFilters, export_preferences, meta_path, read_battle_log
from weightsmith.arena.ratings import rate
from weightsmith.arena.records import Battle, Outcome, Vote, judge_voter
from weightsmith.arena.report import write_ratings_outputs
from weightsmith.errors import ConfigError, UsageError

SHA = hashlib.sha256(b"arena.sqlite").hexdigest()


def _conv(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _line(**fields) -> dict:
    return {"model_a": "m1", "model_b": "m2", "winner": "model_a", **fields}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# ---------------------------------------------------------------------------
# battle logs in


def test_reads_a_published_style_log(tmp_path: Path) -> None:
    rows = [
        # the published logs' shape: conversations, an anonymised person as judge, extra keys
        _line(
            question_id="q1", conversation_a=_conv("Hi", "Hello!"), conversation_b=_conv("Hi", "Hey."),
            judge="arena_user_7", turn=1, anony=True, language="English", tstamp=1.7e9, category="greeting",
        ),
        _line(id=2, model_a="m2", model_b="m3", winner="model_b", prompt="Add 2+2", answer_a="5", answer_b="4"),
        _line(winner="tie"),
        _line(winner="tie (bothbad)"),
        {"model_a": "m1", "model_b": "m2", "winner": "model_b", "question_id": "q1", "judge": "arena_user_9"},
        "",  # blank lines are skipped
    ]  # fmt: skip
    pairs = read_battle_log(_write_jsonl(tmp_path / "log.jsonl", rows))
    assert [v.choice for _, v in pairs] == ["a", "b", "tie", "both_bad", "b"]
    first, vote = pairs[0]
    assert first.id == "q1" and first.prompt == [{"role": "user", "content": "Hi"}]
    assert (first.answer_a, first.answer_b, first.category) == ("Hello!", "Hey.", "greeting")
    assert (vote.voter_kind, vote.voter, vote.created) == ("import", "arena_user_7", 1.7e9)
    second = pairs[1][0]
    assert second.id == "2" and second.prompt == [{"role": "user", "content": "Add 2+2"}]
    assert (second.answer_a, second.answer_b) == ("5", "4")
    assert pairs[2][0].prompt is None and pairs[2][0].id.startswith("log-")  # no text, an id from the content
    assert pairs[2][0].id != pairs[3][0].id
    assert pairs[4][0] is first and pairs[4][1].battle_id == "q1"  # a second vote on the same battle
    judged = read_battle_log(tmp_path / "log.jsonl", judges_are_models=True)
    assert judged[0][1].voter_kind == judge_voter("arena_user_7") and judged[1][1].voter_kind == "import"
    ratings = rate([Outcome.of(b, v) for b, v in pairs], rounds=10)
    assert ratings.overall.total == 5


def test_multi_turn_battles_whose_histories_differ_keep_no_text(tmp_path: Path) -> None:
    conv_a = _conv("Hi", "Hello") + _conv("More", "Sure")
    conv_b = _conv("Hi", "Hey") + _conv("More", "Fine")
    same_a, same_b = _conv("Hi", "Hello") + _conv("More", "A"), _conv("Hi", "Hello") + _conv("More", "B")
    rows = [
        _line(conversation_a=conv_a, conversation_b=conv_b),
        _line(conversation_a=same_a, conversation_b=same_b),
    ]
    (diverged, _), (shared, _) = read_battle_log(_write_jsonl(tmp_path / "log.jsonl", rows))
    assert (diverged.prompt, diverged.answer_a, diverged.answer_b) == (None, None, None)
    assert shared.prompt == same_a[:-1] and (shared.answer_a, shared.answer_b) == ("A", "B")


def test_reads_a_json_list_and_names_the_line_of_a_bad_record(tmp_path: Path) -> None:
    good = [_line(question_id=f"q{i}") for i in range(3)]
    path = tmp_path / "clean_battle.json"
    path.write_text(json.dumps(good, indent=2), encoding="utf-8")
    assert [b.id for b, _ in read_battle_log(path)] == ["q0", "q1", "q2"]
    bad = [*good[:2], _line(question_id="q2", winner="model_c")]
    path.write_text(json.dumps(bad, indent=2), encoding="utf-8")
    text = path.read_text()
    line = [n for n, t in enumerate(text.splitlines(), 1) if t == "  {"][2]  # where the third object opens
    with pytest.raises(ConfigError) as err:
        read_battle_log(path)
    assert str(err.value).startswith(f"{path}:{line}: winner: unknown winner 'model_c'")
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no battles"):
        read_battle_log(path)
    path.write_text(json.dumps(good) + " " * 100, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{path}:1: the JSON list is larger than 50 bytes"):
        read_battle_log(path, max_json_bytes=50)


BAD_LINES = [
    (
        _line(winner="model_c"),
        "winner: unknown winner 'model_c' (did you mean 'model_b'?); write one of model_a, model_b, tie,",
    ),
    ({"model_a": "m1", "winner": "tie"}, "model_b: required but missing"),
    (_line(model_b="m1"), "model_b: same as model_a ('m1'); a battle needs two different models"),
    (
        '{"model_a": "m1", "model_b": ',
        "invalid JSON (Expecting value at column 30); write one battle per line",
    ),
    ("[1, 2]", "expected a JSON object (battle), got list"),
    (_line(prompt="x" * 3000), "the line is longer than 2000 bytes; shorten the battle"),
    (_line(winer="tie"), "winer: unknown key (did you mean 'winner'?)"),
    (_line(model_a=""), "model_a: expected a model name, got an empty string"),
    (_line(model_a=7), "model_a: expected a string, got 7"),
    (_line(prompt=[{"role": "assistant", "content": "x"}]), "prompt: the last message is 'assistant'"),
    (_line(conversation_a=[{"role": "user", "text": "x"}]), "conversation_a[0]: expected a message {role"),
    (_line(conversation_b=[{"role": "robot", "content": "x"}]), "conversation_b[0]: role is 'robot'"),
    (_line(question_id=["q"]), "question_id: expected a string or number, got ['q']"),
]


@pytest.mark.parametrize(("row", "message"), BAD_LINES, ids=[m.split(":")[0] for _, m in BAD_LINES])
def test_each_bad_line_is_one_error_naming_file_and_line(tmp_path: Path, row, message: str) -> None:
    path = _write_jsonl(tmp_path / "log.jsonl", [_line(), row, _line()])
    with pytest.raises(ConfigError) as err:
        read_battle_log(path, max_line_bytes=2000)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text, text
    assert "\n" not in text


def test_log_limits_and_conflicting_ids(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "log.jsonl", [_line()] * 4)
    with pytest.raises(ConfigError, match=f"{path}:4: more than 3 battles; split the log"):
        read_battle_log(path, max_records=3)
    _write_jsonl(path, [_line(id="x"), _line(id="x", model_b="m3")])
    with pytest.raises(ConfigError, match=f"{path}:2: id: 'x' is already the battle m1 vs m2 on line 1"):
        read_battle_log(path)
    path.write_bytes(b'{"model_a": "m\xff", "model_b": "m2", "winner": "tie"}\n')
    with pytest.raises(ConfigError, match=f"{path}:1: not UTF-8 text"):
        read_battle_log(path)
    with pytest.raises(UsageError, match="battle log not found"):
        read_battle_log(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------
# preference pairs out


def _battle(bid: str, prompt: str = "Q", a: str = "A", b: str = "B") -> Battle:
    return Battle(bid, "m1", "m2", [{"role": "user", "content": prompt}], a, b)


def _vote(bid: str, choice: str, kind: str = "human", voter: str = "") -> Vote:
    return Vote(bid, choice, kind, voter)


def _arena() -> tuple[list[Battle], list[Vote]]:
    battles = [_battle(f"b{i}", prompt=f"Q{i}", a=f"A{i}", b=f"B{i}") for i in range(8)]
    battles.append(Battle("notext", "m1", "m2"))
    votes = [
        _vote("b0", "a"),  # a clear A
        _vote("b1", "b"),  # a clear B
        _vote("b2", "tie"),  # ties never export
        _vote("b3", "both_bad"),
        *[_vote("b4", c, voter=str(i)) for i, c in enumerate("aab")],  # conflicting: A by 2 of 3
        *[_vote("b5", c, voter=str(i)) for i, c in enumerate("ab")],  # no majority
        _vote("b6", "b", judge_voter("j1")),  # a judge only
        _vote("b7", "a", "import"),
        _vote("notext", "a"),
    ]
    return battles, votes


def test_export_writes_trl_preference_rows_and_meta(tmp_path: Path) -> None:
    battles, votes = _arena()
    out = tmp_path / "pairs.jsonl"
    result = export_preferences(out, battles, votes, source_sha256=SHA, source="arena.sqlite")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.battle_ids == ["b0", "b1", "b4", "b6", "b7"] and result.rows == len(rows) == 5
    assert rows[0] == {
        "prompt": [{"role": "user", "content": "Q0"}],
        "chosen": [{"role": "assistant", "content": "A0"}],
        "rejected": [{"role": "assistant", "content": "B0"}],
    }
    assert rows[1]["chosen"][0]["content"] == "B1" and rows[2]["chosen"][0]["content"] == "A4"
    meta = json.loads(meta_path(out).read_text())
    assert meta_path(out) == tmp_path / "pairs.meta.json"
    assert meta["source"] == {"path": "arena.sqlite", "sha256": SHA}
    assert meta["battle_ids"] == result.battle_ids and meta["rows"] == 5
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert meta["skipped"] == {"tie": 1, "both bad": 1, "no majority": 1, "no prompt or answers": 1}
    assert meta["filters"]["voters"] == [] and meta["votes"] == 7


def test_export_for_kto_labels_each_answer_and_keeps_both_bad(tmp_path: Path) -> None:
    battles, votes = _arena()
    out = tmp_path / "feedback.jsonl"
    result = export_preferences(out, battles, votes, source_sha256=SHA, unpaired=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(r["prompt"][0]["content"], r["completion"][0]["content"], r["label"]) for r in rows]
    assert got == [
        ("Q0", "A0", True), ("Q0", "B0", False), ("Q1", "B1", True), ("Q1", "A1", False),
        ("Q3", "A3", False), ("Q3", "B3", False),  # both bad: both answers undesirable
        ("Q4", "A4", True), ("Q4", "B4", False), ("Q6", "B6", True), ("Q6", "A6", False),
        ("Q7", "A7", True), ("Q7", "B7", False),
    ]  # fmt: skip
    assert rows[0]["completion"] == [{"role": "assistant", "content": "A0"}]
    assert result.battle_ids == ["b0", "b0", "b1", "b1", "b3", "b3", "b4", "b4", "b6", "b6", "b7", "b7"]
    meta = json.loads(meta_path(out).read_text())
    assert meta["format"].startswith("trl-unpaired-preference") and meta["rows"] == 12
    assert meta["filters"]["both_bad"] == "both answers undesirable"
    assert meta["skipped"] == {"tie": 1, "no majority": 1, "no prompt or answers": 1}
    from weightsmith.train.unpaired_data import read_unpaired

    assert [(r.completion[0]["content"], r.label) for r in read_unpaired(out)] == [(c, g) for _, c, g in got]


def test_export_filters(tmp_path: Path) -> None:
    battles, votes = _arena()
    out = tmp_path / "pairs.jsonl"

    def ids(**kw) -> list[str]:
        return export_preferences(
            out, battles, votes, source_sha256=SHA, filters=ExportFilters(**kw)
        ).battle_ids

    assert ids(voters=("human",)) == ["b0", "b1", "b4"]
    assert ids(voters=("judge",)) == ["b6"]  # any judge
    assert ids(voters=("judge:j1", "import")) == ["b6", "b7"]
    assert ids(min_votes=3) == ["b4"]
    assert ids(min_margin=0.7) == ["b0", "b1", "b6", "b7"]  # b4's winner has 2/3 of the votes
    assert json.loads(meta_path(out).read_text())["filters"]["min_margin"] == 0.7
    with pytest.raises(UsageError, match="min_votes must be at least 1"):
        ExportFilters(min_votes=0)


def test_export_writes_nothing_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    battles, votes = _arena()
    out = tmp_path / "pairs.jsonl"
    out.write_text("old\n")
    with pytest.raises(UsageError, match=r"no battle passes the filters \(.*too few votes: 9"):
        export_preferences(out, battles, votes, source_sha256=SHA, filters=ExportFilters(min_votes=5))
    with pytest.raises(UsageError, match="64 lowercase hex digits"):
        export_preferences(out, battles, votes, source_sha256="abc")
    original = Path.write_text

    def failing(self: Path, text: str, *args, **kwargs) -> int:
        if self.name.startswith(".pairs.meta.json"):
            raise OSError(28, "No space left on device")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(Exception, match="No space left on device"):
        export_preferences(out, battles, votes, source_sha256=SHA)
    monkeypatch.undo()
    assert out.read_text() == "old\n" and not meta_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no temp files left


# ---------------------------------------------------------------------------
# the report

EVIL = "<img src=x onerror=alert(1)>"


def test_report_escapes_names_and_writes_json(tmp_path: Path) -> None:
    outs = [Outcome(EVIL, "plain", s, category=EVIL) for s in (1.0, 0.0, 1.0, 0.5)]
    outs += [Outcome("plain", "third", s) for s in (1.0, 0.0, 0.0)] + [Outcome("third", EVIL, 1.0)]
    outs += [Outcome(EVIL, "third", 1.0)]
    ratings = rate(outs, rounds=20, source={"voters": ["human"], "db": EVIL})
    votes = [
        Vote("x", "a", "human"),
        Vote("x", "a", "judge:j"),
        Vote("y", "b", "human"),
        Vote("y", "a", "judge:j"),
    ]
    ratings.agreement = cohen_kappa(votes)
    written = write_ratings_outputs(tmp_path / "report", ratings)
    page = Path(written["report"]).read_text()
    assert EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "<svg" in page and "Cohen's κ" in page and "percentile bootstrap" in page
    data = json.loads(Path(written["ratings"]).read_text())
    assert {r["name"] for r in data["overall"]["ratings"]} == {EVIL, "plain", "third"}
    assert data["method"]["interval"] == {
        "method": "bootstrap",
        "level": 0.95,
        "rounds": 20,
        "seed": 0,
        "at_least": "wald",
    }
    assert data["source"]["db"] == EVIL and data["agreement"]["battles"] == 2
