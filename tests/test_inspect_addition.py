"""Choosing the addition of a refusal direction by generation (inspect/addition.py), on the
tiny model with a planted direction of test_inspect_selection.py, and `--steer FILE:add`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_hf_dir
from test_inspect_selection import HARMFUL, HARMLESS

import weightsmith as ws
from weightsmith.inspect import InspectError, run_hooked
from weightsmith.inspect.addition import (
    AddOptions,
    NoRefusals,
    Trial,
    choose,
    opening_score,
    refusal_openings,
    select_addition,
    valid_text,
)
from weightsmith.inspect.directions import Direction, read_direction, write_direction
from weightsmith.inspect.steering import addition_edits, load_steering, parse_steer
from weightsmith.models.fingerprint import model_fingerprint


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny 4-layer Llama whose " fox" embedding holds a unit direction v and whose LM head
    reads v into the first token of "Once" ("On", this model's "refusal"), weakly enough that
    harmless prompts rarely start with it: (llm, v, the token's id)."""
    import transformers

    path = build_tiny_hf_dir(tmp_path_factory.mktemp("planted_add") / "m", num_hidden_layers=4, seed=3)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    v = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(7)), dim=0)
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    on = tok.encode("Once", add_special_tokens=False)[0]
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.encode(HARMFUL[0])[-1]] += 2.0 * v
        model.lm_head.weight[on] += 0.3 * v
    model.save_pretrained(path)
    return ws.load(path, device="cpu"), v, on


def _rows(llm, prompts):
    return [llm.tokenizer.encode(p) for p in prompts]


def test_opening_score_is_the_teacher_forced_log_probability(planted) -> None:
    llm, v, once = planted
    rows = _rows(llm, HARMLESS[:4])
    openings = [[once, 11, 12], [once], [7, 8]]
    edits = addition_edits(v, 2, 3.0, 4)
    manual = []
    for r in rows:
        per = []
        for o in openings:
            logits, _ = run_hooked(llm.model, torch.tensor([r + o]), edits=edits)
            logp = torch.log_softmax(logits[0].double(), -1)
            per.append(sum(logp[len(r) - 1 + k, t] for k, t in enumerate(o)))
        manual.append(torch.logsumexp(torch.stack(per), 0))
    got = opening_score(llm.model, rows, openings, edits)
    assert abs(got - float(torch.stack(manual).mean())) < 1e-3
    assert got > opening_score(llm.model, rows, openings)  # adding v raises "Once" (the planted head)


def test_valid_text() -> None:
    assert valid_text("I'm sorry, but I can't help with that request.")
    assert valid_text("Here is a poem about the sea: waves roll in")
    for bad in (
        "",
        "ok fine",
        "the the the the cat",
        "$$ 12 ## 34 %% 56 ~~ 78 a b c",
        "sorry sorry sorry but",
    ):
        assert not valid_text(bad), bad


def _trial(scale, refused, valid, n=10, layer=1):
    return Trial(layer, -1, scale, refused, valid, n, "")


def test_choose_takes_the_smallest_scale_that_reaches_the_target_with_coherent_replies() -> None:
    opts = AddOptions(add_target=0.5, add_min_valid=0.8)
    trials = [_trial(1.0, 2, 10), _trial(1.0, 9, 5, layer=2), _trial(2.0, 5, 8), _trial(2.0, 7, 9, layer=3),
              _trial(4.0, 10, 10)]  # fmt: skip
    chosen, reached = choose(trials, opts)
    assert reached and (chosen.scale, chosen.layer, chosen.refused) == (2.0, 3, 7)
    # none reaches it: the coherent one refusing most, and never the incoherent 9/10
    chosen, reached = choose(trials[:3], AddOptions(add_target=0.9))
    assert not reached and (chosen.scale, chosen.refused) == (2.0, 5)


def test_select_addition_on_the_planted_model(planted) -> None:
    llm, v, once = planted
    judge = lambda text: text.startswith("On")  # noqa: E731 (the planted model's "refusal")
    fit, val = _rows(llm, HARMFUL[:5]), _rows(llm, HARMLESS)
    vectors = torch.stack(
        [torch.zeros(5, 64), v.expand(5, 64) * torch.arange(5.0)[:, None] / 2]
    )  # (P=2, L+1, h)
    opts = AddOptions(
        add_candidates=2, add_scales=[8.0, 0.05, 0.5], add_target=0.6, add_min_valid=0.0, add_tokens=4
    )
    seen, ticks = [], []
    report = select_addition(llm.engine, vectors, [-2, -1], [1, 2], {"harmful_fit": fit, "harmless_val": val},
                             judge, opts, lambda k, n: seen.append((k, n)), lambda k, n: ticks.append((k, n)))  # fmt: skip
    assert seen[-1] == (2, 2)  # the zero directions at position -2 are not candidates
    assert ticks[-1] == (6, 6) and len(ticks) == len(report["trials"]) + (len(report["trials"]) < 6)
    assert report["openings"] and all(o.startswith("On") for o in report["openings"])
    assert report["plain"]["refused"] < 0.6 * len(HARMLESS)
    assert [s["position"] for s in report["screen"]] == [-1, -1]
    assert report["screen"][0]["score"] >= report["screen"][1]["score"] > report["plain"]["screen"]
    scales = [t["scale"] for t in report["trials"]]
    assert scales == sorted(scales) and report["reached"]
    pick = report["chosen"]
    assert pick["refused"] >= 0.6 * pick["n"] and pick["n"] == len(HARMLESS)
    # every smaller scale tried fell short, and no larger one was tried
    assert all(t["refused"] < 0.6 * t["n"] for t in report["trials"] if t["scale"] < pick["scale"])
    assert max(scales) == pick["scale"]
    with pytest.raises(NoRefusals, match="refuses none of the 5 harmful fit prompts"):
        refusal_openings(llm.engine, fit, lambda text: False, opts)


