"""LLM-as-judge scoring: the `judge:` block, rubric rendering, score parsing, agreement statistics
(against sklearn and scipy), and the two backends: a tiny random model in-process, and the
project's own server on loopback (plus an httpx MockTransport for broken endpoints)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest

import weightsmith
from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict
from weightsmith.endpoints import RetryPolicy
from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.eval.judge import (
    EndpointJudge,
    JudgeConfig,
    LocalJudge,
    aggregate_judge,
    agreement,
    human_scores,
    make_judge,
    score_with_judge,
)
from weightsmith.grants import Grants

SRC = "tasks/qa.yaml"
RUBRIC = "Q: {{ question }}\nA: {{ answer }}\nRef: {{ reference }}\nTopic: {{ doc.topic }}\nGive 'Score: N'."
ITEM = {
    "doc": {"topic": "geo", "q": "Capital of France?"},
    "question": "Capital of France?",
    "answer": "Paris",
    "reference": "Paris",
}


DROP = object()


def cfg(**over) -> JudgeConfig:
    return JudgeConfig.from_dict({"model": "smollm2-135m-instruct", "rubric": RUBRIC, **over}, source=SRC)


class FakeBackend:
    """Returns fixed replies and records every batch it was asked."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.calls: list[list[list[dict]]] = []

    def complete(self, prompts: list[list[dict]]) -> list[str]:
        self.calls.append(prompts)
        return self.replies[: len(prompts)]


# ---- config --------------------------------------------------------------------------------


def test_defaults() -> None:
    c = cfg()
    assert c.scale == (1, 5) and c.pass_threshold == 5 and c.max_tokens == 64
    assert c.endpoint_model == "default" and c.api_key_env is None and c.system is None
    assert not c.is_endpoint and cfg(model="https://x.example/v1").is_endpoint
    assert (
        cfg(scale=[0, 10]).pass_threshold == 10 and cfg(scale=[0, 10], pass_threshold=7).pass_threshold == 7
    )


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ({"model": DROP}, "model", "required"),
        ({"rubric": DROP}, "rubric", "required"),
        ({"model": "", "rubric": RUBRIC}, "model", "non-empty string"),
        ({"rubrik": "x"}, "rubrik", "unknown key"),
        ({"scale": [5]}, "scale", "expected two integers [low, high], got [5]"),
        ({"scale": [1, "5"]}, "scale", "expected two integers"),
        ({"scale": [1, True]}, "scale", "expected two integers"),
        ({"scale": 5}, "scale", "got 5"),
        ({"scale": [5, 1]}, "scale", "low < high"),
        ({"score_pattern": r"score (\d+)/(\d+)"}, "score_pattern", "exactly one capture group"),
        ({"score_pattern": "score"}, "score_pattern", "integer score, got 0;"),
        ({"score_pattern": "(["}, "score_pattern", "not a valid regular expression"),
        ({"rubric": "{{ answer "}, "rubric", "does not compile"),
        ({"rubric": "{% if %}x{% endif %}"}, "rubric", "does not compile"),
        ({"pass_threshold": 9}, "pass_threshold", "[1, 5]"),
        ({"pass_threshold": "4"}, "pass_threshold", "integer"),
        ({"max_tokens": 0}, "max_tokens", "positive integer"),
        ({"endpoint_model": ""}, "endpoint_model", "non-empty string"),
        ({"system": 3}, "system", "non-empty string"),
        ({"human_label": ["h"]}, "human_label", "non-empty string"),
        ({"api_key_env": 1}, "api_key_env", "non-empty string"),
    ],
)
def test_bad_field_names_file_and_field(data, field, fragment) -> None:
    full = {k: v for k, v in {"model": "m", "rubric": RUBRIC, **data}.items() if v is not DROP}
    with pytest.raises(ConfigError) as e:
        JudgeConfig.from_dict(full, source=SRC)
    msg = str(e.value)
    assert msg.startswith(f"{SRC}: judge.{field}: ") and fragment in msg and "\n" not in msg


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^tasks/qa.yaml: judge: expected a mapping"):
        JudgeConfig.from_dict(["model"], source=SRC)  # type: ignore[arg-type]


# ---- rendering and parsing -----------------------------------------------------------------


def test_rubric_renders_every_variable_and_the_system_prompt() -> None:
    (user,) = cfg().render(ITEM)
    assert user == {
        "role": "user",
        "content": "Q: Capital of France?\nA: Paris\nRef: Paris\nTopic: geo\nGive 'Score: N'.",
    }
    system, user2 = cfg(system="You are a strict grader.").render(ITEM)
    assert system == {"role": "system", "content": "You are a strict grader."} and user2 == user
    # No HTML escaping: answers are judged as written.
    assert cfg(rubric="{{ answer }}").render({**ITEM, "answer": "<b>&</b>"})[0]["content"] == "<b>&</b>"


