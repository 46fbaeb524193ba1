"""Arena contestants (local, fork, endpoint) and pair choice."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest
from arena_fakes import FakeServer, free_url

from weightsmith.arena.contestants import Contestants, parse_contestant
from weightsmith.arena.pairing import choose_pair
from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.grants import Grants
from weightsmith.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
ASK = [{"role": "user", "content": "Once upon a time"}]


# -- specs -------------------------------------------------------------------------------------


def test_parse_specs(tmp_path):
    adapters = {"kettlebird": tmp_path}
    local = parse_contestant("smollm2-135m-instruct", adapters)
    assert (local.name, local.kind) == ("smollm2-135m-instruct", "local")
    fork = parse_contestant("smollm2-135m-instruct:kettlebird", adapters)
    assert (fork.name, fork.kind) == ("smollm2-135m-instruct:kettlebird", "fork")
    path = parse_contestant("/some/dir/tiny-llama", adapters)
    assert (path.name, path.kind) == ("tiny-llama", "local")
    ep = parse_contestant("http://host:8000/v1#their-model", adapters)
    assert (ep.name, ep.kind, ep.spec) == ("their-model", "endpoint", "http://host:8000/v1#their-model")
    assert parse_contestant("http://host:8000/v1", adapters).name == "host:8000"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "empty"),
        ("base:nope", "--adapter nope=DIR"),
        (":kettlebird", "no model before"),
        ("http:///v1#m", "http(s)://HOST:PORT"),
    ],
)
def test_bad_specs_are_one_line(spec, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_contestant(spec, {"kettlebird": tmp_path})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_two_contestants_with_one_name_are_refused():
    with pytest.raises(ConfigError, match="both called 'm'"):
        Contestants(["http://a:1/v1#m", "http://b:2/v1#m"])


# -- answering -----------------------------------------------------------------------------------


def test_local_and_fork_share_one_load_and_differ(tiny_hf_dir, adapter_dir):
    from weightsmith.llm import load

    loads: list[str] = []

    def loader(model, **kw):
        loads.append(model)
        return load(model, **kw)

    base, fork = str(tiny_hf_dir), f"{tiny_hf_dir}:kb"
    cs = Contestants([base, fork], adapters={"kb": adapter_dir}, device="cpu", loader=loader)
    assert cs.names == ["tiny-llama", "tiny-llama:kb"] and loads == [base]
    cs.check()  # no endpoints: nothing to reach
    a, timings = cs.answer("tiny-llama", ASK, GREEDY)
    b, _ = cs.answer("tiny-llama:kb", ASK, GREEDY)
    assert a and b and a != b  # the adapter changes greedy text
    assert 0 <= timings["first_token_s"] <= timings["total_s"]
    assert cs.answer("tiny-llama", ASK, GREEDY)[0] == a  # the adapter is off again for the base
    assert "".join(cs.stream("tiny-llama:kb", ASK, GREEDY)) == b
    # Two threads at once on one shared base: each gets its own model's answer.
    got: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda n=n: got.__setitem__(n, cs.answer(n, ASK, GREEDY)[0]))
        for n in cs.names
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"tiny-llama": a, "tiny-llama:kb": b}


def test_endpoint_contestant_streams_with_the_battle_settings(monkeypatch):
    monkeypatch.setenv("ARENA_TEST_KEY", "sekret")
    with FakeServer(lambda body: "hello from the far side") as server:
        cs = Contestants([f"{server.url}#far"], grants=Grants(api_key_env="ARENA_TEST_KEY"))
        cs.check()
        params = SamplingParams(max_tokens=9, temperature=0.5, seed=7)
        assert list(cs.stream("far", ASK, params)) == ["hello", " from", " the", " far", " side"]
        text, timings = cs.answer("far", ASK, params)
    assert text == "hello from the far side" and timings["total_s"] >= timings["first_token_s"] >= 0
    body = server.requests[0]["body"]
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("far", 9, 0.5, 7)
    assert body["messages"] == ASK and server.requests[0]["auth"] == "Bearer sekret"


def test_unreachable_endpoint_is_named_at_check():
    url = free_url()
    cs = Contestants([f"{url}#gone"])
    with pytest.raises(WeightsmithError) as e:
        cs.check()
    assert "'gone'" in str(e.value) and "unreachable" in str(e.value) and "\n" not in str(e.value)


# -- pairing -------------------------------------------------------------------------------------


def test_pairs_never_self_and_fewest_first():
    rng = random.Random(0)
    counts = {"a": 5, "b": 1, "c": 1, "d": 9}
    for _ in range(200):
        x, y = choose_pair(counts, None, rng)
        assert x != y and {x, y} == {"b", "c"}


def test_fewest_meets_the_closest_rating_among_equals():
    rng = random.Random(1)
    counts = {"new": 0, "near": 3, "far": 3, "busy": 10}
    ratings = {"new": 1000.0, "near": 1010.0, "far": 1200.0, "busy": 1000.0}
    for _ in range(100):
        assert set(choose_pair(counts, ratings, rng)) == {"new", "near"}


def test_sides_are_randomised_and_need_two():
    rng = random.Random(2)
    firsts = Counter(choose_pair({"a": 0, "b": 0}, None, rng)[0] for _ in range(400))
    assert 150 < firsts["a"] < 250 and 150 < firsts["b"] < 250
    with pytest.raises(ConfigError, match="at least two contestants"):
        choose_pair({"a": 0}, None, rng)
