"""`weightsmith ui` beyond reading files: the arena leaderboard, chat (only with --allow-run),
logging in with the API key, and CSRF.

The chat model is a real tiny Llama checkpoint whose weights make it say one fixed reply: its
attention and MLP outputs are zero, so the last position's hidden state is its token's
embedding, and each token of a chain (the prompt's last token, then the reply's tokens, then
end-of-turn) has a one-hot embedding that the LM head maps to the next one. The reply is
HTML (`REPLY`), so the tests can check that a page shows a model's HTML as text. The
leaderboard must show what `weightsmith arena ratings` prints for the same DB, and read the DB
without writing to it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import weakref
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer_dir, headless_chromium, run_cli

#: The tokens of the model's reply (added to the tokenizer as single tokens), in order.
REPLY_TOKENS = ['<b id="injected">', "bold", "</b>", '<img src=x onerror="document.title=1">',
                "<script>document.title=2</script>"]  # fmt: skip
REPLY = "".join(REPLY_TOKENS)
KEY = "correct horse battery staple"
HOST = "http://127.0.0.1:8020"


def build_reply_model(path: Path) -> Path:
    """A tiny Llama checkpoint (transformers' own save) that answers any chat with REPLY."""
    import transformers
    from tokenizers import AddedToken, Tokenizer

    from weightsmith.tokenizer import Tokenizer as Ours

    build_tiny_tokenizer_dir(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in REPLY_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    prompt = Ours.from_dir(path).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    chain = [prompt[-1], *(tok.token_to_id(t) for t in REPLY_TOKENS), tok.token_to_id("<|im_end|>")]
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=chain[-1], bos_token_id=None, pad_token_id=0)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                p.zero_()
        for dim, (here, after) in enumerate(zip(chain, chain[1:], strict=False)):
            model.model.embed_tokens.weight[here, dim] = 1.0
            model.lm_head.weight[after, dim] = (
                10.0  # logit 80 against 0: the next token, whatever the sampling
            )
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace with the reply model, a fork of it, an adapter whose base lies outside, and an arena DB."""
    from weightsmith.arena.store import ArenaStore
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import LoraConfig, apply_lora, save_adapter

    ws = tmp_path_factory.mktemp("ui-ws")
    model = build_reply_model(ws / "models/reply")
    net = load_checkpoint(model, device=torch.device("cpu"), dtype=torch.float32).model
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    apply_lora(net, lora)
    fork = save_adapter(net, ws / "forks/a", lora)
    (fork / "lineage.json").write_text(json.dumps({"inputs": [
        {"role": "model", "spec": "/elsewhere/reply", "relpath": "../../models/reply"}]}))  # fmt: skip
    stray = ws / "forks/stray"
    stray.mkdir()
    for f in fork.iterdir():
        if f.name != "lineage.json":
            (stray / f.name).write_bytes(f.read_bytes())
    config = json.loads((stray / "adapter_config.json").read_text())
    (stray / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(ws.parent)})
    )
    (ws / "data.jsonl").write_text("{}\n")
    rows = [{"id": f"b{i}", "model_a": a, "model_b": b, "winner": w, "judge": f"person{i % 4}"}
            for i, (a, b, w) in enumerate([("alpha", "beta", "model_a"), ("beta", "gamma<i>", "model_b"),
                                           ("alpha", "gamma<i>", "tie"), ("beta", "alpha", "model_b")] * 6)]  # fmt: skip
    (ws / "arena").mkdir()
    (ws / "arena/log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ArenaStore(ws / "arena/votes.sqlite").close()
    from weightsmith.cli.main import main

    assert main(["arena", "import", "--db", str(ws / "arena/votes.sqlite"), "--battles",
                 str(ws / "arena/log.jsonl")]) == 0  # fmt: skip
    return ws


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An empty store, one per module (the CPU kernels it builds on first use are kept there)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSMITH_HOME", str(tmp_path_factory.mktemp("home")))
        yield


def client(ws: Path, **options):
    from fastapi.testclient import TestClient

    from weightsmith.ui.app import create_ui_app
    from weightsmith.ui.chat import ChatOptions

    key = options.pop("api_key", None)
    chat = ChatOptions(**{"device": "cpu", "max_tokens": 16, **options})
    return TestClient(create_ui_app(ws, api_key=key, chat=chat), base_url=HOST)


def events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def ask(c, model: str, content: str = "hi", **extra) -> tuple[int, list[dict]]:
    r = c.post(
        "/api/chat", json={"model": model, "messages": [{"role": "user", "content": content}], **extra}
    )
    return r.status_code, (events(r) if r.status_code == 200 else [r.json()])


# ----- --allow-run ----------------------------------------------------------------------------------


def test_chat_is_off_without_allow_run(ws, home):
    c = client(ws)
    page = c.get("/chat")
    assert page.status_code == 200 and "--allow-run" in page.text and "<script" not in page.text
    assert "models/reply" in page.text  # what it could chat with is still listed
    status, (body,) = ask(c, "path:models/reply")
    message = body["error"]["message"]
    assert status == 403 and "--allow-run" in message and "\n" not in message
    assert c.app.state.ui.slot.llm is None  # nothing was loaded


def test_chat_streams_the_models_reply_and_keeps_one_model(ws, home):
    c = client(ws, allow_run=True)
    status, got = ask(c, "path:models/reply", max_tokens=16)
    assert status == 200
    assert got[0] == {"status": "loading", "model": "models/reply"} and got[1]["status"] == "loaded"
    assert "".join(e.get("text", "") for e in got) == REPLY
    assert (
        got[-1]["done"] and got[-1]["finish_reason"] == "stop" and got[-1]["tokens"] == len(REPLY_TOKENS) + 1
    )
    slot = c.app.state.ui.slot
    first = weakref.ref(slot.llm)
    status, again = ask(c, "path:models/reply", "another turn")
    assert status == 200 and "loading" not in [e.get("status") for e in again]  # loaded once
    # a fork: its base comes from its lineage record, inside the workspace; the old model is freed
    status, forked = ask(c, "path:forks/a")
    assert status == 200 and forked[0]["status"] == "loading"
    assert "".join(e.get("text", "") for e in forked) == REPLY  # a fresh adapter (B = 0) changes nothing
    gc.collect()
    assert first() is None and slot.key == "path:forks/a"
    # one reply at a time
    assert slot.busy.acquire(blocking=False)
    try:
        status, (body,) = ask(c, "path:models/reply")
        assert status == 429 and "wait" in body["error"]["message"]
    finally:
        slot.busy.release()


def test_a_page_that_leaves_mid_reply_stops_the_generation(ws, home, monkeypatch):
    import threading
    import time

    import httpx

    from weightsmith.commands.ui import UiConfig, start_ui_server
    from weightsmith.engine import Engine
    from weightsmith.ui.chat import find_target

    tokens, original = [], Engine.stream

    def slow(self, prompt, params=None):  # two seconds a token: the whole reply would take 12 s
        for delta in original(self, prompt, params):
            tokens.append(delta.text)
            yield delta
            time.sleep(2.0)

    monkeypatch.setattr(Engine, "stream", slow)
    running = start_ui_server(
        UiConfig(workspace=str(ws), port=0, allow_run=True, device="cpu", max_tokens=16)
    )
    try:
        state = running.server.config.app.state.ui
        slot = state.slot
        body = {"model": "path:models/reply", "messages": [{"role": "user", "content": "hi"}]}
        slot.load(find_target(state.workspace, body["model"], {}))  # loaded before: only the reply is timed
        with httpx.Client(timeout=300) as c, c.stream("POST", running.url + "/api/chat", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"text"' in line:
                    break  # the page leaves after the first token
        left = time.monotonic()
        freed = threading.Event()
        while time.monotonic() - left < 60 and not freed.is_set():
            if slot.busy.acquire(blocking=False):
                slot.busy.release()
                freed.set()
            time.sleep(0.05)
        assert freed.is_set() and len(tokens) < len(REPLY_TOKENS)  # stopped, not finished
    finally:
        running.stop()


def test_bad_chat_options_are_one_line_before_it_listens(ws, home, capsys):
    for flags, words in [(["--device", "nonsense"], "--device"), (["--dtype", "fp8"], "--dtype"),
                         (["--max-tokens", "0"], "--max-tokens")]:  # fmt: skip
        code, _, err = run_cli(["ui", "--workspace", ws, "--allow-run", "--port", "0", *flags], capsys)
        assert code == 2 and words in err and err.strip().count("\n") == 0, (flags, err)


def test_chat_refuses_what_is_not_a_model_of_this_workspace(ws, home):
    c = client(ws, allow_run=True, max_prompt_chars=100)
    page = c.get("/chat")
    assert "forks/stray" in page.text and "neither in the store nor a model inside the workspace" in page.text
    for model, status, words in [
        ("path:../x", 403, "outside the workspace"),
        ("path:models/reply/../../..", 403, "outside the workspace"),
        ("path:/etc", 403, "inside the workspace"),
        ("path:data.jsonl", 404, "not a model"),
        ("path:nothing", 404, "not found"),
        ("store:smollm2-135m-instruct", 404, "no such model"),  # not pulled into this store: never downloaded
        ("path:forks/stray", 422, "neither in the store nor a model inside the workspace"),
    ]:
        got, (body,) = ask(c, model)
        assert got == status and words in body["error"]["message"], (model, got, body)
    got, (body,) = ask(c, "path:models/reply", "x" * 101)
    assert got == 400 and "--max-prompt-chars" in body["error"]["message"]
    r = c.post(
        "/api/chat", json={"model": "path:models/reply", "messages": [{"role": "tool", "content": "x"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    assert c.app.state.ui.slot.llm is None


# ----- the arena leaderboard ---------------------------------------------------------------------


def _table_rows(html: str) -> list[list[str]]:
    """The cells of the first ratings table on a page (rank, model, rating, interval, battles, win rate)."""
    table = re.search(r"<table><tr><th>rank</th>.*?</table>", html, re.S).group(0)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]


def test_leaderboard_shows_what_arena_ratings_prints_and_leaves_the_db_alone(ws, home, capsys):
    db = ws / "arena/votes.sqlite"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    c = client(ws)
    index = c.get("/arena")
    assert index.status_code == 200 and 'href="/arena/board?path=arena/votes.sqlite"' in index.text
    code, out, _ = run_cli(["arena", "ratings", "--db", db, "--json"], capsys)
    assert code == 0
    expected = [[str(i + 1), r["name"].replace("<", "&lt;").replace(">", "&gt;"), f"{r['rating']:.0f}",
                 f"[{r['lower']:.0f}, {r['upper']:.0f}]", str(r["battles"]), f"{100 * r['win_rate']:.1f}%"]
                for i, r in enumerate(json.loads(out)["overall"]["ratings"])]  # fmt: skip
    assert _table_rows(index.text) == expected
    board = c.get("/arena/board?path=arena/votes.sqlite")
    assert board.status_code == 200 and _table_rows(board.text) == expected and "<svg" in board.text
    assert "gamma&lt;i&gt;" in board.text and "gamma<i>" not in board.text
    humans = c.get("/arena/board?path=arena/votes.sqlite&voters=human")  # imported votes are not "human"
    assert humans.status_code == 200 and "No ratings yet" in humans.text and "no human votes" in humans.text
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    for path, status in [("/arena/board?path=../votes.sqlite", 403), ("/arena/board?path=data.jsonl", 404),
                         ("/arena/board?path=arena/votes.sqlite&voters=robots", 400)]:  # fmt: skip
        assert c.get(path).status_code == status, path


def test_no_arena_is_a_page_that_says_so(tmp_path, home):
    r = client(tmp_path).get("/arena")
    assert r.status_code == 200 and "No arena in this workspace" in r.text and "arena serve" in r.text


# ----- logging in, CSRF --------------------------------------------------------------------------


def _cookie(response) -> str:
    return response.headers["set-cookie"]


def test_a_keyed_ui_takes_the_key_as_bearer_or_login_cookie(ws, home):
    c = client(ws, api_key=KEY, allow_run=True)
    page = {"Accept": "text/html"}
    r = c.get("/runs", headers=page, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fruns"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEY}):
        r = c.get("/runs", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "/login" in r.text
    assert c.get("/runs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert c.get("/login").status_code == 200 and c.get("/health").status_code == 200
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": HOST}
    r = c.post("/login", content="key=nope&next=%2Fruns", headers=form, follow_redirects=False)
    assert r.status_code == 401 and "not this UI" in r.text and "set-cookie" not in r.headers
    r = c.post(
        "/login", content=f"key={KEY.replace(' ', '+')}&next=%2Fruns", headers=form, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/runs"
    cookie = _cookie(r)
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and KEY not in cookie
    assert c.get("/runs").status_code == 200  # the client keeps the cookie
    r = c.post("/login", content=f"key={KEY.replace(' ', '+')}&next=//evil.example/x", headers=form,
               follow_redirects=False)  # fmt: skip
    assert r.headers["location"] == "/"  # never to another site
    assert c.post("/logout", headers=form, follow_redirects=False).status_code == 303
    assert c.get("/runs", headers=page, follow_redirects=False).status_code == 303  # that session is over
    for _ in range(10):
        c.post("/login", content="key=guess", headers=form)
    assert c.post("/login", content=f"key={KEY.replace(' ', '+')}", headers=form).status_code == 429


def test_posts_from_other_origins_are_refused(ws, home):
    c = client(ws, api_key=KEY, allow_run=True)
    bearer = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "path:models/reply", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://127.0.0.1:9999"}):  # fmt: skip
        r = c.post("/api/chat", json=body, headers={**bearer, **headers})
        assert r.status_code == 403 and ("another site" in r.text or "not this server" in r.text), headers
    r = c.post("/login", content=f"key={KEY}", headers={"Content-Type": "application/x-www-form-urlencoded",
                                                        "Origin": "http://evil.example"})  # fmt: skip
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = c.post("/api/chat", content=json.dumps(body), headers={**bearer, "Content-Type": "text/plain"})
    assert r.status_code == 415  # a cross-site form cannot send JSON
    r = c.post(
        "/api/chat",
        content="model=x",
        headers={**bearer, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415  # forms only where the login page posts
    assert c.post("/api/chat", json=body).status_code == 401
    assert c.app.state.ui.slot.llm is None


# ----- in a real browser -------------------------------------------------------------------------


@pytest.fixture
def keyed_ui(ws, home):
    from weightsmith.commands.ui import UiConfig, start_ui_server

    running = start_ui_server(UiConfig(workspace=str(ws), port=0, api_key=KEY, allow_run=True, device="cpu",
                                       max_tokens=16))  # fmt: skip
    yield running
    running.stop()


def test_login_chat_and_arena_in_a_real_browser(keyed_ui, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = headless_chromium()
    url = keyed_ui.url.replace("0.0.0.0", "127.0.0.1")

    def clean(shot: str) -> None:
        driver.save_screenshot(str(tmp_path / f"{shot}.png"))
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], (driver.current_url, severe)

    try:
        driver.get(url + "/chat")  # not logged in: the login page, which comes back here
        assert "/login" in driver.current_url
        clean("login")
        driver.find_element("id", "key").send_keys(KEY + Keys.ENTER)
        WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/chat"))
        Select(driver.find_element("id", "model")).select_by_value("path:models/reply")
        driver.find_element("id", "prompt").send_keys("Say something in HTML" + Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: "Done" in d.find_element("id", "chat-status").text)
        reply = driver.find_elements("css selector", ".msg.assistant .text")
        assert [r.text for r in reply] == [REPLY]  # the markup shows as text
        assert driver.find_elements("id", "injected") == [] and driver.title == "chat"  # nothing in it ran
        clean("chat")
        driver.get(url + "/arena")
        assert "alpha" in driver.find_element("id", "arenas").text
        clean("arena")
        driver.find_element("link text", "the whole leaderboard").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_elements("id", "leaderboard"))
        assert "gamma<i>" in driver.find_element("id", "leaderboard").text
        clean("leaderboard")
        driver.get(url + "/")
        driver.find_element("css selector", "form[action='/logout'] button").click()
        WebDriverWait(driver, 10).until(lambda d: "/login" in d.current_url)  # the form post's redirect
        clean("logged-out")
    finally:
        driver.quit()
