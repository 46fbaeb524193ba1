"""Eval and red-team fanned out over real `weightsmith serve` replicas (a tiny random model,
started in-process on free ports): the `core` suite (and a generation task) over two replicas
equals one replica's results exactly and a local run's metrics; a replica shut down mid-run
leaves the run to the other, every document scored once; the cache is shared between a run over
two replicas and a rerun over one; a red-team run over two replicas equals one replica's."""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import pytest

from weightsmith.commands.eval import EvalConfig, run_eval
from weightsmith.commands.redteam import RedteamConfig
from weightsmith.commands.redteam import run_redteam as redteam
from weightsmith.commands.serve import ServeConfig, start_server
from weightsmith.config import config_from_dict
from weightsmith.errors import UsageError
from weightsmith.eval.runner import EvalOptions
from weightsmith.safety.redteam import EndpointTarget, OutputOptions

#: The core group (three multiple-choice tasks) and a generation task, a few documents each.
TASKS = ["builtin:core", "builtin:kettlebird-heldout"]
LIMIT = 6


def serve(model_dir: Path):
    cfg = {"model": str(model_dir), "served_name": "tiny", "port": 0, "max_batch": 8}
    return start_server(config_from_dict(ServeConfig, cfg))


@pytest.fixture(scope="module")
def replicas(tiny_hf_dir: Path):
    running = [serve(tiny_hf_dir), serve(tiny_hf_dir)]
    yield [r.url + "/v1" for r in running]
    for r in running:
        r.stop()


def evaluate(model: str, progress=None, **kw) -> dict:
    kw.setdefault("cache", False)
    kw.setdefault("run", EvalOptions(limit=LIMIT))
    kw.setdefault("tasks", TASKS)
    kw["out"] = tempfile.mkdtemp(prefix="fanout-eval-")
    return run_eval(EvalConfig(model=model, **kw), progress)


