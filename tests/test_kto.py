"""The kto command on a tiny random model: it learns which completions are wanted, writes dpo's
outputs and lineage, precomputed references give the same run, apo_zero_unpaired runs no KL
pass, a SIGKILLed run resumes exactly, pairs are read as their two examples, KL partners answer
other prompts, and bad input stops before any model loads."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from test_dpo import _cli, losses_of, pair_rows, run_config, write_jsonl

from weightsmith.cli.main import main
from weightsmith.train import kto as kto_module
from weightsmith.train.kto import KtoConfig, run_kto
from weightsmith.train.runs import read_metrics
from weightsmith.train.unpaired_data import UnpairedExample, kl_partners, read_unpaired

TRAIN = {"lr": 5e-3, "max_steps": 8, "batch_size": 4, "eval_every": 4, "save_every": 4, "seed": 3}


def feedback_rows(n: int = 24) -> list[dict]:
    """Single completions: the chosen answers of `pair_rows` marked good, the rejected ones bad,
    alternating, so no prompt has both."""
    rows = []
    for i, pair in enumerate(pair_rows(n)):
        good = i % 2 == 0
        rows.append(
            {"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good}
        )
    return rows


def kto_config(model: Path, data: Path, out: Path, **fields) -> KtoConfig:
    return run_config(KtoConfig, model, data, out, TRAIN, **fields)


@pytest.fixture(scope="module")
def feedback(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kto") / "feedback.jsonl", feedback_rows())


def test_lora_run_learns_which_completions_are_wanted(tiny_hf_dir, feedback, tmp_path):
    out = tmp_path / "run"
    result = run_kto(
        kto_config(tiny_hf_dir, feedback, out, train={"max_steps": 30, "lr": 1e-2, "eval_every": 10})
    )
    outputs = "adapter_config.json adapter_model.safetensors config.yaml metrics.jsonl loss.png run.json"
    assert all((out / name).is_file() for name in outputs.split()), sorted(p.name for p in out.iterdir())
    losses = losses_of(out)
    # policy == reference at the start (up to bf16 rounding): log-ratios and z0 are 0, each loss 1 - sigmoid(0)
    assert len(losses) == 30 and losses[0] == pytest.approx(0.5, abs=1e-3)
    kl = losses_of(out, "kl")
    assert kl[0] < 0.02 and max(kl) > 10 * kl[0] and max(kl) > 0
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    chosen, rejected = losses_of(out, "reward_chosen"), losses_of(out, "reward_rejected")
    assert sum(chosen[-5:]) / 5 > 0 > sum(rejected[-5:]) / 5  # a step without bad examples logs none
    final = result["metrics"]
    assert final["val_reward_chosen"] > final["val_reward_rejected"] and "val_ppl" not in final
    assert result["reference"] == "adapters disabled" and result["loss"] == "kto"
    assert result["data"]["train"]["examples"] + result["data"]["valid"]["examples"] == 24
    assert len(json.loads((out / "run.json").read_text())["data_sha256"]["data"]) == 64
    assert json.loads((out / "lineage.json").read_text())["kind"] == "kto"
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import load_adapter

    load_adapter(load_checkpoint(tiny_hf_dir, decode_layout=False).model, out)  # a PEFT-format adapter


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_precomputed_reference_gives_the_same_run(tiny_hf_dir, feedback, tmp_path, method):
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"run-{precompute}"
        cfg = kto_config(tiny_hf_dir, feedback, out, method=method, precompute_ref=precompute,
                         train={"max_steps": 4, "precision": "fp32"})  # fmt: skip
        runs[precompute] = run_kto(cfg)
    assert runs[True]["reference"] == "precomputed"
    assert runs[False]["reference"] == ("frozen copy" if method == "full" else "adapters disabled")
    assert (tmp_path / "run-True" / "reference_logps.safetensors").is_file()
    a, b = (read_metrics(tmp_path / f"run-{p}" / "metrics.jsonl") for p in (False, True))
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kl", "val_loss", "val_kl", "reward_chosen"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (key, x["step"])


def test_apo_zero_unpaired_runs_no_kl_pass_and_learns(tiny_hf_dir, feedback, tmp_path, monkeypatch):
    calls = []
    real = kto_module.pair_log_probs
    monkeypatch.setattr(kto_module, "pair_log_probs", lambda m, b, **k: calls.append(b) or real(m, b, **k))
    out = tmp_path / "apo"
    run_kto(
        kto_config(tiny_hf_dir, feedback, out, loss="apo_zero_unpaired", train={"max_steps": 12, "lr": 1e-2})
    )
    assert calls and all(not (b.segments == 2).any() for b in calls)  # no KL completion scored
    assert set(losses_of(out, "kl")) == {0.0}
    assert losses_of(out, "reward_chosen")[-1] > losses_of(out, "reward_rejected")[-1]


def test_resume_after_sigkill_gives_the_uninterrupted_losses(tiny_hf_dir, feedback, tmp_path):
    from test_finetune import _losses_after, _run_until_checkpoint

    steps = 48
    train = {"max_steps": steps, "save_every": 2, "eval_every": 0}
    reference = tmp_path / "ref"
    run_kto(kto_config(tiny_hf_dir, feedback, reference, train=train))
    cut = tmp_path / "cut"
    flags = [f"--train.{key.replace('_', '-')}={value}" for key, value in {**TRAIN, **train}.items()]
    lora = ["--lora.rank", "4", "--lora.alpha", "8", "--lora.dropout", "0.0"]
    args = ["kto", str(tiny_hf_dir), f"--data={feedback}", f"--out={cut}", "--max-seq-len=64", *flags, *lora]
    proc = _run_until_checkpoint(_cli(*args), cut / "checkpoints", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name[5:]) for p in (cut / "checkpoints").glob("step-*"))
    assert done and done[-1] < steps, "the run finished before it was interrupted"
    assert main(["kto", "--resume", str(cut)]) == 0
    ref_losses, cut_losses = (_losses_after(o / "metrics.jsonl", done[-1]) for o in (reference, cut))
    assert sorted(cut_losses) == list(range(done[-1] + 1, steps + 1))
    for step, loss in ref_losses.items():
        assert abs(cut_losses[step] - loss) <= 1e-6, step


# ----- data -------------------------------------------------------------------------------------------


def test_a_pairs_file_is_read_as_its_two_examples(tmp_path):
    pairs = pair_rows(3)
    records = read_unpaired(write_jsonl(tmp_path / "pairs.jsonl", pairs))
    assert [(r.prompt, r.completion, r.label) for r in records] == [
        (p["prompt"], p[key], key == "chosen") for p in pairs for key in ("chosen", "rejected")
    ]
    assert records[0].source == records[1].source == f"{tmp_path / 'pairs.jsonl'}:1"


def test_kl_partners_answer_other_prompts_and_follow_the_seed():
    prompts = [[1, 2], [1, 2], [3], [4, 5], [4, 5], [6], [7], [8]]  # a pair's two examples share one
    examples = [UnpairedExample(p, [9 + i], True) for i, p in enumerate(prompts)]
    partners = kl_partners(examples, seed=0)
    assert all(examples[j].prompt != examples[i].prompt for i, j in enumerate(partners))
    assert partners == kl_partners(examples, seed=0) and partners != kl_partners(examples, seed=1)
    assert len(set(partners)) >= 6  # spread over the data, not one completion for all
    same = [UnpairedExample([1], [i], True) for i in range(3)]  # one prompt only: the next one serves
    assert sorted(kl_partners(same, 0)) == [0, 1, 2] and all(
        i != j for i, j in enumerate(kl_partners(same, 0))
    )


def _row(**fields) -> dict:
    return {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo."}],
            "label": True, **fields}  # fmt: skip


BAD = {  # a bad line after good ones, and the start of the error it must give
    "no label": ({k: v for k, v in _row().items() if k != "label"}, "label: missing"),
    "label a string": (_row(label="yes"), "label: must be true (a completion to encourage) or false"),
    "label a number": (_row(label=1), "label: must be true"),
    "empty completion": ({"prompt": "Hi", "completion": " ", "label": True}, "completion: empty"),
    "mixed formats": ({"prompt": "Hi", "completion": "Yo.", "label": True}, "this line is text but"),
    "user turn": (
        _row(completion=[{"role": "user", "content": "x"}]),
        "completion: messages[0] has role 'user'",
    ),
    "a pair among examples": (pair_rows(1)[0], "this line is paired conversational but"),
    "no room": (_row(prompt=[{"role": "user", "content": "fox " * 80}]), "prompt: "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_examples_stop_before_any_model_loads(tiny_hf_dir, tmp_path, capsys, monkeypatch, case):
    import weightsmith.checkpoint.load as load

    row, message = BAD[case]
    data = write_jsonl(tmp_path / "feedback.jsonl", [*feedback_rows(2), row])
    monkeypatch.setattr(load, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    code = main(["kto", str(tiny_hf_dir), "--data", str(data), "--out", str(out), "--max-seq-len", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert f"{data}:3: {message}" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--desirable-weight", "0"], "--desirable-weight 0.0: must be above 0"),
        (["--undesirable-weight", "-1"], "--undesirable-weight -1.0: must be above 0"),
        (["--beta", "0"], "--beta 0.0: must be greater than 0"),
        (["--loss", "sigmoid"], "--loss"),
    ],
)
def test_bad_options_are_refused_in_one_line(tiny_hf_dir, feedback, tmp_path, capsys, flags, message):
    code = main(["kto", str(tiny_hf_dir), "--data", str(feedback), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and "\n" not in err, err


def test_uneven_data_gets_the_weights_the_paper_advises(tiny_hf_dir, tmp_path, caplog):
    rows = feedback_rows(24)
    rows = [r for r in rows if r["label"]] + [r for r in rows if not r["label"]][:3]  # 12 good, 3 bad
    cfg = kto_config(tiny_hf_dir, write_jsonl(tmp_path / "f.jsonl", rows), tmp_path / "o", valid_fraction=0.0)
    from weightsmith.checkpoint.load import load_checkpoint

    with caplog.at_level("WARNING"):
        train, _, stats = kto_module.load_examples(cfg, load_checkpoint(tiny_hf_dir).tokenizer)
    assert (stats["train"]["desirable"], stats["train"]["undesirable"]) == (12, 3)
    # lambda_D x 12 / (lambda_U x 3) within [1, 4/3]: lambda_D in [0.25, 0.333] or lambda_U in [3, 4]
    assert "--desirable-weight within [0.25, 0.333] or --undesirable-weight within [3, 4]" in caplog.text
    assert isinstance(train.batch([0, 1]).labels, torch.Tensor)


@pytest.mark.parametrize("command", ["kto", "reward"])
def test_reproduce_gives_the_same_adapter(tiny_hf_dir, feedback, tmp_path, capsys, command):
    data = feedback if command == "kto" else write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    out = tmp_path / "run"
    args = [command, str(tiny_hf_dir), "--data", str(data), "--out", str(out), "--max-seq-len", "64",
            "--train.max-steps", "2", "--train.batch-size", "2", "--lora.rank", "2"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["reproduce", str(out), "--out", str(again), "--root", str(tmp_path), "--json"]) == 0
    status = {o["path"]: o["status"] for o in json.loads(capsys.readouterr().out)["outputs"]}
    assert status["adapter_model.safetensors"] == "identical", status