@pytest.mark.parametrize("rubric, name", [("{{ doc.grade }}", "'grade'"), ("{{ context }}", "'context'")])
def test_missing_field_names_file_rubric_and_field(rubric, name) -> None:
    c = cfg(rubric=rubric)
    with pytest.raises(ConfigError) as e:
        c.render(ITEM, 3)
    msg = str(e.value)
    assert msg.startswith(f"{SRC}: judge.rubric: item 3: field {name} is undefined") and "\n" not in msg


def test_rubric_is_sandboxed() -> None:
    c = cfg(rubric="{{ answer.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ConfigError, match=r"judge\.rubric: item 0: not allowed in a rubric: .*__class__"):
        c.render(ITEM)


@pytest.mark.parametrize(
    "text, score",
    [
        ("Score: 4", 4),
        ("The answer is right.\nscore=5", 5),
        ("SCORE : 2 ... on reflection Score: 3", 2),  # the first match counts
        ("Score: 9", None),  # above the scale
        ("Score: 0", None),  # below the scale
        ("I give it four out of five", None),
        ("", None),
    ],
)
def test_score_parsing(text, score) -> None:
    assert cfg().parse(text) == score


def test_custom_pattern_and_scale() -> None:
    c = cfg(scale=[0, 10], score_pattern=r"(\d+)\s*/\s*10")
    assert [c.parse(t) for t in ("7/10", "rated 0 / 10", "11/10", "seven")] == [7, 0, None, None]


def test_score_with_judge_batches_once_and_flags_passes() -> None:
    backend = FakeBackend(["Score: 5", "Score: 3", "no idea", "Score: 7"])
    items = [{**ITEM, "answer": a} for a in ("Paris", "Lyon", "?", "Nice")]
    results = score_with_judge(cfg(pass_threshold=4), backend, items)
    assert len(backend.calls) == 1 and [p[-1]["content"].split("\n")[1] for p in backend.calls[0]] == [
        "A: Paris",
        "A: Lyon",
        "A: ?",
        "A: Nice",
    ]
    assert results == [
        {"judge_score": 5, "judge_pass": 1, "judge_raw": "Score: 5"},
        {"judge_score": 3, "judge_pass": 0, "judge_raw": "Score: 3"},
        {"judge_score": None, "judge_pass": 0, "judge_raw": "no idea"},
        {"judge_score": None, "judge_pass": 0, "judge_raw": "Score: 7"},
    ]
    assert aggregate_judge(results) == {"judge_score": 4.0, "judge_pass": 0.25, "judge_unparsable": 2}
    assert aggregate_judge([]) == {"judge_score": None, "judge_pass": None, "judge_unparsable": 0}
    assert score_with_judge(cfg(), backend, []) == [] and len(backend.calls) == 1


def test_rubric_error_stops_before_the_judge_is_called() -> None:
    backend = FakeBackend(["Score: 5"] * 2)
    with pytest.raises(ConfigError, match="field 'topic'"):
        score_with_judge(cfg(), backend, [ITEM, {**ITEM, "doc": {}}])
    assert backend.calls == []


def test_wrong_number_of_replies_is_an_error() -> None:
    with pytest.raises(WeightsmithError, match="1 replies for 2 prompts"):
        score_with_judge(cfg(), FakeBackend(["Score: 1"]), [ITEM, ITEM])


def test_human_scores() -> None:
    c = cfg(human_label="human")
    assert human_scores(c, [{"human": 4}, {}, {"human": 2.0}]) == [4, None, 2]
    with pytest.raises(ConfigError, match=r"^tasks/qa.yaml: judge.human_label: document 1 .* 6"):
        human_scores(c, [{"human": 4}, {"human": 6}])
    with pytest.raises(ConfigError, match="no document has a field 'human'"):
        human_scores(c, [{"label": 4}])
    with pytest.raises(ConfigError, match="judge.human_label: not set"):
        human_scores(cfg(), [{"human": 4}])


# ---- agreement -----------------------------------------------------------------------------


def reference_agreement(judge, human, low, high) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    pairs = [(j, h) for j, h in zip(judge, human, strict=True) if j is not None and h is not None]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    labels = list(range(low, high + 1))
    return {
        "cohen_kappa": cohen_kappa_score(a, b, labels=labels),
        "quadratic_kappa": cohen_kappa_score(a, b, labels=labels, weights="quadratic"),
        "spearman": spearmanr(a, b).statistic,
        "exact": sum(x == y for x, y in pairs) / len(pairs),
        "within_one": sum(abs(x - y) <= 1 for x, y in pairs) / len(pairs),
    }


@pytest.mark.parametrize("seed, low, high, n", [(0, 1, 5, 40), (1, 1, 5, 7), (2, 0, 10, 60), (3, 1, 3, 25)])
def test_agreement_matches_sklearn_and_scipy(seed, low, high, n) -> None:
    rng = random.Random(seed)
    human = [rng.randint(low, high) for _ in range(n)]
    # A judge that is mostly close to the human, sometimes off, sometimes unparsable.
    judge = [
        None if rng.random() < 0.15 else min(high, max(low, h + rng.choice([-2, -1, 0, 0, 0, 1])))
        for h in human
    ]
    human[0] = None  # an item without a human label is left out, not counted as unparsable
    got = agreement(judge, human, (low, high))
    want = reference_agreement(judge, human, low, high)
    assert got["n"] == sum(j is not None and h is not None for j, h in zip(judge, human, strict=True))
    assert got["unparsable"] == sum(j is None and h is not None for j, h in zip(judge, human, strict=True))
    assert got["cohen_kappa"] == pytest.approx(want["cohen_kappa"], abs=1e-12)
    assert got["quadratic_kappa"] == pytest.approx(want["quadratic_kappa"], abs=1e-12)
    assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-12)
    assert got["exact_agreement"] == pytest.approx(want["exact"])
    assert got["within_one"] == pytest.approx(want["within_one"])
    assert got["cohen_kappa"] != got["quadratic_kappa"]  # the weights matter on these data


