"""The server under abuse, as an outsider on loopback would try it (issue 16).

What is checked, on a tiny random Llama: 200 slow-loris connections do not slow 16 streaming
clients and are closed after --read-timeout, while /health answers within a second; a slow
body gets 408; a client that drops mid-upload is a quiet 499; prompt text over
--max-prompt-chars is refused before tokenising, and tokenising runs off the event loop; a
page cannot drive the server with a text/plain POST or through another host name (DNS
rebinding); the API key can come from a file or the environment; and a hostile chat template
in a served checkpoint costs its own request a 400 within --template-timeout while the
server (a subprocess) keeps serving and stops on SIGTERM.
"""

from __future__ import annotations

import json
import logging
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict
from weightsmith.errors import UsageError

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Once upon a time"}]
READ_TIMEOUT = 1.5
MAX_CHARS = 4000


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path):
    options = {"model": str(tiny_hf_dir), "port": 0, "served_name": "tiny", "read_timeout": READ_TIMEOUT,
               "max_prompt_chars": MAX_CHARS, "allowed_host": ["my.box"]}  # fmt: skip
    running = start_server(config_from_dict(ServeConfig, options), timeout=120)
    yield running
    running.stop()


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def health_seconds(url: str) -> float:
    start = time.perf_counter()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    return time.perf_counter() - start


def requests_with_status(server, status: int) -> float:
    text = httpx.get(server.url + "/metrics").text
    found = re.findall(rf'^weightsmith_requests_total{{[^}}]*status="{status}"}} ([0-9.e+]+)$', text, re.M)
    return sum(float(x) for x in found)


# ---- 7. slow clients ---------------------------------------------------------------------------


def stream_gaps(url: str, tokens: int) -> list[float]:
    """Seconds between the content chunks of one streamed chat answer."""
    body = {"model": "tiny", "messages": HI, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    times = []
    with httpx.stream("POST", url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                times.append(time.perf_counter())
    assert len(times) >= 4  # a random model emits some tokens that are partial characters
    return [b - a for a, b in zip(times, times[1:], strict=False)]


class SlowLoris:
    """`count` connections that send a request's headers one byte at a time, never finishing."""

    def __init__(self, port: int, count: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        self.head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4096
        self.closed_at: dict[int, float] = {}
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        sent = 0
        while not self.stop.is_set() and sent < len(self.head) and len(self.closed_at) < len(self.socks):
            for i, s in enumerate(self.socks):
                if i not in self.closed_at:
                    try:
                        s.send(self.head[sent : sent + 1])
                    except OSError:
                        self.closed_at[i] = time.monotonic() - self.started
            sent += 1
            for key, _ in sel.select(timeout=0.25):  # a byte every quarter second
                if key.data not in self.closed_at:
                    try:
                        gone = key.fileobj.recv(1024) == b""
                    except OSError:
                        gone = True
                    if gone:
                        self.closed_at[key.data] = time.monotonic() - self.started
                        sel.unregister(key.fileobj)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()


def test_slow_loris_connections_neither_slow_streams_nor_stay_open(server) -> None:
    """200 slow connections plus 16 streaming clients: every stream completes, its median time
    between tokens stays near the unloaded one, /health answers within 1 s throughout, and
    the server closes the slow connections after --read-timeout. (The timing ratio is
    printed by benchmarks/serve.py; here it is only bounded generously.)"""
    with ThreadPoolExecutor(16) as pool:
        unloaded = statistics.median(g for gaps in pool.map(stream_gaps, [server.url] * 16, [24] * 16)
                                     for g in gaps)  # fmt: skip
        loris = SlowLoris(port_of(server), 200)
        try:
            health: list[float] = []
            streams = [pool.submit(stream_gaps, server.url, 24) for _ in range(16)]
            while not all(f.done() for f in streams):
                health.append(health_seconds(server.url))
                time.sleep(0.1)
            loaded = statistics.median(g for f in streams for g in f.result())
            wait_for(lambda: len(loris.closed_at) == 200, timeout=READ_TIMEOUT + 10)
            health.append(health_seconds(server.url))
        finally:
            loris.close()
    print(f"time between tokens: unloaded {unloaded * 1e3:.1f} ms, with 200 slow connections "
          f"{loaded * 1e3:.1f} ms ({loaded / unloaded:.2f}x); /health at most {max(health) * 1e3:.0f} ms")  # fmt: skip
    assert max(health) < 1.0, health
    assert max(loris.closed_at.values()) < READ_TIMEOUT + 8
    assert loaded < 4 * unloaded + 0.05, (loaded, unloaded)


def test_a_slow_body_gets_408(server) -> None:
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=READ_TIMEOUT + 10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        reply = b""
        while chunk := s.recv(4096):  # the server closes the connection after its 408
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_uvicorn_gets_the_connection_limits() -> None:
    from weightsmith.commands.serve import uvicorn_server

    cfg = config_from_dict(ServeConfig, {"model": "tiny", "max_connections": 7, "keep_alive_timeout": 2.5,
                                         "drain_timeout": 3})  # fmt: skip
    for fast in (False, True):
        config = uvicorn_server(None, cfg.limits, fast=fast).config
        assert config.limit_concurrency == 7 and config.timeout_keep_alive == 2.5
        assert config.timeout_graceful_shutdown == 3
        assert config.loop == ("uvloop" if fast else "asyncio")
    assert uvicorn_server(None, cfg.limits, fast=False).config.h11_max_incomplete_event_size is not None


# ---- 8. a client that drops mid-upload -----------------------------------------------------------


def test_a_client_that_drops_mid_upload_is_a_quiet_499(server, caplog) -> None:
    before_500, before_499 = requests_with_status(server, 500), requests_with_status(server, 499)
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", port_of(server))) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n" + b'{"model": "tiny", ' * 20
            )
            time.sleep(0.2)
        wait_for(lambda: requests_with_status(server, 499) == before_499 + 1)
    assert requests_with_status(server, 500) == before_500
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "disconnected while sending its body" in caplog.text


# ---- 6. big prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            CHAT,
            {"model": "tiny", "messages": [{"role": "user", "content": "x" * (MAX_CHARS + 1)}]},
            "messages",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": ["x" * 3000, "y" * 3000]}, "prompt"),
        ("/tokenize", {"prompt": "x" * (MAX_CHARS + 1)}, "prompt"),
    ],
    ids=["chat", "prompt-list", "tokenize"],
)
def test_prompt_text_over_the_limit_is_refused_before_tokenising(server, path, body, param) -> None:
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (
        err["param"] == param and err["code"] == "prompt_too_long" and "--max-prompt-chars" in err["message"]
    )


