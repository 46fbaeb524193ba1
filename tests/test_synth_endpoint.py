"""`weightsmith synth` against a fake OpenAI-compatible endpoint: requests carry the sampling
settings and per-request seeds; garbage, malformed replies, 5xx and 429 (Retry-After) are
retried or counted, never fatal to what was generated; a judge that never gives a parseable
score is counted; a step where every request fails stops with one line and a rerun continues;
decontamination against the built-in suites; replaced prompt templates."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_cli

from weightsmith.cli.main import main

Behave = Callable[[dict], tuple[int, bytes, dict]]


def ok(text: str) -> tuple[int, bytes, dict]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    return (
        200,
        json.dumps({"choices": [choice], "usage": {"completion_tokens": len(text.split())}}).encode(),
        {},
    )


class _Handler(BaseHTTPRequestHandler):
    server: FakeEndpoint

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, json.dumps({"data": [{"id": self.server.model}]}).encode(), {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
        self._send(*self.server.behave(body))


class FakeEndpoint(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behave: Behave, model: str = "fake") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behave, self.model = behave, model
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def spec(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1#fake"


@pytest.fixture
def serve():
    servers: list[FakeEndpoint] = []

    def start(behave: Behave, model: str = "fake") -> FakeEndpoint:
        servers.append(FakeEndpoint(behave, model))
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


PROMPTS = [  # different enough that none is a near-duplicate of another; "#i" tells the fake which it is
    "#0 Why do owls hunt at night?", "#1 Write a haiku about autumn leaves falling.",
    "#2 How many legs does a spider have?", "#3 Explain compound interest to a teenager.",
    "#4 Name the capital city of Portugal.", "#5 Suggest a vegetarian dinner for four people.",
    "#6 What causes thunder during storms?", "#7 Translate good morning into Spanish.",
    "#8 List two benefits of regular exercise.", "#9 Describe the smell of fresh bread.",
]  # fmt: skip


def _prompts(tmp_path: Path, prompts: list[str] = PROMPTS) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _args(spec: str, out: Path, *extra: str) -> list[str]:
    return ["--model", spec, "--out", str(out), "--decontaminate", "none", "--json", "--batch-size", "4",
            "--concurrency", "2", "--valid-fraction", "0", *extra]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _question(body: dict) -> str:
    return body["messages"][-1]["content"]


def test_garbage_errors_and_rate_limits_are_retried_or_counted(serve, tmp_path) -> None:
    tries: dict[str, int] = {}
    lock = threading.Lock()

    def behave(body: dict) -> tuple[int, bytes, dict]:
        q = _question(body)
        with lock:
            tries[q] = tries.get(q, 0) + 1
            n = tries[q]
        if "#1 " in q:
            return 200, b"<html>proxy error</html>", {}  # not JSON at all
        if "#2 " in q:
            return 200, json.dumps({"choices": []}).encode(), {}  # JSON, not OpenAI's shape
        if "#3 " in q and n == 1:
            return 503, b'{"error": "warming up"}', {"Retry-After": "0"}
        if "#4 " in q and n == 1:
            return 429, b'{"error": "slow down"}', {"Retry-After": "0"}
        return ok(f"A fine answer to {q.split()[0]}.")

    server = serve(behave)
    out = tmp_path / "out"
    assert (
        main(
            [
                "synth",
                "answer",
                "--prompts",
                str(_prompts(tmp_path)),
                *_args(server.spec, out, "--temperature", "0.5"),
            ]
        )
        == 0
    )
    kept = _rows(out / "train.jsonl")
    assert [r["messages"][0]["content"] for r in kept] == [
        p for i, p in enumerate(PROMPTS) if i not in (1, 2)
    ]
    dropped = _rows(out / "work" / "dropped.jsonl")
    assert sorted((d["reason"], d["instruction"]) for d in dropped) == [
        ("answer_request_failed", PROMPTS[1]), ("answer_request_failed", PROMPTS[2])]  # fmt: skip
    assert "malformed reply" in dropped[0]["detail"] and "malformed reply" in dropped[1]["detail"]
    assert tries[PROMPTS[3]] == 2 and tries[PROMPTS[4]] == 2  # 503 and 429 were tried again
    first = server.requests[0]
    assert first["model"] == "fake" and first["temperature"] == 0.5 and first["max_tokens"] == 256
    assert len({r["seed"] for r in server.requests if r["messages"][-1]["content"] != PROMPTS[3]}) > 5
    lineage = json.loads((out / "lineage.json").read_text())["details"]
    assert lineage["model"]["kind"] == "endpoint" and lineage["model"]["model"] == "fake"
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["stages"][3]["dropped"] == {"answer_request_failed": 2} and funnel["kept"] == 8


def test_a_judge_that_never_gives_a_score_is_counted_and_nothing_is_lost(serve, tmp_path) -> None:
    def behave(body: dict) -> tuple[int, bytes, dict]:
        if "Score: N" in _question(body):
            return ok("What a lovely answer! I would rate it highly.")
        return ok("Owls hunt at night and have excellent hearing.")

    server = serve(behave)
    out = tmp_path / "out"
    argv = [
        "synth",
        "answer",
        "--prompts",
        str(_prompts(tmp_path)),
        *_args(server.spec, out, "--judge", server.spec),
    ]
    assert main(argv) == 0
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["kept"] == 0 and funnel["stages"][5]["dropped"] == {"judge_unparseable": 10}
    dropped = _rows(out / "work" / "dropped.jsonl")
    assert {d["answer"] for d in dropped} == {"Owls hunt at night and have excellent hearing."}
    assert all(d["detail"].startswith("What a lovely") for d in dropped)


def test_judge_scores_keep_what_reaches_the_threshold(serve, tmp_path) -> None:
    def behave(body: dict) -> tuple[int, bytes, dict]:
        q = _question(body)
        if "Score: N" in q:
            return ok("Score: 5" if "#7 " in q else "Score: 2")
        return ok(f"An answer to: {q}")

    server = serve(behave)
    out = tmp_path / "out"
    argv = [
        "synth",
        "answer",
        "--prompts",
        str(_prompts(tmp_path)),
        *_args(server.spec, out, "--judge", server.spec),
    ]
    assert main(argv) == 0
    (row,) = _rows(out / "train.jsonl")
    assert row["messages"][0]["content"] == PROMPTS[7] and row["meta"]["judge_score"] == 5
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["stages"][5]["dropped"] == {"judge_below_threshold": 9}


def test_when_every_request_of_a_step_fails_the_run_stops_and_a_rerun_continues(
    serve, tmp_path, capsys
) -> None:
    healthy = {"on": True}

    def behave(body: dict) -> tuple[int, bytes, dict]:
        q = _question(body)
        if not healthy["on"] and int(q[1]) >= 4:  # step 2 onwards
            return 400, b'{"error": "model unloaded"}', {}
        return ok(f"An answer to: {q}")

    server = serve(behave)
    prompts = _prompts(tmp_path)
    reference = tmp_path / "reference"
    assert main(["synth", "answer", "--prompts", str(prompts), *_args(server.spec, reference)]) == 0
    healthy["on"] = False
    out = tmp_path / "out"
    code, _, err = run_cli(["synth", "answer", "--prompts", prompts, *_args(server.spec, out)], capsys)
    assert code == 1 and "every answer request of step 2 failed" in err and "HTTP 400" in err
    assert len(err.strip().splitlines()) == 1
    assert len(_rows(out / "work" / "kept.jsonl")) == 4  # step 1 (prompts 0-3) is kept
    healthy["on"] = True
    assert main(["synth", "answer", "--prompts", str(prompts), *_args(server.spec, out)]) == 0
    assert (out / "train.jsonl").read_bytes() == (reference / "train.jsonl").read_bytes()


def test_prompts_copying_an_eval_document_are_dropped_as_contaminated(serve, tmp_path) -> None:
    passage = "Tansy Reed sells honey from her own hives, and she always runs out before noon."
    server = serve(lambda body: ok("Honey is made by bees from the nectar of flowers."))
    prompts = _prompts(
        tmp_path, [f"Summarise: {passage}", "What do bees make?", "Tell me about honey and bees."]
    )
    out = tmp_path / "out"
    args = [a for a in _args(server.spec, out) if a not in ("--decontaminate", "none")]
    assert main(["synth", "answer", "--prompts", str(prompts), *args]) == 0
    (dropped,) = _rows(out / "work" / "dropped.jsonl")
    assert dropped["reason"] == "contaminated" and dropped["detail"][0] == "reading_mc"
    assert len(_rows(out / "train.jsonl")) == 2
    lineage = json.loads((out / "lineage.json").read_text())["details"]
    assert lineage["decontamination"]["ngram"] == 13 and "reading_mc" in lineage["decontamination"]["tasks"]


def test_replaced_templates_are_used_and_bad_ones_stop_before_any_request(serve, tmp_path, capsys) -> None:
    server = serve(lambda body: ok("Owls are birds of prey."))
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "answer.txt").write_text("Answer like a pirate: {{ instruction }}\n")
    prompts = _prompts(tmp_path, PROMPTS[:2])
    out = tmp_path / "out"
    assert (
        main(
            [
                "synth",
                "answer",
                "--prompts",
                str(prompts),
                *_args(server.spec, out, "--templates", str(templates)),
            ]
        )
        == 0
    )
    assert {_question(r) for r in server.requests} == {f"Answer like a pirate: {p}" for p in PROMPTS[:2]}
    lineage = json.loads((out / "lineage.json").read_text())["details"]
    assert lineage["prompts"]["answer"]["file"] == str(templates / "answer.txt")
    assert (
        _rows(out / "train.jsonl")[0]["messages"][0]["content"] == PROMPTS[0]
    )  # trained on the prompt itself

    server.requests.clear()
    (templates / "answer.txt").write_text("Answer {{ instructoin }}\n")
    code, _, err = run_cli(["synth", "answer", "--prompts", prompts,
                            *_args(server.spec, tmp_path / "o2", "--templates", str(templates))], capsys)  # fmt: skip
    assert code == 2 and "answer.txt" in err and "instructoin" in err and server.requests == []
    (templates / "answr.txt").write_text("x")
    code, _, err = run_cli(["synth", "answer", "--prompts", prompts,
                            *_args(server.spec, tmp_path / "o3", "--templates", str(templates))], capsys)  # fmt: skip
    assert code == 2 and "answr.txt is no prompt name" in err


def test_an_endpoint_that_does_not_serve_the_model_is_refused_before_work(serve, tmp_path, capsys) -> None:
    server = serve(lambda body: ok("x"), model="other")
    code, _, err = run_cli(
        ["synth", "answer", "--prompts", _prompts(tmp_path), *_args(server.spec, tmp_path / "o")], capsys
    )
    assert code == 2 and "does not serve a model named 'fake'" in err and server.requests == []


def test_answers_not_in_the_answer_pattern_are_dropped_and_counted(serve, tmp_path, capsys) -> None:
    def behave(body: dict) -> tuple[int, bytes, dict]:
        q = _question(body)
        if int(q[1]) % 3 == 0:  # prompts 0, 3, 6, 9 answer in the format
            return ok(f"In short: an answer to {q[3:]}")
        return ok(
            f"In short: an answer to {q[3:]}\nwith a second line"
            if int(q[1]) % 3 == 1
            else "Well, it depends."
        )

    server = serve(behave)
    out = tmp_path / "out"
    pattern = ["--answer-pattern", r"^In short: [^\n]+$"]
    assert (
        main(["synth", "answer", "--prompts", str(_prompts(tmp_path)), *_args(server.spec, out, *pattern)])
        == 0
    )
    kept = _rows(out / "train.jsonl")
    assert [r["messages"][0]["content"] for r in kept] == [PROMPTS[i] for i in (0, 3, 6, 9)]
    assert all(r["messages"][1]["content"].startswith("In short: ") for r in kept)
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["kept"] == 4 and funnel["stages"][3]["dropped"] == {"answer_format": 6}
    dropped = _rows(out / "work" / "dropped.jsonl")
    assert {d["answer"] for d in dropped if d["reason"] == "answer_format"} >= {"Well, it depends."}

    code, _, err = run_cli(["synth", "answer", "--prompts", _prompts(tmp_path), "--answer-pattern", "In (short",
                            "--model", server.spec, "--out", tmp_path / "bad"], capsys)  # fmt: skip
    assert code == 2 and "--answer-pattern 'In (short': not a regular expression" in err
    assert not (tmp_path / "bad").exists()