def samples(result: dict) -> dict[str, list[dict]]:
    """Per task, each document's record from the samples file (doc_id, requests, responses,
    metrics), as a results folder holds it."""
    (folder,) = result["written"]["runs"]
    out = {}
    for path in sorted(Path(folder).glob("samples_*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        out[path.stem[len("samples_") :]] = [
            {k: r[k] for k in ("doc_id", "arguments", "resps", "metrics")} for r in records
        ]
    return out


@pytest.fixture(scope="module")
def one_replica(replicas) -> dict:
    return evaluate("tiny", endpoint=[replicas[0]])


def n_requests(result: dict) -> int:
    return sum(len(r["arguments"]) for records in samples(result).values() for r in records)


def test_two_replicas_give_one_replicas_results_exactly(replicas, one_replica) -> None:
    two = evaluate("tiny", endpoint=[",".join(replicas)])
    assert samples(two) == samples(one_replica)
    assert two["runs"][0]["results"] == one_replica["runs"][0]["results"]
    assert set(two["runs"][0]["results"]) == {
        "core",
        "arith_mc",
        "unit_mc",
        "reading_mc",
        "kettlebird_heldout",
    }
    spent = two["runs"][0]["weightsmith"]["endpoints"]
    assert set(spent) == set(replicas) and all(s["answered"] > 0 for s in spent.values())
    assert sum(s["answered"] for s in spent.values()) == n_requests(two)  # each request answered once
    info = two["runs"][0]["weightsmith"]
    assert info["served"]["model"] == "tiny" and len(info["served"]["weights_sha256"]) == 64


def test_endpoint_results_equal_a_local_run_at_the_metric_level(tiny_hf_dir, one_replica) -> None:
    local = evaluate(str(tiny_hf_dir))
    got, want = samples(one_replica), samples(local)
    assert [r["arguments"] for t in got for r in got[t]] == [r["arguments"] for t in want for r in want[t]]
    for task in want:
        for g, w in zip(got[task], want[task], strict=True):
            assert g["metrics"] == w["metrics"]  # acc, acc_norm, exact_match: the same decisions
            if task == "kettlebird_heldout":
                assert g["resps"] == w["resps"]  # greedy text, token for token
            else:  # the same tokens scored; one forward pass vs a cached prefix: float rounding
                assert [x[1] for x in g["resps"]] == [x[1] for x in w["resps"]]
                assert [x[0] for x in g["resps"]] == pytest.approx([x[0] for x in w["resps"]], abs=1e-4)
    ends = {k: v for k, v in local["runs"][0]["results"]["core"].items() if "stderr" not in k}
    assert {k: one_replica["runs"][0]["results"]["core"][k] for k in ends} == ends


def test_a_replica_shut_down_mid_run_leaves_the_run_to_the_other(tiny_hf_dir, one_replica) -> None:
    a, b = serve(tiny_hf_dir), serve(tiny_hf_dir)
    stopper = threading.Thread(target=b.stop)

    def progress(label):
        def tick(done: int, total: int) -> None:
            if done >= total // 3 and not stopper.is_alive() and b.thread.is_alive():
                stopper.start()  # graceful: in-flight answers finish, new connections are refused

        return tick

    try:
        result = evaluate("tiny", progress=progress, endpoint=[a.url + "/v1", b.url + "/v1"])
    finally:
        stopper.join(60)
        a.stop()
    assert not b.thread.is_alive()
    assert samples(result) == samples(one_replica)  # same answers, each document once
    for task, records in samples(result).items():
        ids = [r["doc_id"] for r in records]
        assert len(ids) == len(set(ids)) == len(samples(one_replica)[task])
    spent = result["runs"][0]["weightsmith"]["endpoints"]
    assert spent[b.url + "/v1"]["answered"] > 0 and spent[b.url + "/v1"]["failed_tries"] > 0
    assert sum(s["answered"] for s in spent.values()) == n_requests(result)


def test_the_cache_is_shared_between_two_replicas_and_one(replicas, tmp_path) -> None:
    cache = str(tmp_path / "cache.sqlite")
    first = evaluate("tiny", endpoint=replicas, cache=True, cache_path=cache)
    again = evaluate("tiny", endpoint=[replicas[1]], cache=True, cache_path=cache)
    info = again["runs"][0]["weightsmith"]
    assert first["runs"][0]["weightsmith"]["cache_hits"] == 0
    assert info["cache_hits"] == n_requests(again) and info["endpoints"][replicas[1]]["answered"] == 0
    assert info["model_hash"] == first["runs"][0]["weightsmith"]["model_hash"]
    assert samples(again) == samples(first)


def test_the_chat_template_is_the_servers_and_equals_a_local_run(tiny_hf_dir, replicas) -> None:
    kw = dict(tasks=["builtin:arith-mc"], run=EvalOptions(limit=3, apply_chat_template=True))
    remote = evaluate("tiny", endpoint=replicas, **kw)
    local = evaluate(str(tiny_hf_dir), **kw)
    got, want = samples(remote)["arith_mc"], samples(local)["arith_mc"]
    assert [r["arguments"] for r in got] == [r["arguments"] for r in want]
    assert "<|im_start|>assistant" in got[0]["arguments"][0][0]
    assert [r["metrics"] for r in got] == [r["metrics"] for r in want]


def test_what_an_endpoint_cannot_evaluate_is_refused_before_any_request(replicas) -> None:
    with pytest.raises(UsageError, match=r"--endpoint: text_ppl is a loglikelihood_rolling task"):
        run_eval(EvalConfig(model="tiny", tasks=["builtin:text-ppl"], endpoint=replicas, cache=False))
    with pytest.raises(UsageError, match=r"--adapter loads an adapter here; with --endpoint"):
        EvalConfig(model="tiny", tasks=TASKS, endpoint=replicas, adapter="x")
    with pytest.raises(UsageError, match=r"--compare base: with --endpoint, compare served names"):
        run_eval(EvalConfig(model="tiny", tasks=TASKS, endpoint=replicas, compare=["base"], cache=False))
    with pytest.raises(UsageError, match=r"does not serve a model named 'nope'; it serves: tiny"):
        run_eval(EvalConfig(model="nope", tasks=TASKS, endpoint=replicas, cache=False))
    with pytest.raises(UsageError, match=r"^--endpoint: 'localhost:8000' is not an endpoint URL"):
        EvalConfig(model="tiny", tasks=TASKS, endpoint=["localhost:8000"])


def test_red_team_over_two_replicas_equals_one(replicas, tmp_path) -> None:
    def attack(target: str, out: Path) -> list[dict]:
        cfg = RedteamConfig(target=target, model=["tiny"], packs=["builtin:harmful", "builtin:benign"],
                            transforms=["none"], limit=6, max_tokens=8, calibrate=False,
                            output=OutputOptions(out=str(out)))  # fmt: skip
        redteam(cfg)
        return [json.loads(x) for x in (out / "transcripts.jsonl").read_text().splitlines()]

    one = attack(replicas[0], tmp_path / "one")
    two = attack(",".join(replicas), tmp_path / "two")
    assert len(one) == 12 and two == one
    # An interrupted run's journal keys on what is served, not where: any replicas resume it.
    ids = [EndpointTarget(urls, "tiny").identity for urls in (replicas[0], replicas[1], replicas)]
    assert ids[0] == ids[1] == ids[2] and ids[0]["weights_sha256"]


def test_the_command_line_takes_a_comma_separated_endpoint_list(replicas, capsys) -> None:
    from weightsmith.cli.main import main

    argv = ["eval", "tiny", "--tasks", "builtin:arith-mc", "--limit", "3", "--no-cache", "--json",
            "--endpoint", ",".join(replicas), "--concurrency", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    (run,) = printed["runs"]
    assert run["weightsmith"]["device"] == "endpoint" and set(run["weightsmith"]["endpoints"]) == set(
        replicas
    )
    assert run["config"]["model_args"] == f"model=tiny,endpoint={','.join(replicas)}"
    assert main(["eval", "tiny", "--tasks", "builtin:arith-mc", "--endpoint", "ftp://x"]) == 2
    assert "--endpoint: 'ftp://x' is not an endpoint URL" in capsys.readouterr().err
