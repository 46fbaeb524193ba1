"""The arena page (`weightsmith arena serve`): its API over HTTP, and the page itself in a real
browser (headless Chromium through selenium).

The contestants are a fake with `Contestants`' interface that streams fixed text, one of them
hostile (`<img src=x onerror=alert(1)>`), and the pairing is a fake `choose_pair` that puts
the two on random sides, so every test runs in well under a second of server time.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import headless_chromium

from weightsmith.arena.records import Contestant
from weightsmith.cli.main import main
from weightsmith.commands.arena_serve import ArenaServeConfig, start_arena_server

HOSTILE = "<img src=x onerror=alert(1)>"
ANSWERS = {
    "alpha-model": ["Hello ", "from ", "alpha."],
    "hostile-model": ["<img src=x ", "onerror=alert(1)>"],
}
NAMES = tuple(ANSWERS)


class FakeContestants:
    """`Contestants`' interface over fixed answers; `fail` names a contestant whose stream breaks."""

    def __init__(self, fail: str | None = None) -> None:
        self.names = list(ANSWERS)
        self.contestants = [Contestant(n, f"fake:{n}", "local") for n in self.names]
        self.fail = fail
        self.calls: list[tuple[str, list[dict]]] = []

    def check(self) -> None:
        pass

    def stream(self, name: str, messages: list[dict], params) -> Iterator[str]:
        self.calls.append((name, messages))
        for i, delta in enumerate(ANSWERS[name]):
            if name == self.fail and i == 1:
                raise ConnectionError(f"{name} at http://10.0.0.9/v1 went away")
            yield delta

    def answer(self, name: str, messages: list[dict], params) -> tuple[str, dict]:
        return "".join(ANSWERS[name]), {}


def fake_pair(counts: dict[str, int], ratings, rng: random.Random) -> tuple[str, str]:
    left, right = rng.sample(sorted(counts), 2)
    return left, right


def start(tmp_path: Path, contestants=None, **options):
    cfg = ArenaServeConfig(contestants=list(NAMES), db=str(tmp_path / "arena.sqlite"), port=0, **options)
    return start_arena_server(cfg, contestants or FakeContestants(), choose_pair=fake_pair)


@pytest.fixture
def arena(tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour.", "category": "easy"}\n{"messages": [{"role": "user", '
                       '"content": "Count to three."}]}\n')  # fmt: skip
    running = start(tmp_path, prompts=str(prompts), max_votes_per_minute=1000)
    yield running
    running.stop()


def client(running, **headers) -> httpx.Client:
    c = httpx.Client(base_url=running.url, timeout=10, headers=headers)
    c.get("/")  # the voter cookie
    return c


def battle(c: httpx.Client, body: dict) -> tuple[bytes, list[dict]]:
    """POST a battle; the raw stream and its events."""
    with c.stream("POST", "/api/battles", json=body) as r:
        assert r.status_code == 200, r.read()
        raw = r.read()
    events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]
    return raw, events