def test_agreement_by_hand_and_degenerate_cases() -> None:
    got = agreement([1, 2, 3, 5, None], [1, 3, 3, 3, 4], (1, 5))
    assert (got["n"], got["exact_agreement"], got["within_one"], got["unparsable"]) == (4, 0.5, 0.75, 1)
    perfect = agreement([1, 3, 5], [1, 3, 5], (1, 5))
    assert perfect["cohen_kappa"] == perfect["quadratic_kappa"] == pytest.approx(1.0)
    assert perfect["spearman"] == pytest.approx(1.0)
    constant = agreement([4, 4, 4], [3, 4, 5], (1, 5))  # one side constant: no rank correlation
    assert constant["spearman"] is None and constant["cohen_kappa"] == pytest.approx(0.0)
    single = agreement([4, 4], [4, 4], (1, 5))  # chance agreement is 1: kappa undefined
    assert single["cohen_kappa"] is None and single["quadratic_kappa"] is None
    assert single["exact_agreement"] == 1.0
    empty = agreement([None, 2], [3, None], (1, 5))
    assert empty == {
        "n": 0,
        "exact_agreement": None,
        "within_one": None,
        "cohen_kappa": None,
        "quadratic_kappa": None,
        "spearman": None,
        "unparsable": 1,
    }
    with pytest.raises(WeightsmithError, match="item 1: human score 6 is outside the scale"):
        agreement([1, 2], [1, 6], (1, 5))
    with pytest.raises(ValueError):
        agreement([1], [1, 2], (1, 5))


# ---- make_judge ----------------------------------------------------------------------------


def test_make_judge_chooses_by_url(monkeypatch) -> None:
    loaded = []
    local = make_judge(cfg(max_tokens=8), load_model=lambda name: loaded.append(name) or "LLM")
    assert isinstance(local, LocalJudge) and local.llm == "LLM" and local.max_tokens == 8
    assert loaded == ["smollm2-135m-instruct"]

    def no_load(name):
        raise AssertionError("an endpoint judge must not load a model")

    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    grants = Grants(endpoints=("http://127.0.0.1:9/v1", "https://x.example/v1"), api_key_env="JUDGE_KEY")
    remote = make_judge(
        cfg(model="http://127.0.0.1:9/v1/", endpoint_model="gpt-x", api_key_env="JUDGE_KEY"),
        load_model=no_load,
        grants=grants,
    )
    assert isinstance(remote, EndpointJudge)
    assert (remote.url, remote.model, remote.api_key) == (
        "http://127.0.0.1:9/v1/chat/completions",
        "gpt-x",
        "sk-test",
    )
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(ConfigError, match=r"^--judge-api-key-env: environment variable JUDGE_KEY"):
        make_judge(cfg(model="https://x.example/v1"), load_model=no_load, grants=grants)


# ---- EndpointJudge against broken endpoints (MockTransport) ---------------------------------


FAST = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.01)  # retries, without the waits


def mock_judge(handler, **kw) -> EndpointJudge:
    return EndpointJudge(
        "http://judge.test/v1", "m", "sk-1", transport=httpx.MockTransport(handler), retry=FAST, **kw
    )


