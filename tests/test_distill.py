"""The distill command on tiny random models: a student learns a teacher's distributions (the
teacher is the student's own base with a random adapter folded in, so the student's LoRA can
reach it), writes finetune's outputs and a lineage naming the teacher, packed rows keep their
documents apart in the teacher too, a teacher adapter equals its merged model, extra vocabulary
rows are left out, a SIGKILLed run resumes exactly, `reproduce` gives the same adapter, and a
teacher with another tokenizer or bad options stop in one line before anything is written."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_hf_dir, build_tiny_tokenizer_dir
from test_dpo import _cli, losses_of, run_config, write_jsonl

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cli.main import main
from weightsmith.train.data import collate, to_rows, tokenize_records
from weightsmith.train.distill import DistillConfig, DistillObjective, run_distill
from weightsmith.train.distill_loss import DistillSpec
from weightsmith.train.runs import read_metrics

TRAIN = {"lr": 1e-2, "max_steps": 8, "batch_size": 4, "eval_every": 4, "save_every": 4, "seed": 3}
WORDS = "fox dog model time world quick brown lazy small talk".split()


def chat_rows(n: int = 24) -> list[dict]:
    return [
        {"messages": [
            {"role": "user", "content": f"Say something about the {WORDS[i % 10]}."},
            {"role": "assistant", "content": f"The {WORDS[(3 * i) % 10]} and the {WORDS[(7 * i + 1) % 10]}."},
        ]}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("distill") / "chat.jsonl", chat_rows())


@pytest.fixture(scope="module")
def teacher(tiny_hf_dir, adapter_dir, tmp_path_factory) -> Path:
    """The tiny model with `adapter_dir` folded in, saved as an HF folder."""
    out = tmp_path_factory.mktemp("teacher") / "merged"
    assert main(["merge", str(tiny_hf_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    return out


def distill_config(model: Path, data: Path, out: Path, teacher: Path, **fields) -> DistillConfig:
    return run_config(DistillConfig, model, data, out, TRAIN, teacher=str(teacher), **fields)


def test_a_student_learns_the_teachers_distributions(tiny_hf_dir, data, teacher, tmp_path):
    out = tmp_path / "run"
    cfg = distill_config(tiny_hf_dir, data, out, teacher, kd_ratio=1.0,
                         train={"max_steps": 40, "eval_every": 20, "precision": "fp32"})  # fmt: skip
    result = run_distill(cfg)
    outputs = "adapter_config.json adapter_model.safetensors config.yaml metrics.jsonl loss.png run.json"
    assert all((out / name).is_file() for name in outputs.split()), sorted(p.name for p in out.iterdir())
    start, *_, end = [m for m in read_metrics(out / "metrics.jsonl") if "val_kd" in m]
    assert start["step"] == 0 and start["val_kd"] > 0.01  # the adapter moved the teacher away
    assert end["val_kd"] < 0.2 * start["val_kd"]
    # the student's cross-entropy on the data moves toward the teacher's (which stays put)
    assert abs(end["val_nll"] - end["val_teacher_nll"]) < 0.75 * abs(
        start["val_nll"] - start["val_teacher_nll"]
    )
    assert end["val_teacher_nll"] == pytest.approx(start["val_teacher_nll"], rel=1e-6)
    assert losses_of(out, "kd")[-1] < 0.3 * losses_of(out, "kd")[0]
    assert (
        result["loss"] == "forward_kl"
        and result["teacher"] == str(teacher)
        and "val_ppl" not in result["metrics"]
    )
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["kind"] == "distill"
    assert {i["role"] for i in lineage["inputs"]} >= {"model", "data", "teacher"}


def test_a_teacher_adapter_is_its_merged_model_and_extra_vocabulary_rows_are_left_out(
    tiny_hf_dir, adapter_dir, teacher, data, tmp_path
):
    runs = {}
    padded = build_tiny_hf_dir(tmp_path / "padded", seed=0, vocab_size=384)  # rows 320..383 beyond the ids
    for name, kwargs in {
        "merged": {"teacher": teacher},
        "adapter": {"teacher": tiny_hf_dir, "teacher_adapter": str(adapter_dir)},
        "padded": {"teacher": padded},
    }.items():
        cfg = distill_config(tiny_hf_dir, data, tmp_path / name, loss="jsd", beta=0.3, temperature=2.0,
                             train={"max_steps": 3, "precision": "fp32"}, **kwargs)  # fmt: skip
        runs[name] = losses_of(tmp_path / name, "kd") if run_distill(cfg) else None
    assert runs["merged"] == pytest.approx(runs["adapter"], rel=1e-5)
    assert runs["padded"] != pytest.approx(runs["merged"], rel=1e-3)  # another teacher (seed 0, wider head)
    lineage = json.loads((tmp_path / "adapter" / "lineage.json").read_text())
    assert {i["role"] for i in lineage["inputs"]} >= {"teacher", "teacher_adapter"}


def test_packed_rows_keep_documents_apart_in_the_teacher(tiny_hf_dir, teacher):
    ckpt = load_checkpoint(tiny_hf_dir, decode_layout=False)
    examples, _ = tokenize_records(
        [_record(r, i) for i, r in enumerate(chat_rows(3))], ckpt.tokenizer, max_seq_len=64
    )
    objective = DistillObjective(
        load_checkpoint(teacher, decode_layout=False).model.eval(), DistillSpec("reverse_kl"), vocab=320
    )
    with torch.no_grad():
        packed, n, m = objective(ckpt.model, collate(to_rows(examples, 200, packing=True), 0))
        alone = [objective(ckpt.model, collate(to_rows([e], 64, packing=False), 0)) for e in examples]
    assert len(to_rows(examples, 200, packing=True)) == 1
    assert n == sum(a[1] for a in alone)
    torch.testing.assert_close(packed, sum(a[0] for a in alone), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        m["teacher_nll"], sum(a[2]["teacher_nll"] for a in alone), rtol=1e-5, atol=1e-6
    )


def _record(row: dict, i: int):
    from weightsmith.train.data import Record

    return Record(f"chat.jsonl:{i + 1}", messages=row["messages"])


def test_resume_after_sigkill_gives_the_uninterrupted_losses(tiny_hf_dir, data, teacher, tmp_path):
    from test_finetune import _losses_after, _run_until_checkpoint

    steps = 100
    train = {"max_steps": steps, "save_every": 2, "eval_every": 0}
    reference = tmp_path / "ref"
    run_distill(distill_config(tiny_hf_dir, data, reference, teacher, train=train))
    cut = tmp_path / "cut"
    flags = [f"--train.{key.replace('_', '-')}={value}" for key, value in {**TRAIN, **train}.items()]
    lora = ["--lora.rank", "4", "--lora.alpha", "8", "--lora.dropout", "0.0"]
    args = ["distill", str(tiny_hf_dir), f"--teacher={teacher}", f"--data={data}", f"--out={cut}",
            "--max-seq-len=64", *flags, *lora]  # fmt: skip
    proc = _run_until_checkpoint(_cli(*args), cut / "checkpoints", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name[5:]) for p in (cut / "checkpoints").glob("step-*"))
    assert done and done[-1] < steps, "the run finished before it was interrupted"
    assert main(["distill", "--resume", str(cut)]) == 0
    ref_losses, cut_losses = (_losses_after(o / "metrics.jsonl", done[-1]) for o in (reference, cut))
    assert sorted(cut_losses) == list(range(done[-1] + 1, steps + 1))
    for step, loss in ref_losses.items():
        assert abs(cut_losses[step] - loss) <= 1e-6, step


def test_reproduce_gives_the_same_adapter(tiny_hf_dir, data, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", str(tiny_hf_dir), "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--max-seq-len", "64", "--train.max-steps", "2", "--train.batch-size", "2", "--lora.rank", "2"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["reproduce", str(out), "--out", str(again), "--root", str(tmp_path), "--json"]) == 0
    status = {o["path"]: o["status"] for o in json.loads(capsys.readouterr().out)["outputs"]}
    assert status["adapter_model.safetensors"] == "identical", status


def test_a_teacher_with_another_tokenizer_is_refused_before_anything_loads(
    tiny_hf_dir, data, tmp_path, capsys, monkeypatch
):
    import weightsmith.checkpoint.load as load

    other = build_tiny_hf_dir(tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    swapped = {v: k for k, v in vocab.items()}
    a, b = swapped[100], swapped[101]
    vocab[a], vocab[b] = 101, 100  # two tokens trade ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    monkeypatch.setattr(load, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    out = tmp_path / "run"
    code = main(
        ["distill", str(tiny_hf_dir), "--teacher", str(other), "--data", str(data), "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err
    assert f"--teacher {other}: its tokenizer differs from the student's" in err and repr(a) in err
    assert not out.exists()


def test_a_teacher_whose_head_is_smaller_than_the_tokenizer_is_refused(tiny_hf_dir, data, tmp_path, capsys):
    small = tmp_path / "small"
    build_tiny_tokenizer_dir(small)
    build_tiny_hf_dir(small, vocab_size=200)  # fewer rows than the tokenizer's 300 ids
    capsys.readouterr()
    out = tmp_path / "run"
    code = main(
        ["distill", str(tiny_hf_dir), "--teacher", str(small), "--data", str(data), "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "its LM head has 200 rows" in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss", "kl"], "--loss"),
        (["--beta", "0.3"], "--beta applies to --loss jsd, not forward_kl"),
        (["--loss", "jsd", "--beta", "1.5"], "--beta 1.5: must be between 0 and 1"),
        (["--kd-ratio", "0"], "--kd-ratio 0.0: must be above 0"),
        (["--temperature", "0"], "--temperature 0.0: must be above 0"),
        ([], "--teacher is required"),
    ],
)
def test_bad_options_are_refused_in_one_line(tiny_hf_dir, data, teacher, tmp_path, capsys, flags, message):
    given = [] if not flags else ["--teacher", str(teacher)]
    out = tmp_path / "o"
    code = main(["distill", str(tiny_hf_dir), "--data", str(data), "--out", str(out), *given, *flags])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and "\n" not in err, err
    assert not out.exists()