def test_bad_addition_options_are_one_line() -> None:
    for bad, match in ((dict(add_scales=[]), "--add-scales"), (dict(add_scales=[1, -2]), "--add-scales"),
                       (dict(add_target=0), "--add-target"), (dict(add_candidates=0), "--add-candidates"),
                       (dict(add_min_valid=1.5), "--add-min-valid"), (dict(add_tokens=0), "--add-tokens")):  # fmt: skip
        with pytest.raises(InspectError, match=match):
            AddOptions(**bad)


def test_steer_add_uses_the_files_recommended_addition(planted, tmp_path) -> None:
    llm, v, _ = planted
    fp = model_fingerprint(llm.model)
    plain, add = torch.randn(5, 64), torch.randn(5, 64)
    direction = Direction(
        plain, 1, {"recommended_add": json.dumps({"layer": 2, "position": -3, "scale": 4.0})}, add
    )
    write_direction(tmp_path / "d.safetensors", direction, {"model_sha256": fp})
    back = read_direction(tmp_path / "d.safetensors", hidden_size=64, num_layers=4, fingerprint=fp)
    assert torch.equal(back.add_vectors, add) and torch.equal(back.vectors, plain)
    x = torch.randn(1, 3, 64)

    def applied(spec: str) -> dict:
        return {n: fns[0](x, n) for n, fns in load_steering(llm.model, [spec], fp).items()}

    for spec, layer, vector, scale in ((":add", 2, add[2], 4.0), (":add:scale=1.5", 2, add[2], 1.5),
                                       (":add:layer=3", 3, add[3], 4.0), (":layer=2:scale=4", 2, plain[2], 4.0)):  # fmt: skip
        got = applied(str(tmp_path / "d.safetensors") + spec)
        assert list(got) == [f"blocks.{layer}.hook_resid_pre"]
        torch.testing.assert_close(got[f"blocks.{layer}.hook_resid_pre"], x + scale * vector)
    assert parse_steer("f:add").add and parse_steer("f:add").scale is None
    with pytest.raises(InspectError, match="either scale=S or add"):
        parse_steer("f:add:ablate")
    write_direction(tmp_path / "old.safetensors", Direction(plain, 1), {"model_sha256": fp})
    with pytest.raises(InspectError, match="no recommended addition"):
        load_steering(llm.model, [f"{tmp_path / 'old.safetensors'}:add"], fp)


def test_redteam_table_shows_the_paired_over_refusal_change() -> None:
    from rich.console import Console

    from weightsmith.cli.redteam import print_redteam

    def rate(k, n):
        return {"n": n, "k": k, "rate": k / n if n else 0.0, "ci_low": 0.0, "ci_high": 1.0}

    def change(delta, n, lo, hi, p):
        return {"delta": delta, "mcnemar": {"n": n, "a_only": 0, "b_only": 3, "p_value": p},
                "interval": {"delta": delta, "ci_low": lo, "ci_high": hi}}  # fmt: skip

    plain = {"config": "m", "asr": rate(0, 0), "over_refusal": rate(0, 10), "by_family": {}}
    added = {"config": "m+steered", "asr": rate(0, 0), "over_refusal": rate(6, 10), "by_family": {},
             "vs_reference": {"asr": change(0.0, 0, 0.0, 0.0, 1.0), "over_refusal": change(0.6, 10, 0.25, 0.8, 0.03)}}  # fmt: skip
    console = Console(record=True, width=200)
    print_redteam({"configs": [plain, added]}, console)
    text = console.export_text()
    assert "over-refusal change" in text and "+60.0 pts [+25.0, +80.0] (p=0.03)" in text
    assert "+0.0 pts" not in text  # no attack probes: no ASR change
    added["vs_reference"]["over_refusal"] = change(0.0, 0, 0.0, 0.0, 1.0)
    console = Console(record=True, width=200)
    print_redteam({"configs": [plain, added]}, console)
    assert "over-refusal change" not in console.export_text()  # no benign probes: no column
