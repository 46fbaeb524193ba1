"""`weightsmith synth` on a tiny random model in process: every recipe end to end, the files a
run writes (chat JSONL finetune reads, funnel, lineage, report), resume after SIGKILL, and bad
input (empty seed file, binary and unreadable documents) before or without losing any work."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_tiny_hf_dir, run_cli

from weightsmith.synth.rouge import rouge_l

SEEDS = [
    "Write a short poem about the sea.", "List three fruits that are red.",
    "Explain why the sky is blue in two sentences.", "Give a synonym for happy.",
    "Describe a cat to a child.", "Name two rivers in Europe.",
]  # fmt: skip
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_hf_dir(tmp_path_factory.mktemp("synth") / "tiny", seed=3, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seeds") / "seeds.jsonl"
    path.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS))
    return path


def _common(tiny: Path, out: Path, *extra: str) -> list[str]:
    # A random model rarely ends a reply; stopping at "e" gives short, finished replies to filter.
    return ["--model", str(tiny), "--out", str(out), "--max-tokens", "24", "--batch-size", "8", "--device", "cpu",
            "--min-instruction-words", "1", "--stop", "e", "--decontaminate", "none", "--json", *extra]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def self_instruct(tiny, seeds, tmp_path_factory) -> Path:
    from weightsmith.cli.main import main

    out = tmp_path_factory.mktemp("si") / "out"
    argv = ["synth", "self-instruct", "--seed", str(seeds), "--n", "6", "--max-steps", "4",
            *_common(tiny, out, "--valid-fraction", "0.3")]  # fmt: skip
    assert main(argv) == 0
    return out


def test_self_instruct_writes_chat_data_finetune_reads(self_instruct: Path) -> None:
    from weightsmith.train.data import read_records

    train, valid = _rows(self_instruct / "train.jsonl"), _rows(self_instruct / "validation.jsonl")
    kept = train + valid
    assert 1 <= len(kept) <= 6
    assert len(read_records(self_instruct / "train.jsonl")) == len(train)
    for row in kept:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant") and assistant["content"].strip()
        assert row["meta"]["recipe"] == "self-instruct"
    instructions = SEEDS + [r["messages"][0]["content"] for r in kept]
    for i, a in enumerate(instructions):  # nothing kept is a near-duplicate of anything before it
        assert all(rouge_l(b, a) < 0.7 for b in instructions[:i])


def test_funnel_accounts_for_every_candidate(self_instruct: Path) -> None:
    funnel = json.loads((self_instruct / "funnel.json").read_text())
    dropped = _rows(self_instruct / "work" / "dropped.jsonl")
    assert funnel["candidates"] == funnel["kept"] + len(dropped)
    assert funnel["stages"][-1]["remaining"] == funnel["kept"] == funnel["train"] + funnel["validation"]
    by_reason: dict[str, int] = {}
    for row in dropped:
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    assert {r: n for s in funnel["stages"] for r, n in s["dropped"].items()} == by_reason
    share = funnel["kept_share"]
    assert share["ci_low"] <= share["rate"] <= share["ci_high"] and share["method"] == "wilson"


def test_lineage_names_the_weights_prompts_and_inputs(self_instruct: Path, tiny: Path, seeds: Path) -> None:
    from weightsmith import load
    from weightsmith.eval.cache import model_fingerprint

    record = json.loads((self_instruct / "lineage.json").read_text())
    assert record["kind"] == "synth" and {i["role"] for i in record["inputs"]} >= {"model", "inputs"}
    lineage = record["details"]
    assert lineage["model"]["weights_sha256"] == model_fingerprint(load(str(tiny), device="cpu").model)
    assert lineage["inputs"] == [
        {"file": str(seeds), "sha256": hashlib.sha256(seeds.read_bytes()).hexdigest()}
    ]
    for name in ("self_instruct", "answer"):
        entry = lineage["prompts"][name]
        assert entry["sha256"] == hashlib.sha256(Path(entry["file"]).read_bytes()).hexdigest()
    assert lineage["seed"] == 0 and lineage["parameters"]["n"] == 6
    outputs = {o["path"]: o["sha256"] for o in record["outputs"]}
    assert outputs["train.jsonl"] == hashlib.sha256((self_instruct / "train.jsonl").read_bytes()).hexdigest()
    assert not any(path.startswith("work/") for path in outputs)
    html = (self_instruct / "report.html").read_text()
    assert "Funnel" in html and "instruction_cut_off" in html


def _wait_for_step(proc: subprocess.Popen, state: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists():
            try:
                if json.loads(state.read_text())["step"] >= step:
                    return
            except (ValueError, KeyError):
                pass
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def _final(out: Path) -> dict:
    record = json.loads((out / "lineage.json").read_text())
    lineage = record["details"]
    lineage["parameters"].pop("out")
    data = ("train.jsonl", "validation.jsonl", "funnel.json")  # config.yaml and the report name OUT
    lineage["outputs"] = {o["path"]: o["sha256"] for o in record["outputs"] if o["path"] in data}
    return {"train": (out / "train.jsonl").read_bytes(), "validation": (out / "validation.jsonl").read_bytes(),
            "funnel": (out / "funnel.json").read_bytes(), "lineage": lineage,
            "kept": (out / "work" / "kept.jsonl").read_bytes(), "dropped": (out / "work" / "dropped.jsonl").read_bytes()}  # fmt: skip


RESUME_ARGS = ["synth", "self-instruct", "--n", "40", "--max-steps", "5", "--temperature", "0.9"]


@pytest.fixture(scope="module")
def whole(tiny, seeds, tmp_path_factory) -> Path:
    from weightsmith.cli.main import main

    out = tmp_path_factory.mktemp("whole") / "out"
    assert main([*RESUME_ARGS, "--seed", str(seeds), *_common(tiny, out)]) == 0
    return out


def test_interrupted_twice_mid_step_the_run_ends_as_an_uninterrupted_one(
    tiny, seeds, whole, tmp_path, monkeypatch
):
    from weightsmith.cli.main import main
    from weightsmith.synth.generation import LocalGenerator

    calls = {"n": 0}
    original = LocalGenerator.complete

    def complete(self, requests, progress=None):
        calls["n"] += 1
        if calls["n"] in (2, 7):  # step 1's answers; step 4's instructions
            raise KeyboardInterrupt
        return original(self, requests, progress)

    monkeypatch.setattr(LocalGenerator, "complete", complete)
    out = tmp_path / "out"
    argv = [*RESUME_ARGS, "--seed", str(seeds), *_common(tiny, out)]
    for _ in range(2):
        assert main(argv) == 130
        assert not (out / "train.jsonl").exists()
    assert main(argv) == 0
    assert _final(out) == _final(whole)


@pytest.mark.slow  # two child processes, each importing torch (~10 s of CPU); the in-process test above is fast
def test_killed_twice_with_sigkill_the_run_ends_as_an_uninterrupted_one(tiny, seeds, whole, tmp_path) -> None:
    from weightsmith.cli.main import main

    args = [*RESUME_ARGS, "--seed", str(seeds)]
    killed = tmp_path / "killed"
    # Every generation call takes at least 0.5 s in the child, so a kill 0.1 s after a step is
    # committed lands inside the next step however fast the machine is.
    slowed = (
        "import sys, time\n"
        "from weightsmith.synth.generation import LocalGenerator as G\n"
        "f = G.complete\n"
        "G.complete = lambda self, *a, **k: (time.sleep(0.5), f(self, *a, **k))[1]\n"
        "from weightsmith.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", slowed, *args, *_common(tiny, killed)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    for step in (1, 3):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_step(proc, killed / "work" / "state.json", step)
            time.sleep(0.1)  # into the next step
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert not (killed / "train.jsonl").exists()
    assert main([*args, *_common(tiny, killed)]) == 0
    assert _final(killed) == _final(whole)
    assert json.loads((killed / "work" / "state.json").read_text())["step"] == 6  # 5 steps + the closing one


def test_a_step_cut_short_is_dropped_on_resume(tmp_path) -> None:
    from weightsmith.synth.store import WorkStore

    store = WorkStore(tmp_path)
    store.commit([{"messages": [], "meta": {}}], [{"reason": "answer_empty"}], cursor={"offset": 1})
    with open(store.paths["kept"], "a") as f:
        f.write('{"half a line of a step that never fin')
    again = WorkStore(tmp_path)
    assert len(again.kept) == 1 and len(again.dropped) == 1 and again.state.step == 1
    assert again.state.cursor == {"offset": 1}
    assert again.paths["kept"].read_text().count("\n") == 1


def test_empty_seed_file_is_one_clear_error_before_anything_is_written(tiny, tmp_path, capsys) -> None:
    empty = tmp_path / "seeds.jsonl"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    code, _, err = run_cli(["synth", "self-instruct", "--seed", empty, *_common(tiny, out)], capsys)
    assert code == 2
    assert f"--seed {empty}: the file has no examples" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_grounded_skips_and_counts_binary_and_unreadable_documents(tiny, tmp_path) -> None:
    from weightsmith.cli.main import main

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    text = "The lighthouse at Kettle Point was built in 1871.\nIts lamp burned whale oil until 1902.\n" * 3
    (docs / "manual.md").write_text(text)
    (docs / "sub" / "faq.jsonl").write_text(
        json.dumps({"text": "Opening hours are nine to five."}) + "\n{oops\n"
    )
    (docs / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "ignored.pdf").write_bytes(b"%PDF")
    out = tmp_path / "out"
    argv = ["synth", "grounded", "--docs", str(docs), "--chunk-tokens", "12", "--overlap", "4",
            "--questions-per-chunk", "2", *_common(tiny, out, "--valid-fraction", "0")]  # fmt: skip
    assert main(argv) == 0
    funnel = json.loads((out / "funnel.json").read_text())
    skipped = {s["file"]: s["reason"] for s in funnel["skipped_documents"]}
    assert skipped == {"image.txt": "binary (holds NUL bytes)", "latin1.txt": "not UTF-8 text (byte 3)",
                       "sub/faq.jsonl:2": "invalid JSON (Expecting property name enclosed in double quotes)"}  # fmt: skip
    rows = _rows(out / "work" / "kept.jsonl") + _rows(out / "work" / "dropped.jsonl")
    sources = {json.dumps(r["meta"]["source"], sort_keys=True) for r in rows}
    files = {json.loads(s)["file"] for s in sources}
    assert files == {"manual.md", "sub/faq.jsonl"}
    for s in map(json.loads, sources):  # every location points at the chunk's text in its file
        if s["file"] == "manual.md":
            a, b = s["chars"]
            assert text[a:b].strip() and s["lines"][0] <= s["lines"][1]
    assert funnel["candidates"] == 2 * len(sources)


def test_evolve_rewrites_round_after_round(tiny, seeds, tmp_path) -> None:
    from weightsmith.cli.main import main

    out = tmp_path / "out"
    argv = [
        "synth",
        "evolve",
        "--data",
        str(seeds),
        "--rounds",
        "2",
        *_common(tiny, out, "--valid-fraction", "0"),
    ]
    assert main(argv) == 0
    kept = _rows(out / "train.jsonl")
    dropped = _rows(out / "work" / "dropped.jsonl")
    for row in kept + dropped:
        meta = row["meta"]
        assert meta["operation"] in ("deepen", "broaden", "concretise") and meta["round"] in (1, 2)
        if meta["round"] == 1:
            assert meta["evolved_from"] in SEEDS
        else:
            assert meta["evolved_from"] in [
                k["messages"][0]["content"] for k in kept if k["meta"]["round"] == 1
            ]
    assert len([r for r in kept + dropped if r["meta"]["round"] == 1]) == len(SEEDS)


def test_rerun_with_other_settings_is_refused(self_instruct: Path, tiny: Path, seeds: Path, capsys) -> None:
    code, _, err = run_cli(["synth", "self-instruct", "--seed", seeds, "--n", "7", "--max-steps", "4",
                            *_common(tiny, self_instruct, "--valid-fraction", "0.3")], capsys)  # fmt: skip
    assert code == 2 and "other settings (n)" in err


def test_an_unknown_evolve_operation_is_a_usage_error(seeds, tmp_path, capsys) -> None:
    code, _, err = run_cli(["synth", "evolve", "--data", seeds, "--operations", "deepen,shrink",
                            "--out", tmp_path / "o"], capsys)  # fmt: skip
    assert code == 2 and "--operations: shrink; choose from deepen, broaden, concretise" in err
    assert not (tmp_path / "o").exists()
