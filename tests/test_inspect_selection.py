"""Choosing the refusal direction (Arditi et al. 2024): the refusal score, packed forward
passes, and a direction planted in a tiny model being the one selected."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_hf_dir, run_cli

import weightsmith as ws
from weightsmith.inspect import InspectError, ProjectOut, run_hooked
from weightsmith.inspect.directions import prompt_ids
from weightsmith.inspect.selection import (
    PromptSets,
    SelectOptions,
    packed_run,
    refusal_score,
    select_direction,
    validation_split,
)

# Harmful prompts end in " fox", whose embedding carries the planted direction; harmless ones do not.
HARMFUL = ["The quick brown fox", "Once upon a time there was a fox", "Hola mundo fox", "a small model and a fox",
           "Bonjour le monde fox", "The lazy dog saw a fox", "Once upon a time a fox", "0123456789 fox"]  # fmt: skip
HARMLESS = ["The quick brown dog", "Once upon a time there was a model", "Hola mundo", "a small model that learned",
            "Bonjour le monde", "The lazy dog jumps", "Once upon a time", "0123456789", "Grüße aus Köln",
            "there was a small talk"]  # fmt: skip


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """A tiny 4-layer Llama whose " fox" embedding holds a unit direction v and whose LM head
    reads v into the logit of "Once" (the refusal token here): (folder, v)."""
    import transformers

    path = build_tiny_hf_dir(tmp_path_factory.mktemp("planted") / "m", num_hidden_layers=4, seed=3)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    fox = {tok.encode(p)[-1] for p in HARMFUL}
    assert len(fox) == 1 and not {tok.encode(p)[-1] for p in HARMLESS} & fox
    v = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(7)), dim=0)
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[fox.pop()] += 2.0 * v
        model.lm_head.weight[tok.encode("Once", add_special_tokens=False)[0]] += 1.0 * v
    model.save_pretrained(path)
    return path, v


@pytest.fixture(scope="module")
def planted(planted_dir):
    """(llm, v, the refusal token's id) for the planted model."""
    llm = ws.load(planted_dir[0], device="cpu")
    return llm, planted_dir[1], llm.tokenizer.encode("Once", add_special_tokens=False)[0]


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    tokens = [4, 17, 30]
    p = torch.softmax(logits.double(), -1)[:, tokens].sum(-1)
    manual = torch.log(p) - torch.log(1 - p)
    torch.testing.assert_close(refusal_score(logits, tokens).double(), manual, atol=1e-4, rtol=1e-5)


def test_packed_rows_equal_one_prompt_at_a_time(planted) -> None:
    llm, v, _ = planted
    rows = [prompt_ids(llm.tokenizer, p, chat=True) for p in HARMFUL[:3] + HARMLESS[:3]]
    names = ["blocks.2.hook_resid_pre", "blocks.3.hook_resid_post"]
    edits = {"blocks.1.hook_mlp_out": [ProjectOut(v)]}
    logits, kept = packed_run(llm.model, rows, edits=edits, keep=names, positions=[-1, -3])
    for i, ids in enumerate(rows):
        one, cache = run_hooked(llm.model, torch.tensor([ids]), edits=edits, keep=names)
        torch.testing.assert_close(logits[i], one[0, -1].float(), atol=1e-4, rtol=1e-4)
        for name in names:
            torch.testing.assert_close(kept[name][i], cache[name][0, [-1, -3]].float(), atol=1e-4, rtol=1e-4)


def test_the_planted_direction_is_selected(planted) -> None:
    llm, v, refusal = planted
    sets = PromptSets(HARMFUL[:5], HARMLESS[:6], HARMFUL[5:], HARMLESS[6:])
    opts = SelectOptions(select=True, positions=[-1, -2, -3], refusal_tokens=["Once"], max_kl=5.0)
    chosen = select_direction(llm.model, llm.tokenizer, sets, opts, chat=False)
    report = chosen.report
    assert chosen.position == -1 and 1 <= chosen.direction.layer <= 2  # 4 layers: 80% leaves 1..2
    d = chosen.direction.at()
    assert float(torch.nn.functional.cosine_similarity(d, v, dim=0)) > 0.9
    best = report["candidates"][0]
    assert (best["layer"], best["position"], best["verdict"]) == (chosen.direction.layer, -1, "chosen")
    assert best["ablate"] < report["plain"]["harmful"] - 1 and best["add"] > report["plain"]["harmless"]
    assert {c["position"] for c in report["candidates"]} == {-1, -2, -3} and len(report["candidates"]) == 6
    assert report["chosen"]["scale"] is not None and chosen.direction.meta["position"] == "-1"
    # the table's ablation score is the refusal score with the direction projected out everywhere
    ids = [llm.tokenizer.encode(p) for p in sets.harmful_val]
    edits = {n: [ProjectOut(d)] for n in ["hook_embed"] + [f"blocks.{i}.hook_{w}_out" for i in range(4) for w in ("attn", "mlp")]}  # fmt: skip
    manual = torch.stack([refusal_score(run_hooked(llm.model, torch.tensor([r]), edits=edits)[0][:, -1], [refusal])
                          for r in ids]).mean()  # fmt: skip
    assert abs(float(manual) - best["ablate"]) < 1e-3


def test_bad_selection_input_is_one_line(planted) -> None:
    llm, _, _ = planted
    sets = PromptSets(HARMFUL[:5], HARMLESS[:6], HARMFUL[5:], HARMLESS[6:])
    with pytest.raises(InspectError, match="positions reach -40 but a harmful fit prompt has only"):
        select_direction(llm.model, llm.tokenizer, sets, SelectOptions(positions=[-1, -40]), chat=False)
    with pytest.raises(InspectError, match="harmless val prompt set is empty"):
        select_direction(
            llm.model, llm.tokenizer, PromptSets(HARMFUL, HARMLESS, HARMFUL, []), SelectOptions()
        )
    with pytest.raises(InspectError, match="no candidate direction passed the filters"):
        select_direction(
            llm.model, llm.tokenizer, sets, SelectOptions(positions=[-1], max_kl=1e-9), chat=False
        )
    for bad, match in ((dict(positions=[0]), "negative positions"), (dict(max_kl=0), "--max-kl"),
                       (dict(validation_fraction=1.0), "--validation-fraction"), (dict(refusal_tokens=[" "]), "empty")):  # fmt: skip
        with pytest.raises(InspectError, match=match):
            SelectOptions(**bad)


def test_validation_split_is_stable() -> None:
    prompts = [f"prompt {i}" for i in range(200)]
    fit, val = validation_split(prompts, 0.3)
    assert sorted(fit + val) == sorted(prompts) and 40 <= len(val) <= 80
    assert validation_split(prompts[::-1], 0.3)[1] == val[::-1]
    assert set(validation_split(prompts, 0.5)[1]) >= set(val)  # a larger share only adds prompts


def test_direction_select_command(planted_dir, tmp_path, capsys) -> None:
    (tmp_path / "pos.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(HARMLESS) + "\n")
    out = tmp_path / "d.safetensors"
    argv = ["inspect", "direction", planted_dir[0], "--positive", tmp_path / "pos.txt", "--negative",
            tmp_path / "neg.txt", "--out", out, "--select", "--positions=-1,-2", "--max-kl", "100", "--raw", "--refusal-tokens", "Once",
            "--validation-fraction", "0.4"]  # fmt: skip
    code, stdout, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    table = json.loads(r["metadata"]["selection"])
    assert r["selection"]["chosen"]["layer"] == r["layer"] == table["chosen"]["layer"] and out.is_file()
    counts = table["counts"]
    assert counts["harmful_fit"] + counts["harmful_val"] == len(HARMFUL)
    assert r["metadata"]["positive_count"] == str(counts["harmful_fit"])
    # a random model never refuses in words: no addition is chosen, and the file says none
    assert (
        "refuses none of the" in r["selection"]["addition"]["skipped"]
        and "recommended_add" not in r["metadata"]
    )
    code, _, err = run_cli([*argv[:-1], "0.4", "--layer", "1"], capsys)
    assert code != 0 and "not both" in err and len(err.strip().splitlines()) == 1