def test_tokenising_runs_off_the_event_loop(server) -> None:
    tokenizer = server.state.loaded.llm.tokenizer
    real = tokenizer.encode

    def slow(*a, **k):
        time.sleep(1.5)  # as a 4 MB prompt would take
        return real(*a, **k)

    tokenizer.encode = slow
    try:
        with ThreadPoolExecutor(1) as pool:
            body = {"model": "tiny", "prompt": "Hola", "max_tokens": 2}
            done = pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=30)
            time.sleep(0.3)
            assert health_seconds(server.url) < 0.5
            assert done.result().status_code == 200
    finally:
        del tokenizer.encode


# ---- 9. web pages driving the local server ----------------------------------------------------


def test_a_text_plain_post_gets_415(server) -> None:
    body = json.dumps({"model": "tiny", "prompt": "Hola", "max_tokens": 2})
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "host, status",
    [("evil.example", 421), ("evil.example:8000", 421), ("localhost", 200), ("127.0.0.1", 200),
     ("my.box:80", 200)],
)  # fmt: skip
def test_the_host_header_must_name_this_server(server, host, status) -> None:
    r = httpx.get(server.url + "/v1/models", headers={"Host": host})
    assert r.status_code == status, r.text
    if status == 421:
        assert r.json()["error"]["code"] == "host_not_allowed" and "--allowed-host" in r.text


def test_allowed_hosts_follow_the_bind_address() -> None:
    from weightsmith.serve.gate import allowed_hosts, host_name

    assert allowed_hosts("0.0.0.0", []) is None and allowed_hosts("127.0.0.1", ["*"]) is None
    assert "10.0.0.5" in allowed_hosts("10.0.0.5", []) and "localhost" in allowed_hosts("10.0.0.5", [])
    assert allowed_hosts("0.0.0.0", ["Box"]) >= {"box", "localhost"}
    assert [host_name(h) for h in ("[::1]:80", "::1", "A.b:1", "a.b")] == ["::1", "::1", "a.b", "a.b"]


# ---- 14. the API key off the command line ------------------------------------------------------


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    from weightsmith.commands.serve import resolve_api_key

    monkeypatch.setenv("WEIGHTSMITH_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig(model="m")) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert resolve_api_key(ServeConfig(model="m", api_key_file=str(tmp_path / "key"))) == "from-file"
    with pytest.raises(UsageError, match="--api-key-file"):
        resolve_api_key(ServeConfig(model="m", api_key="k", api_key_file=str(tmp_path / "key")))
    with pytest.raises(UsageError, match="--api-key-file .*missing"):
        resolve_api_key(ServeConfig(model="m", api_key_file=str(tmp_path / "missing")))


def test_a_key_on_the_command_line_gets_one_warning(capsys, monkeypatch, tmp_path) -> None:
    from weightsmith.cli.main import main

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    assert main(["serve", "no-such-model-xyz", "--api-key", "k"]) != 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "process list" in line]
    assert len(warnings) == 1 and "--api-key-file" in warnings[0]


# ---- 4. a hostile chat template in a served checkpoint ------------------------------------------

HOSTILE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_a_hostile_chat_template_costs_only_its_own_request(tiny_hf_dir, tmp_path) -> None:
    model = tmp_path / "hostile"
    shutil.copytree(tiny_hf_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HOSTILE}))
    argv = [sys.executable, "-m", "weightsmith.cli.main", "serve", str(model), "--port", "0",
            "--served-name", "tiny", "--template-timeout", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"listening on (http://\S+)", proc.stderr.readline()).group(1)
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, timeout=90)
        with ThreadPoolExecutor(1) as pool:
            start = time.monotonic()
            body = {"model": "tiny", "messages": HI, "max_tokens": 2}
            hostile = pool.submit(httpx.post, url + CHAT, json=body, timeout=30)
            time.sleep(0.2)
            assert health_seconds(url) < 1.0
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hola", "max_tokens": 2})
            assert r.status_code == 200
            answer = hostile.result()
            assert time.monotonic() - start < 6.0
        assert answer.status_code == 400, answer.text
        assert "time limit" in answer.json()["error"]["message"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    finally:
        proc.kill()
        proc.wait()
