"""The dpo command on a tiny random model: outputs and lineage, every method and reference,
the chunked log-prob head, precomputed references, gradient accumulation over pairs, exact
resume after SIGKILL, the data formats (arena export, red-team pairs, implicit prompts, text),
truncation, and bad input stopped before any model loads."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from weightsmith.cli.main import main
from weightsmith.config import config_from_dict, dump_config_yaml
from weightsmith.errors import WeightsmithError
from weightsmith.train.data import DataError
from weightsmith.train.dpo import DpoConfig, run_dpo
from weightsmith.train.preference_data import PairExample, read_pairs, tokenize_pairs, truncate_pair
from weightsmith.train.runs import read_metrics

WORDS = ["fox", "dog", "model", "time", "world", "quick", "lazy", "small"]


def pair_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Pairs whose chosen answer follows one pattern and whose rejected answer another."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"{a} {b}?"}],
                "chosen": [{"role": "assistant", "content": f"The {a} jumps over the lazy dog."}],
                "rejected": [{"role": "assistant", "content": f"No {b}, {a} {a}."}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


TRAIN = {"lr": 5e-3, "max_steps": 8, "batch_size": 4, "eval_every": 4, "save_every": 4, "seed": 3}


def run_config(cls: type, model: Path, data: Path, out: Path, defaults: dict, **fields) -> Any:
    """A `cls` run config on the tiny model (rows up to 64 tokens, a rank-4 LoRA): the loop
    options `defaults`, updated by `fields["train"]`."""
    values = {
        "model": str(model),
        "data": str(data),
        "out": str(out),
        "max_seq_len": 64,
        "train": {**defaults, **fields.pop("train", {})},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        **fields,
    }
    return config_from_dict(cls, values)


def dpo_config(model: Path, data: Path, out: Path, **fields) -> DpoConfig:
    return run_config(DpoConfig, model, data, out, TRAIN, **fields)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows())


def losses_of(out: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in read_metrics(out / "metrics.jsonl") if key in m]


def test_lora_run_writes_outputs_lineage_and_learns_the_preference(tiny_hf_dir, pairs, tmp_path):
    out = tmp_path / "run"
    result = run_dpo(
        dpo_config(tiny_hf_dir, pairs, out, train={"max_steps": 30, "lr": 1e-2, "eval_every": 10})
    )
    outputs = "adapter_config.json adapter_model.safetensors config.yaml metrics.jsonl loss.png run.json"
    assert all((out / name).is_file() for name in outputs.split()), sorted(p.name for p in out.iterdir())
    losses = losses_of(out)
    assert len(losses) == 30 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at start
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert losses_of(out, "reward_accuracy")[-1] > 0.7 and losses_of(out, "reward_margin")[-1] > 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "val_loss" in m] == [0, 10, 20, 30]
    final = result["metrics"]
    assert final["val_reward_accuracy"] > 0.5 and "val_ppl" not in final
    assert final["val_reward_chosen"] > final["val_reward_rejected"]
    assert result["reference"] == "adapters disabled" and result["loss"] == "dpo"
    assert result["data"]["train"]["examples"] + result["data"]["valid"]["examples"] == 24
    lineage = json.loads((out / "run.json").read_text())
    assert len(lineage["data_sha256"]["data"]) == 64 and "data_meta" not in lineage
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import load_adapter

    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    load_adapter(model, out)  # a PEFT-format adapter


@pytest.mark.parametrize(
    ("method", "precompute", "reference"),
    [
        ("lora", True, "precomputed"),
        ("qlora", False, "adapters disabled"),
        ("full", False, "frozen copy"),
        ("full", True, "precomputed"),
    ],
)
def test_every_method_and_reference_trains(tiny_hf_dir, pairs, tmp_path, method, precompute, reference):
    out = tmp_path / "run"
    lr = 1e-3 if method == "full" else 1e-2
    result = run_dpo(
        dpo_config(tiny_hf_dir, pairs, out, method=method, precompute_ref=precompute, train={"lr": lr})
    )
    assert result["reference"] == reference
    losses = losses_of(out)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0]
    assert (out / "reference_logps.safetensors").is_file() == precompute
    assert (out / ("model" if method == "full" else "adapter_model.safetensors")).exists()


@pytest.mark.parametrize(("loss", "method"), [("simpo", "lora"), ("orpo", "full")])
def test_reference_free_losses_learn_the_preference_without_a_reference(
    tiny_hf_dir, pairs, tmp_path, monkeypatch, loss, method
):
    """SimPO and ORPO run no reference model (no adapters-off forward, no frozen copy) and
    widen the chosen answers' lead in mean token log-probability."""
    from weightsmith.train import dpo

    monkeypatch.setattr(dpo, "reference_log_probs", lambda *a, **k: pytest.fail("a reference forward ran"))
    out = tmp_path / "run"
    beta = 2.0 if loss == "simpo" else 0.5
    result = run_dpo(
        dpo_config(
            tiny_hf_dir,
            pairs,
            out,
            method=method,
            loss=loss,
            beta=beta,
            train={"lr": 1e-3 if method == "full" else 1e-2, "max_steps": 20},
        )  # fmt: skip
    )
    assert result["reference"] == "none" and result["sft_weight"] == (1.0 if loss == "orpo" else 0.0)
    margins = losses_of(out, "reward_margin")
    assert margins[-1] > margins[0] + 0.05 and losses_of(out)[-1] < losses_of(out)[0]
    if loss == "orpo":  # its NLL term keeps the chosen answers likely: their log-probs rise
        chosen = losses_of(out, "logps_chosen")
        assert chosen[-1] > chosen[0] and losses_of(out, "nll_chosen")[-1] < losses_of(out, "nll_chosen")[0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_precomputed_reference_gives_the_same_run(tiny_hf_dir, pairs, tmp_path, method):
    """Reference log-probs computed once up front equal those computed each step (a LoRA model
    with adapters off, a frozen copy for full fine-tuning)."""
    lr = 1e-3 if method == "full" else 1e-2
    runs = []
    for precompute in (False, True):
        out = tmp_path / f"pre-{precompute}"
        run_dpo(
            dpo_config(
                tiny_hf_dir,
                pairs,
                out,
                method=method,
                precompute_ref=precompute,
                train={"lr": lr, "precision": "fp32"},
            )
        )
        runs.append((losses_of(out), losses_of(out, "val_loss")))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4, abs=1e-5)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-4, abs=1e-5)