def votes(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT battle_id, choice, voter_kind FROM votes ORDER BY id").fetchall()


# ---- the API -----------------------------------------------------------------------------


def test_names_stay_hidden_until_the_vote(arena) -> None:
    c = client(arena)
    before = c.get("/").content + c.get("/api/info").content + c.get("/health").content
    raw, events = battle(c, {"prompt": "Say hi", "category": "greeting"})
    assert [e["type"] for e in events][0] == "battle" and events[-1]["type"] == "done"
    assert not any(name.encode() in before + raw for name in NAMES)
    texts = {side: "".join(e["text"] for e in events if e.get("side") == side and e["type"] == "delta")
             for side in "ab"}  # fmt: skip
    assert sorted(texts.values()) == sorted(
        "".join(a) for a in ANSWERS.values()
    )  # the hostile text, verbatim
    r = c.post("/api/votes", json={"battle": events[0]["id"], "choice": "tie"})
    assert r.status_code == 200 and r.json()["recorded"] is True
    shown = {r.json()["model_a"]: texts["a"], r.json()["model_b"]: texts["b"]}
    assert shown == {name: "".join(a) for name, a in ANSWERS.items()}
    assert votes(arena.store.path) == [(events[0]["id"], "tie", "human")]
    b = arena.store.battle(events[0]["id"])
    assert b.category == "greeting" and {"seed_a", "seed_b", "temperature"} <= b.sampling.keys()


def test_cookie_random_prompt_and_double_vote(arena) -> None:
    c = client(arena)
    cookie = c.get("/").headers.get("set-cookie", "") or httpx.get(arena.url + "/").headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    _, events = battle(c, {"random": True})
    assert events[0]["prompt"][-1]["content"] in ("Name a colour.", "Count to three.")
    bid = events[0]["id"]
    assert c.post("/api/votes", json={"battle": bid, "choice": "a"}).status_code == 200
    again = c.post("/api/votes", json={"battle": bid, "choice": "b"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
    other = client(arena)  # another voter may vote on it
    assert other.post("/api/votes", json={"battle": bid, "choice": "b"}).status_code == 200
    assert [v[1] for v in votes(arena.store.path)] == ["a", "b"]


def test_bad_requests_are_clear_4xx(arena) -> None:
    c = client(arena)
    _, events = battle(c, {"prompt": "hi"})
    bid = events[0]["id"]
    cases = [
        ({"battle": "forged-id", "choice": "a"}, 404, "unknown_battle"),
        ({"battle": bid, "choice": "maybe"}, 422, "bad_choice"),
        ({"battle": 5, "choice": "a"}, 400, None),
        ({"choice": "a"}, 400, "missing_required_parameter"),
    ]
    for body, status, code in cases:
        r = c.post("/api/votes", json=body)
        assert r.status_code == status, (body, r.text)
        assert code is None or r.json()["error"]["code"] == code
    assert (
        c.post("/api/votes", content=b"{not json", headers={"Content-Type": "application/json"}).status_code
        == 400
    )
    assert (
        c.post("/api/votes", content=b"battle=x", headers={"Content-Type": "text/plain"}).status_code == 415
    )
    fresh = httpx.post(arena.url + "/api/votes", json={"battle": bid, "choice": "a"})  # no cookie
    assert fresh.status_code == 400 and "cookie" in fresh.json()["error"]["message"]
    for body, status in (
        ({"prompt": "  "}, 400),
        ({"prompt": "x", "category": "a\nb"}, 400),
        ({"prompt": 3}, 400),
    ):
        assert c.post("/api/battles", json=body).status_code == status
    assert c.get("/api/nothing").status_code == 404
    assert votes(arena.store.path) == []


def test_oversized_prompt_is_413_before_generation(tmp_path: Path) -> None:
    fake = FakeContestants()
    running = start(tmp_path, fake, max_prompt_chars=100)
    try:
        r = client(running).post("/api/battles", json={"prompt": "x" * 101})
        assert r.status_code == 413 and r.json()["error"]["code"] == "prompt_too_large"
        assert fake.calls == [] and running.store.battle_counts() == dict.fromkeys(NAMES, 0)
        r = client(running).post("/api/battles", json={"prompt": "x" * 100_000})  # over --max-body too
        assert r.status_code == 413
    finally:
        running.stop()


def test_vote_key_and_rate_limit(tmp_path: Path) -> None:
    running = start(tmp_path, vote_key="sesame", max_votes_per_minute=2)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            c = client(running, **headers)
            assert c.post("/api/battles", json={"prompt": "hi"}).status_code == 401
            r = c.post("/api/votes", json={"battle": "x", "choice": "a"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_vote_key"
        c = client(running, Authorization="Bearer sesame")
        assert c.get("/api/info").json()["vote_key"] is True
        ids = [battle(c, {"prompt": f"q{i}"})[1][0]["id"] for i in range(3)]
        assert [c.post("/api/votes", json={"battle": i, "choice": "a"}).status_code for i in ids[:2]] == [
            200,
            200,
        ]
        limited = c.post("/api/votes", json={"battle": ids[2], "choice": "a"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    finally:
        running.stop()


def test_unvoted_battles_hold_no_slot_and_expire(tmp_path: Path) -> None:
    """Battles nobody votes on: each frees its --max-active slot when its answers end, and
    after --battle-ttl a late vote is 410 and they no longer count toward pairing."""
    import time

    # A TTL the three battles outlive on a loaded machine too (at 0.5 s the first expired before
    # the count under a load of 3-4).
    running = start(tmp_path, max_active=1, battle_ttl=2.0)
    try:
        c = client(running)
        ids = [battle(c, {"prompt": f"q{i}"})[1][0]["id"] for i in range(3)]  # one slot, three battles
        assert sum(running.store.battle_counts().values()) == 6
        time.sleep(2.1)
        r = c.post("/api/votes", json={"battle": ids[0], "choice": "a"})
        assert r.status_code == 410 and r.json()["error"]["code"] == "expired"
        assert "start a new battle" in r.json()["error"]["message"]
        assert votes(running.store.path) == []
        assert running.store.battle_counts() == dict.fromkeys(NAMES, 0)
        assert running.store.battle_tally() == {"voted": 0, "open": 0, "expired": 3, "pending": 0}
    finally:
        running.stop()


def test_a_failing_contestant_is_an_error_event_without_its_name(tmp_path: Path) -> None:
    running = start(tmp_path, FakeContestants(fail="alpha-model"))
    try:
        c = client(running)
        raw, events = battle(c, {"prompt": "hi"})
        assert events[-1]["type"] == "error" and "failed" in events[-1]["message"]
        assert b"alpha-model" not in raw and b"10.0.0.9" not in raw
        r = c.post("/api/votes", json={"battle": events[0]["id"], "choice": "a"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_answered"
    finally:
        running.stop()


def test_a_contestant_behind_a_guard_policy(tmp_path: Path) -> None:
    """Real `Contestants` from the command line's specs: an endpoint bare and the same endpoint
    behind builtin:school. The guarded side's answer passes the policy (the e-mail address is
    redacted); the vote reveals its name with the policy."""
    from arena_fakes import FakeServer

    with FakeServer(lambda body: "write to someone@example.com") as far:
        specs = [f"{far.url}#far", f"{far.url}#far@builtin:school"]
        cfg = ArenaServeConfig(contestants=specs, db=str(tmp_path / "arena.sqlite"), port=0)
        running = start_arena_server(cfg)
        try:
            c = client(running)
            _, events = battle(c, {"prompt": "How do I reach you?"})
            texts = {side: "".join(e["text"] for e in events if e.get("side") == side and e["type"] == "delta")
                     for side in "ab"}  # fmt: skip
            names = c.post("/api/votes", json={"battle": events[0]["id"], "choice": "a"}).json()
            answers = {names["model_a"]: texts["a"], names["model_b"]: texts["b"]}
            assert answers["far"] == "write to someone@example.com"
            guarded = answers["far@builtin:school"]
            assert guarded.startswith("write to ") and "someone@example.com" not in guarded
        finally:
            running.stop()


def test_start_up_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "a", "messages": []}\n')
    code = main(["arena", "serve", "a", "b", "--prompts", str(bad), "--db", str(tmp_path / "x.sqlite")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and f"{bad}:2:" in err
    code = main(["arena", "serve", "only-one", "--db", str(tmp_path / "x.sqlite")])
    assert code == 2 and "at least two contestants" in capsys.readouterr().err


def test_unreachable_endpoint_contestant_stops_the_start(tmp_path: Path, capsys) -> None:
    pytest.importorskip(
        "weightsmith.arena.contestants", reason="arena/contestants.py is not in this build yet"
    )
    code = main(["arena", "serve", "http://127.0.0.1:9/v1#m1", "http://127.0.0.1:9/v1#m2",
                 "--db", str(tmp_path / "x.sqlite"), "--port", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "127.0.0.1:9" in err


# ---- the page in a real browser ------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(page_load_timeout=20)
    yield driver
    driver.quit()


def wait_for(driver, check, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: check(d))


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def answers_in(driver) -> bool:
    return "Both answers are in" in text(driver, "status")


def test_page_votes_by_click_and_keyboard(arena, browser) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.keys import Keys

    browser.get(arena.url + "/")
    browser.find_element("id", "prompt").send_keys("Say hi")
    browser.find_element("id", "category").send_keys("greeting")
    browser.find_element("id", "start").click()
    wait_for(browser, answers_in)
    shown = {text(browser, "answer-a"), text(browser, "answer-b")}
    assert shown == {"Hello from alpha.", HOSTILE}  # the hostile answer is text ...
    assert browser.find_elements("tag name", "img") == []  # ... and no element
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 (onerror never ran)
    assert not any(name in browser.page_source for name in NAMES)
    assert text(browser, "name-a") == text(browser, "name-b") == ""
    browser.find_element("id", "vote-a").click()
    wait_for(browser, lambda d: text(d, "name-a"))
    first = votes(arena.store.path)
    assert len(first) == 1 and first[0][1] == "a"
    b = arena.store.battle(first[0][0])
    assert text(browser, "name-a") == f"({b.model_a})" and text(browser, "name-b") == f"({b.model_b})"
    assert arena.store.battle(first[0][0]).category == "greeting"

    browser.find_element("id", "random").click()
    wait_for(browser, lambda d: answers_in(d) and not text(d, "name-a"))
    browser.find_element("tag name", "body").send_keys("2")
    wait_for(browser, lambda d: text(d, "name-a"))
    assert [v[1] for v in votes(arena.store.path)] == ["a", "b"]
    browser.find_element("tag name", "body").send_keys("t")  # a second vote on the same battle
    wait_for(browser, lambda d: "already voted" in text(d, "status"))
    assert len(votes(arena.store.path)) == 2
    browser.find_element("id", "prompt").send_keys("Another", Keys.CONTROL, Keys.ENTER)
    wait_for(browser, lambda d: answers_in(d) and not text(d, "name-a"))
    browser.find_element("tag name", "body").send_keys("x")
    wait_for(browser, lambda d: text(d, "name-b"))
    assert [v[1] for v in votes(arena.store.path)] == ["a", "b", "both_bad"]


def test_page_needs_the_vote_key_when_set(tmp_path: Path, browser) -> None:
    running = start(tmp_path, vote_key="sesame")
    try:
        browser.get(running.url + "/")
        wait_for(browser, lambda d: d.find_element("id", "key").is_displayed())
        browser.find_element("id", "prompt").send_keys("hi")
        browser.find_element("id", "start").click()
        wait_for(browser, lambda d: "private" in text(d, "status"))
        assert votes(running.store.path) == [] and running.store.battle_counts() == dict.fromkeys(NAMES, 0)
        browser.find_element("id", "key").send_keys("sesame")
        browser.find_element("id", "start").click()
        wait_for(browser, answers_in)
        browser.find_element("id", "vote-tie").click()
        wait_for(browser, lambda d: text(d, "name-a"))
        assert [v[1] for v in votes(running.store.path)] == ["tie"]
    finally:
        running.stop()


def test_the_prompts_reference_shows_after_the_vote_only(tmp_path: Path, browser) -> None:
    """A --prompts line's reference fields (what a reward judge reads) come back in the vote's
    answer, not before, and the page lists them then, as text; a typed prompt has none."""
    prompts = tmp_path / "prompts.jsonl"
    reference = {"answer": "Blue", "contains": ["sky", HOSTILE], "schema": {"type": "object"}}
    prompts.write_text(json.dumps({"prompt": "What colour is the sky?", **reference}) + "\n")
    running = start(tmp_path, prompts=str(prompts), max_votes_per_minute=1000)
    try:
        c = client(running)
        raw, events = battle(c, {"random": True})
        assert b"Blue" not in raw and b'sky"' not in raw
        assert (
            c.post("/api/votes", json={"battle": events[0]["id"], "choice": "a"}).json()["reference"]
            == reference
        )
        _, events = battle(c, {"prompt": "Say hi"})
        assert c.post("/api/votes", json={"battle": events[0]["id"], "choice": "b"}).json()["reference"] == {}

        browser.get(running.url + "/")
        browser.find_element("id", "random").click()
        wait_for(browser, answers_in)
        assert (
            not browser.find_element("id", "reference").is_displayed() and "Blue" not in browser.page_source
        )
        browser.find_element("id", "vote-tie").click()
        wait_for(browser, lambda d: d.find_element("id", "reference").is_displayed())
        shown = text(browser, "reference-fields").splitlines()
        assert shown == ["Expected answer", "Blue", "Should contain", f"sky \u00b7 {HOSTILE}", "JSON schema",
                         '{', ' "type": "object"', '}']  # fmt: skip
        assert browser.find_elements("tag name", "img") == []  # the markup is text
        browser.find_element("id", "prompt").send_keys("Say hi")
        browser.find_element("id", "start").click()
        wait_for(browser, answers_in)
        assert not browser.find_element("id", "reference").is_displayed()  # cleared for the next battle
        browser.find_element("id", "vote-a").click()
        wait_for(browser, lambda d: text(d, "name-a"))
        assert not browser.find_element("id", "reference").is_displayed()  # a typed prompt has none
    finally:
        running.stop()


class SlowContestants(FakeContestants):
    """Answers that never end until told to stop (a page that leaves mid-answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = 0

    def stream(self, name: str, messages: list[dict], params) -> Iterator[str]:
        import time

        try:
            while True:
                yield "word "
                time.sleep(0.01)
        finally:
            self.stopped += 1


def test_a_page_that_leaves_frees_its_slot_and_stops_both_answers(tmp_path: Path) -> None:
    import time

    slow = SlowContestants()
    running = start(tmp_path, slow, max_active=1)
    try:
        c = client(running)
        with c.stream("POST", "/api/battles", json={"prompt": "hi"}) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 5
        while (slow.stopped < 2 or running.app.state.arena.active) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert slow.stopped == 2 and running.app.state.arena.active == 0
        with c.stream("POST", "/api/battles", json={"prompt": "again"}) as r:  # the one slot is free again
            assert r.status_code == 200
    finally:
        running.stop()
