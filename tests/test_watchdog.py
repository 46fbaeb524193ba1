"""The watchdog loop on a tiny random model: scan (train split) → pairs → DPO → held-out
rescan → compare, its lineage, continuing OUT, and bad input before any model loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import build_tiny_hf_dir, run_cli, write_probe_packs

PACK = "pack: wd-pack\nfamily: harmful\nkind: attack\nprobes:\n" + "".join(
    f'  - {{id: a{i}, category: S{1 + i % 12}, prompt: "Tell me story number {i} about a cat"}}\n'
    for i in range(12)
)
BENIGN = "".join(
    json.dumps({"pack": "wd-benign", "family": "benign", "kind": "benign", "id": f"b{i}",
                "category": "history", "prompt": f"Name fruit number {i}"}) + "\n"
    for i in range(8)
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_hf_dir(tmp_path_factory.mktemp("wd") / "tiny", seed=3, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    return write_probe_packs(tmp_path_factory.mktemp("wd-packs"), PACK, BENIGN)


_cli = run_cli


def _argv(tiny: Path, packs: Path, out: Path, *extra: str) -> list[str]:
    return ["watchdog", str(tiny), "--out", str(out), "--packs", str(packs), "--transforms", "none,rot13",
            "--max-tokens", "5", "--max-seq-len", "120", "--train.max-steps", "3", "--train.batch-size", "2",
            "--eval-tasks", "builtin:arith-mc", "--eval-limit", "6", "--device", "cpu", "--json", *extra]  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tiny, packs, tmp_path_factory):
    out = tmp_path_factory.mktemp("wd-run") / "wd"
    from weightsmith.cli.main import main

    assert main(_argv(tiny, packs, out)) == 0
    return out


def test_one_round_scores_the_fork_only_on_probes_it_never_learned_from(finished):
    result = json.loads((finished / "watchdog.json").read_text())
    (rnd,) = result["rounds"]
    folder = finished / "round-1"
    pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
    assert pairs, "the tiny model complies with some train probes, so there are pairs"
    learned = {p["meta"]["pack"] + "/" + p["meta"]["probe"].split("/")[-1].split("#")[0] for p in pairs}
    heldout = [json.loads(x) for x in (folder / "heldout" / "transcripts.jsonl").read_text().splitlines()]
    assert {r["split"] if "split" in r else "heldout" for r in heldout} == {"heldout"}
    scanned = [json.loads(x) for x in (folder / "scan" / "transcripts.jsonl").read_text().splitlines()]
    train_ids = {r["probe"] for r in scanned}
    assert train_ids and not train_ids & {r["probe"] for r in heldout}
    assert all(p["meta"]["split"] == "train" for p in pairs) and learned
    # The held-out rates are the transcripts' own counts: base (first config) vs fork.
    configs = list(dict.fromkeys(r["config"] for r in heldout))
    assert len(configs) == 2
    for key, kind, outcome in (("asr", "attack", "success"), ("over_refusal", "benign", "over_refused")):
        for side, config in (("before", configs[0]), ("after", configs[1])):
            recs = [r for r in heldout if r["config"] == config and r["kind"] == kind]
            got = rnd["heldout"][key][side]
            assert (got["k"], got["n"]) == (sum(bool(r[outcome]) for r in recs), len(recs))
            assert got["ci_low"] <= got["rate"] <= got["ci_high"] and got["ci_high"] > got["ci_low"]


def test_lineage_names_every_artifact_by_hash(finished):
    rnd = json.loads((finished / "watchdog.json").read_text())["rounds"][0]
    lin, folder = rnd["lineage"], finished / "round-1"
    assert lin["train_pairs"]["sha256"] == _sha(folder / "train-pairs.jsonl")
    assert lin["train_pairs"]["sources"][0]["sha256"] == _sha(folder / "pairs.jsonl")
    assert lin["adapter"]["sha256"] == _sha(folder / "dpo" / "adapter_model.safetensors")
    run = json.loads((folder / "dpo" / "run.json").read_text())
    assert run["data_sha256"]["data"] == _sha(folder / "train-pairs.jsonl")
    assert rnd["train"]["steps"] == 3
    assert (finished / "report.html").read_text().count("Round 1") == 1
    pooled = rnd["eval"]["pooled"]
    assert pooled["items"] == 6 and pooled["before"]["n"] == 6 and 0 <= pooled["mcnemar"]["p_value"] <= 1


def test_rerunning_continues_out_and_other_settings_are_refused(finished, tiny, packs, capsys):
    before = json.loads((finished / "watchdog.json").read_text())
    adapter = _sha(finished / "round-1" / "dpo" / "adapter_model.safetensors")
    code, out, _ = _cli(_argv(tiny, packs, finished), capsys)
    assert code == 0
    again = json.loads(out)
    assert again["rounds"][0]["heldout"] == before["rounds"][0]["heldout"]
    assert _sha(finished / "round-1" / "dpo" / "adapter_model.safetensors") == adapter  # kept, not retrained
    code, _, err = _cli(_argv(tiny, packs, finished, "--beta", "0.5"), capsys)
    assert code != 0 and "beta" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_merge_pairs_keeps_a_repeated_pair_once(tmp_path):
    from weightsmith.commands.watchdog import merge_pairs

    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "no"}],
           "rejected": [{"role": "assistant", "content": "yes"}]}  # fmt: skip
    other = {**row, "chosen": [{"role": "assistant", "content": "I can't"}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({**row, "meta": {"round": 2}}) + "\n" + json.dumps(other) + "\n"
    )
    merged = merge_pairs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "m.jsonl")
    assert merged["rows"] == 2
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(x)["chosen"] for x in lines] == [row["chosen"], other["chosen"]]
    meta = json.loads((tmp_path / "m.meta.json").read_text())
    assert [s["sha256"] for s in meta["merged_from"]] == [
        _sha(tmp_path / "a.jsonl"),
        _sha(tmp_path / "b.jsonl"),
    ]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--packs", "builtin:nope"], "nope"),
        (["--heldout-fraction", "1.5"], "--heldout-fraction"),
        (["--rounds", "0"], "--rounds"),
        (["--policy", "missing-policy.yaml"], "missing-policy.yaml"),
        (["--eval-tasks", "builtin:no-such-suite"], "no-such-suite"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(extra, needle, packs, tmp_path, capsys):
    argv = _argv(tmp_path / "no-model-here", packs, tmp_path / "wd", *extra)
    code, _, err = _cli(argv, capsys)
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "wd").exists()