def test_gradient_accumulation_averages_over_pairs(tiny_hf_dir, pairs, tmp_path):
    """The step's loss is the mean over its pairs, so 2 micro-batches of 2 pairs equal 1 of 4."""
    run_dpo(dpo_config(tiny_hf_dir, pairs, tmp_path / "a", train={"max_steps": 3, "precision": "fp32"}))
    run_dpo(
        dpo_config(
            tiny_hf_dir,
            pairs,
            tmp_path / "b",
            train={"max_steps": 3, "batch_size": 2, "grad_accum": 2, "precision": "fp32"},
        )
    )
    for key in ("loss", "reward_margin", "reward_accuracy", "grad_norm"):
        assert losses_of(tmp_path / "a", key) == pytest.approx(
            losses_of(tmp_path / "b", key), rel=1e-5, abs=1e-6
        )


@pytest.mark.parametrize("trainable", ["hidden", "everything"])
def test_chunked_log_probs_equal_log_softmax(tiny_hf_dir, trainable, monkeypatch):
    """The chunked head returns log_softmax(h W^T)[t] and its gradients, for hidden states
    (LoRA) and for a trainable head weight (full fine-tuning), under per-row upstream gradients."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.train import losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 320 * 3)  # several chunks of 3 rows on the tiny vocab
    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    model.requires_grad_(trainable == "everything")
    wrt = [model.model.norm.weight, model.lm_head.weight] if trainable == "everything" else []
    torch.manual_seed(0)
    h = torch.randn(10, model.config.hidden_size, requires_grad=True)
    targets = torch.randint(model.config.vocab_size, (10,))
    upstream = torch.randn(10)  # each row its own dLoss/dlogp, as each answer gets in DPO

    def fused(normed: torch.Tensor) -> torch.Tensor:
        return losses.linear_log_probs(normed, model.lm_head.weight, targets)

    def plain(normed: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(model.lm_head(normed), -1).gather(1, targets[:, None]).squeeze(1)

    values = {fn: fn(model.model.norm(h)) for fn in (fused, plain)}
    grads = {fn: torch.autograd.grad((v * upstream).sum(), [h, *wrt]) for fn, v in values.items()}
    torch.testing.assert_close(values[fused], values[plain], rtol=1e-5, atol=1e-5)
    assert len(grads[fused]) == (1 if trainable == "hidden" else 3)  # h, and the norm and head weights
    for a, b in zip(grads[fused], grads[plain], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the reference's path: no graph, the same chunks
        torch.testing.assert_close(fused(model.model.norm(h)), values[plain].detach())
    # each row's entropy on the side (GRPO's metric), on the graph's path and the no-graph one
    probs = F.softmax(model.lm_head(model.model.norm(h)).detach(), -1)
    want = -(probs * probs.log()).sum(-1)
    for grad in (True, False):
        entropy = torch.full((10,), float("nan"))
        with torch.set_grad_enabled(grad):
            got = losses.linear_log_probs(model.model.norm(h), model.lm_head.weight, targets, entropy)
        torch.testing.assert_close(got.detach(), values[plain].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, want, rtol=1e-5, atol=1e-5)


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "weightsmith.cli.main", *args]


def test_resume_after_sigkill_gives_the_uninterrupted_losses(tiny_hf_dir, pairs, tmp_path):
    from test_finetune import _losses_after, _run_until_checkpoint

    steps = 48
    train = {"max_steps": steps, "save_every": 2, "eval_every": 0}
    reference = tmp_path / "ref"
    run_dpo(dpo_config(tiny_hf_dir, pairs, reference, train=train))  # in process, the cut one by the CLI
    cut = tmp_path / "cut"
    flags = [f"--train.{key.replace('_', '-')}={value}" for key, value in {**TRAIN, **train}.items()]
    lora = ["--lora.rank", "4", "--lora.alpha", "8", "--lora.dropout", "0.0"]
    args = ["dpo", str(tiny_hf_dir), f"--data={pairs}", f"--out={cut}", "--max-seq-len=64", *flags, *lora]
    proc = _run_until_checkpoint(_cli(*args), cut / "checkpoints", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "adapter_model.safetensors").exists()
    done = sorted(int(p.name[5:]) for p in (cut / "checkpoints").glob("step-*"))
    assert done and done[-1] < steps, "the run finished before it was interrupted"
    assert main(["dpo", "--resume", str(cut)]) == 0
    ref_losses = _losses_after(reference / "metrics.jsonl", done[-1])
    cut_losses = _losses_after(cut / "metrics.jsonl", done[-1])
    assert sorted(cut_losses) == list(range(done[-1] + 1, steps + 1))
    for step, loss in ref_losses.items():
        assert abs(cut_losses[step] - loss) <= 1e-6, step


# ----- data -------------------------------------------------------------------------------------------


def test_arena_export_is_read_as_it_is_and_its_meta_goes_into_the_lineage(tiny_hf_dir, tmp_path):
    from weightsmith.arena.battles import export_preferences
    from weightsmith.arena.records import Battle, Vote

    battles, votes = [], []
    for i, row in enumerate(pair_rows(12)):
        good, bad = row["chosen"][0]["content"], row["rejected"][0]["content"]
        battles.append(
            Battle(f"b{i}", "base", "fork", row["prompt"], good if i % 2 else bad, bad if i % 2 else good)
        )
        votes.append(Vote(f"b{i}", "b" if i % 2 == 0 else "a", "human"))
    data = tmp_path / "arena-pairs.jsonl"
    export_preferences(data, battles, votes, source_sha256="0" * 64, source="arena.sqlite")
    out = tmp_path / "run"
    run_dpo(dpo_config(tiny_hf_dir, data, out, train={"max_steps": 2}))
    lineage = json.loads((out / "run.json").read_text())
    meta = lineage["data_meta"]["data"]
    assert meta["path"].endswith("arena-pairs.meta.json") and len(meta["sha256"]) == 64
    assert meta["content"]["battle_ids"] == [f"b{i}" for i in range(12)]


def test_red_team_pairs_with_meta_and_other_extra_keys_are_read(tmp_path):
    rows = [{**r, "meta": {"probe": "p1", "severity": 3}, "id": i} for i, r in enumerate(pair_rows(3))]
    records = read_pairs(write_jsonl(tmp_path / "rt.jsonl", rows))
    assert [r.prompt for r in records] == [r["prompt"] for r in rows]
    assert [r.chosen for r in records] == [r["chosen"] for r in rows]


def test_implicit_prompts_are_the_shared_start(tiny_hf_dir, tmp_path):
    from weightsmith.checkpoint.load import load_checkpoint

    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "fox?"}
    rows = [
        {
            "chosen": [system, user, {"role": "assistant", "content": "The fox."}],
            "rejected": [system, user, {"role": "assistant", "content": "No."}],
        }
    ]
    (conv,) = read_pairs(write_jsonl(tmp_path / "conv.jsonl", rows))
    assert conv.prompt == [system, user] and conv.chosen == [{"role": "assistant", "content": "The fox."}]
    (text,) = read_pairs(
        write_jsonl(tmp_path / "text.jsonl", [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: red"}])
    )
    assert (text.prompt, text.chosen, text.rejected) == ("Q: sky? A:", " blue", " red")
    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    (ex,), _ = tokenize_pairs([text], tokenizer, max_seq_len=64)
    assert ex.chosen[-1] == tokenizer.eos_token_id and ex.rejected[-1] == tokenizer.eos_token_id


def test_truncation_cuts_the_prompt_from_the_left_then_the_answers():
    ex = PairExample(list(range(10)), [100, 101, 102, 103], [200, 201], "f.jsonl:1")
    cut = truncate_pair(ex, max_seq_len=8, max_prompt_len=5)
    assert cut.prompt == [5, 6, 7, 8, 9] and cut.chosen == [100, 101, 102] and cut.rejected == [200, 201]
    assert truncate_pair(ex, max_seq_len=20, max_prompt_len=None) == ex
    with pytest.raises(DataError, match=r"^f\.jsonl:1: prompt: 10 tokens leave no room for an answer"):
        truncate_pair(ex, max_seq_len=10, max_prompt_len=None)


def _conversation(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


BAD = {  # a bad line after good ones, and the start of the error it must give
    "identical": (_conversation("Hi", "Same.", "Same."), "rejected: identical to chosen"),
    "empty answer": (_conversation("Hi", "  ", "No."), "chosen: empty answer"),
    "no room": (_conversation("fox " * 80, "yes", "no"), "prompt: "),
    "mixed formats": ({"prompt": "Hi", "chosen": "Yes.", "rejected": "No."}, "chosen: this line is text but"),
    "missing key": ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": []}, "rejected: missing"),
    "answer with a user turn": (
        {**_conversation("Hi", "Yes.", "No."), "chosen": [{"role": "user", "content": "Yes."}]},
        "chosen: messages[0] has role 'user'",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pairs_stop_before_any_model_loads(tiny_hf_dir, tmp_path, capsys, monkeypatch, case):
    import weightsmith.checkpoint.load as load

    row, message = BAD[case]
    good = pair_rows(2)
    lines = [good[0], good[1], row]
    data = write_jsonl(tmp_path / "pairs.jsonl", lines)
    monkeypatch.setattr(load, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    code = main(["dpo", str(tiny_hf_dir), "--data", str(data), "--out", str(out), "--max-seq-len", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert f"{data}:3: {message}" in err and "\n" not in err
    if case == "no room":
        assert "leave no room for an answer within --max-seq-len 64" in err
    assert not out.exists()


def test_a_chat_template_that_cannot_render_a_pair_is_named(tmp_path, capsys, monkeypatch):
    from conftest import build_tiny_hf_dir

    import weightsmith.checkpoint.load as load

    path = build_tiny_hf_dir(tmp_path / "strict")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}"
        "{{ raise_exception('this template refuses the word forbidden') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    rows = pair_rows(3)
    rows[2]["rejected"] = [{"role": "assistant", "content": "a forbidden answer"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    monkeypatch.setattr(load, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()  # building the checkpoint wrote progress bars
    assert main(["dpo", str(path), "--data", str(data), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{data}:3: rejected: " in err and "refuses the word forbidden" in err and "\n" not in err


def test_config_checks_and_resume_refusals(tiny_hf_dir, pairs, tmp_path, capsys):
    with pytest.raises(WeightsmithError, match="--precompute-ref: --loss simpo runs no reference model"):
        dpo_config(tiny_hf_dir, pairs, tmp_path, loss="simpo", precompute_ref=True)
    with pytest.raises(WeightsmithError, match="--loss exo_pair needs --label-smoothing above 0"):
        dpo_config(tiny_hf_dir, pairs, tmp_path, loss="exo_pair")
    with pytest.raises(
        WeightsmithError, match="label-smoothing applies to --loss dpo, robust, simpo or exo_pair"
    ):
        dpo_config(tiny_hf_dir, pairs, tmp_path, loss="ipo", label_smoothing=0.1)
    with pytest.raises(WeightsmithError, match="--beta"):
        dpo_config(tiny_hf_dir, pairs, tmp_path, beta=0)
    with pytest.raises(WeightsmithError, match="--sft-weight -1.0: must be between 0 and 100"):
        dpo_config(tiny_hf_dir, pairs, tmp_path, sft_weight=-1.0)
    assert (
        main(["dpo", str(tiny_hf_dir), "--data", str(pairs), "--out", str(tmp_path), "--loss", "nope"]) == 2
    )
    capsys.readouterr()
    assert main(["dpo", "--resume", str(tmp_path / "nothing")]) == 2
    assert "earlier dpo run" in capsys.readouterr().err
    run = tmp_path / "started"
    run.mkdir()
    dump_config_yaml(dpo_config(tiny_hf_dir, pairs, run, method="full"), run / "config.yaml")
    for flags, expect in (
        (["--method", "lora"], "--method lora differs from the run's method full"),
        (["--data", str(tmp_path / "b.jsonl")], "--data"),
        ([str(tmp_path)], "MODEL"),
    ):
        assert main(["dpo", "--resume", str(run), *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert expect in err and "differs" in err and "another --out" in err and "\n" not in err, err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_pair_is_as_long_as_its_row():
    """--train.group-by-length groups pairs by the row they make: prompt once, then both answers."""
    from weightsmith.train.preference_data import PairExample, PairSource

    pairs = [PairExample([1] * 5, [2] * 3, [3] * 7), PairExample([4] * 2, [5] * 9, [6] * 1)]
    source = PairSource(pairs, pad_id=0)
    assert source.lengths() == [source.batch([i]).inputs.shape[1] for i in range(2)] == [15, 12]
