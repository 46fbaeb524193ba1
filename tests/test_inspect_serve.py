"""Steering in the server: per request (the `steer` extension field, directions offered with
--direction), rows of one batch steered differently; errors are 400s naming the field."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

import weightsmith
from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict
from weightsmith.inspect.directions import difference_of_means, write_direction
from weightsmith.models.fingerprint import model_fingerprint

httpx = pytest.importorskip("httpx")
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def direction(tiny_hf_dir: Path, tmp_path_factory) -> Path:
    llm = weightsmith.load(tiny_hf_dir, device="cpu")
    d = difference_of_means(
        llm.model, llm.tokenizer, ["Tell me a story", "A small model"], ["0123456789", "Hola mundo"]
    )
    path = tmp_path_factory.mktemp("dirs") / "story.safetensors"
    write_direction(path, d, {"model_sha256": model_fingerprint(llm.model)})
    return path


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path, direction: Path):
    cfg = {
        "model": str(tiny_hf_dir),
        "served_name": "tiny",
        "port": 0,
        "max_batch": 8,
        "direction": [str(direction)],
    }
    running = start_server(config_from_dict(ServeConfig, cfg))
    yield running
    running.stop()


def _complete(server, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def _offline(tiny_hf_dir: Path, steer: list[str]) -> str:
    return (
        weightsmith.load(tiny_hf_dir, device="cpu", steer=steer)
        .complete(PROMPT, max_tokens=8, temperature=0)
        .text
    )


def test_a_request_steers_only_its_own_rows(server, tiny_hf_dir, direction) -> None:
    specs = {"plain": None, "ablate": "story:ablate", "add": ["story:layer=1:scale=6"]}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # in flight together: shared batches
        futures = {
            (k, i): pool.submit(_complete, server, **({"steer": s} if s else {}))
            for k, s in specs.items()
            for i in range(2)
        }
    texts = {}
    for (kind, _), f in futures.items():
        r = f.result()
        assert r.status_code == 200, r.text
        texts.setdefault(kind, set()).add(r.json()["choices"][0]["text"])
    assert all(len(t) == 1 for t in texts.values())
    assert texts["plain"] == {_offline(tiny_hf_dir, [])}
    assert texts["ablate"] == {_offline(tiny_hf_dir, [f"{direction}:ablate"])}
    assert texts["add"] == {_offline(tiny_hf_dir, [f"{direction}:layer=1:scale=6"])}
    assert texts["add"] != texts["plain"]


def test_bad_steering_is_a_400_naming_the_field(server) -> None:
    for steer, words in (("nope:ablate", "unknown direction 'nope'"), ("story", "either scale=S"),
                         ("story:layer=9:scale=1", "out of range"), ("../x.safetensors:ablate", "unknown direction")):  # fmt: skip
        r = _complete(server, steer=steer)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "steer" and words in err["message"], err