def test_endpoint_request_shape() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization"), json.loads(request.content)))
        return httpx.Response(
            200, json={"choices": [{"message": {"role": "assistant", "content": "Score: 4"}}]}
        )

    prompts = cfg(system="be fair").render(ITEM)
    assert mock_judge(handler, max_tokens=9).complete([prompts]) == ["Score: 4"]
    ((url, auth, body),) = seen
    assert url == "http://judge.test/v1/chat/completions" and auth == "Bearer sk-1"
    assert body == {"model": "m", "messages": prompts, "temperature": 0, "max_tokens": 9}


@pytest.mark.parametrize(
    "response, fragment",
    [
        (httpx.Response(500, text="boom"), "answered HTTP 500: 'boom'"),
        (httpx.Response(200, text="<html>not json</html>"), "malformed reply (HTTP 200)"),
        (httpx.Response(200, json={"error": "nope"}), "malformed reply"),
        (httpx.Response(200, json={"choices": []}), "malformed reply"),
        (httpx.Response(200, json={"choices": [{"message": {"content": 5}}]}), "malformed reply"),
    ],
)
def test_endpoint_errors_name_url_and_status(response, fragment) -> None:
    judge = mock_judge(lambda request: response, concurrency=1)
    with pytest.raises(WeightsmithError) as e:
        judge.complete([[{"role": "user", "content": "hi"}]])
    assert "http://judge.test/v1/chat/completions" in str(e.value) and fragment in str(e.value)


def test_endpoint_null_content_is_an_unparsable_reply() -> None:
    judge = mock_judge(lambda r: httpx.Response(200, json={"choices": [{"message": {"content": None}}]}))
    (result,) = score_with_judge(cfg(), judge, [ITEM])
    assert result == {"judge_score": None, "judge_pass": 0, "judge_raw": ""}


def test_endpoint_unreachable() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = EndpointJudge(f"http://127.0.0.1:{port}/v1", timeout=5, retry=FAST)
    with pytest.raises(WeightsmithError, match=rf"127.0.0.1:{port}/v1/chat/completions: request failed"):
        judge.complete([[{"role": "user", "content": "hi"}]])


# ---- real backends on a tiny random model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tiny_hf_dir: Path):
    return weightsmith.load(tiny_hf_dir)


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path):
    running = start_server(
        config_from_dict(
            ServeConfig,
            {
                "model": str(tiny_hf_dir),
                "served_name": "tiny",
                "port": 0,
                "api_key": "sk-judge",
                "max_batch": 4,
            },
        )
    )
    yield running
    running.stop()


def test_local_judge_is_greedy_chat_batched(tiny_llm) -> None:
    prompts = [cfg().render({**ITEM, "answer": a}) for a in ("Paris", "Lyon", "Nice")]
    got = LocalJudge(tiny_llm, max_tokens=6, batch_size=2).complete(prompts)
    assert got == [tiny_llm.chat(m, temperature=0, max_tokens=6) for m in prompts]
    assert all(isinstance(t, str) and t for t in got)


def test_endpoint_judge_against_the_project_server(server, tiny_llm, monkeypatch) -> None:
    monkeypatch.setenv("TINY_KEY", "sk-judge")
    c = cfg(model=server.url + "/v1", endpoint_model="tiny", api_key_env="TINY_KEY", max_tokens=6)
    grants = Grants(endpoints=(server.url + "/v1",), api_key_env="TINY_KEY")
    judge = make_judge(c, load_model=None, grants=grants)  # type: ignore[arg-type]
    items = [{**ITEM, "answer": a} for a in ("Paris", "Lyon", "Nice")]
    results = score_with_judge(c, judge, items)
    # Random weights: assert on plumbing. Greedy at temperature 0 means the server's text is
    # the local engine's text, which shows temperature, max_tokens and the messages arrived.
    raws = [r["judge_raw"] for r in results]
    assert all(isinstance(t, str) and t for t in raws)
    assert raws == LocalJudge(tiny_llm, max_tokens=6).complete([c.render(i) for i in items])
    assert [r["judge_score"] for r in results] == [c.parse(t) for t in raws]
    assert all(r["judge_pass"] == int(r["judge_score"] == 5) for r in results)


def test_endpoint_judge_reports_auth_and_model_errors(server) -> None:
    message = [[{"role": "user", "content": "hi"}]]
    with pytest.raises(WeightsmithError, match=r"/v1/chat/completions answered HTTP 401"):
        EndpointJudge(server.url + "/v1", "tiny", "wrong-key").complete(message)
    with pytest.raises(WeightsmithError, match=r"/v1/chat/completions answered HTTP 404"):
        EndpointJudge(server.url + "/v1", "no-such-model", "sk-judge").complete(message)
