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

import weightsmith.llm  # noqa: F401  (binds load_checkpoint before a test patches it)
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

    steps = 48
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
    printed = capsys.readouterr().out
    assert (
        "validation forward_kl to the teacher " in printed
        and "cross-entropy on the data: student " in printed
    )
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
    assert f"--teacher {other}: its tokenizer differs from the student's" in err and repr(min(a, b)) in err
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
        (["--on-policy", "1.5"], "--on-policy 1.5: must be between 0 and 1"),
        (
            ["--precompute-teacher", "8", "--loss", "reverse_kl"],
            "--precompute-teacher 8: keeps the teacher's top K",
        ),
        (
            ["--precompute-teacher", "8", "--on-policy", "0.5"],
            "--precompute-teacher 8: keeps the teacher's top K",
        ),
        (["--precompute-teacher", "1000"], "--precompute-teacher 1000: more than the 320 tokens"),
        (["--on-policy", "0.5", "--packing"], "--packing: an on-policy row holds one prompt"),
        (
            ["--on-policy", "1", "--max-completion-len", "2000"],
            "--max-completion-len 2000: must be at least 1",
        ),
    ],
)
def test_bad_options_are_refused_in_one_line(tiny_hf_dir, data, teacher, tmp_path, capsys, flags, message):
    given = [] if not flags else ["--teacher", str(teacher)]
    out = tmp_path / "o"
    code = main(["distill", str(tiny_hf_dir), "--data", str(data), "--out", str(out), *given, *flags])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and "\n" not in err, err
    assert not out.exists()


# ----- on-policy: the student answers, the teacher scores ------------------------------------------


def test_on_policy_micro_batches_are_the_students_own_answers(tiny_hf_dir, data, teacher, tmp_path):
    from weightsmith.engine import Engine
    from weightsmith.sampling import SamplingParams
    from weightsmith.train.distill import load_sources
    from weightsmith.train.distill_data import Sampler, on_policy_draw
    from weightsmith.train.grpo_data import completion_seed

    cfg = distill_config(tiny_hf_dir, data, tmp_path / "o", teacher, on_policy=0.5, max_completion_len=8)
    ckpt = load_checkpoint(tiny_hf_dir, decode_layout=False)
    train, valid, stats = load_sources(cfg, ckpt.tokenizer)
    assert stats["train"]["examples"] + stats["valid"]["examples"] == 24
    train.sampler, train.clock = Sampler(ckpt.model, ckpt.tokenizer, 8), lambda: "3/train/5"
    assert on_policy_draw("3/train/5") < 0.5  # this micro-batch is the student's
    batch = train.batch([0, 1])
    assert batch.sampled == 1.0
    params = [
        SamplingParams(max_tokens=8, temperature=1.0, seed=completion_seed(f"3/train/5/{i}", 0))
        for i in (0, 1)
    ]
    answers = [
        list(c.token_ids)
        for c in Engine(ckpt.model, ckpt.tokenizer).generate(
            [train.examples[i].prompt for i in (0, 1)], params
        )
    ]
    for row, (i, answer) in enumerate(zip((0, 1), answers, strict=True)):
        prompt = train.examples[i].prompt
        n = len(prompt) + len(answer)
        assert batch.inputs[row, : n - 1].tolist() == (prompt + answer)[:-1]
        assert batch.labels[row, len(prompt) - 1 : n - 1].tolist() == answer  # learnt: the answer only
        assert (batch.labels[row, : len(prompt) - 1] == -100).all()
    assert batch.completion_tokens == sum(map(len, answers))
    train.clock = lambda: "3/train/7"
    assert on_policy_draw("3/train/7") >= 0.5 and train.batch([0, 1]).sampled == 0.0  # the data's answers
    draws = [on_policy_draw(f"3/train/{k}") < 0.5 for k in range(400)]
    assert 0.4 < sum(draws) / 400 < 0.6


def test_on_policy_from_prompts_alone_brings_the_student_to_the_teacher(tiny_hf_dir, teacher, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["messages"][:1]} for r in chat_rows()])
    out = tmp_path / "run"
    cfg = distill_config(tiny_hf_dir, prompts, out, teacher, on_policy=1.0, max_completion_len=12, kd_ratio=1.0,
                         loss="reverse_kl", train={"max_steps": 30, "eval_every": 15, "precision": "fp32"})  # fmt: skip
    run_distill(cfg)
    metrics = read_metrics(out / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    assert all(m["on_policy"] == 1.0 and 0 < m["completion_len"] <= 12 for m in steps)
    start, *_, end = [m for m in metrics if "val_kd" in m]  # validation samples too, seeded by the step
    assert end["val_kd"] < 0.4 * start["val_kd"]


BAD_ON_POLICY = {
    "text line": ([{"text": "Once upon a time"}], 0.5, "a text line has no prompt"),
    "ends with a user turn": (
        [
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        ],
        0.5,
        "the conversation ends with a user turn",
    ),  # fmt: skip
    "prompt-only off-policy": (
        [{"prompt": "Say something."}],
        0.5,
        "prompt: a prompt-only line has no answer",
    ),
    "no room": (
        [
            {
                "messages": [
                    {"role": "user", "content": "Grüße 🙂 " * 20},
                    {"role": "assistant", "content": "b"},
                ]
            }
        ],
        1.0,
        "leave no room for an answer of --max-completion-len 16",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ON_POLICY))
def test_bad_on_policy_data_stops_before_any_model_loads(
    tiny_hf_dir, teacher, tmp_path, capsys, monkeypatch, case
):
    import weightsmith.checkpoint.load as load

    rows, share, message = BAD_ON_POLICY[case]
    data = write_jsonl(tmp_path / "d.jsonl", [*(chat_rows(2) if "prompt" not in rows[0] else []), *rows])
    line = 3 if "prompt" not in rows[0] else 1
    monkeypatch.setattr(load, "load_checkpoint", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "run"
    code = main(["distill", str(tiny_hf_dir), "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                 "--on-policy", str(share), "--max-completion-len", "16", "--max-seq-len", "64"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err, err
    assert f"{data}:{line}: " in err and message in err, err
    assert not out.exists()


def test_a_quantized_teacher_runs_from_its_blocks(tiny_hf_dir, data, tmp_path, monkeypatch, adapter_dir):
    """A q8_0 GGUF teacher kept in its blocks (the int8 kernels) teaches what its dequantized
    weights teach, with and without a teacher adapter (beside the blocks; folded into the
    dequantized weights). The file's tokenizer has the student's 300 tokens and 20 padding ones
    up to the embedding's 320 rows: the same tokenizer."""
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.train import distill

    gguf = tmp_path / "teacher-q8.gguf"
    export_gguf(build_tiny_hf_dir(tmp_path / "t", seed=2), gguf, "q8_0")
    teachers, objective = [], distill.DistillObjective
    monkeypatch.setattr(
        distill, "DistillObjective", lambda t, *a, **k: teachers.append(t) or objective(t, *a, **k)
    )
    kd = {}
    for keep in (False, True):
        for adapter in (None, str(adapter_dir)):
            out = tmp_path / f"run-{keep}-{adapter is not None}"
            cfg = distill_config(tiny_hf_dir, data, out, gguf, teacher_keep_quantized=keep, teacher_adapter=adapter,
                                 train={"max_steps": 2, "precision": "fp32"})  # fmt: skip
            run_distill(cfg)
            kd[keep, adapter is not None] = losses_of(out, "kd")
    for adapted in (False, True):
        assert kd[True, adapted] == pytest.approx(kd[False, adapted], rel=1e-3)
    assert kd[True, True] != pytest.approx(kd[True, False], rel=1e-2)  # the adapter counts
    kinds = [type(t.model.layers[0].mlp.down_proj) for t in teachers]
    assert kinds[0].__module__ == "weightsmith.models.linear"  # dequantized
    assert kinds[2].__module__.startswith("weightsmith.quant.")  # the file's blocks
    assert type(teachers[3].model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"


# ----- --precompute-teacher K: the teacher's top K, stored once -----------------------------------


def test_a_precomputed_full_vocabulary_is_the_live_teacher_and_the_teacher_leaves(
    tiny_hf_dir, data, teacher, tmp_path, monkeypatch
):
    from safetensors import safe_open

    from weightsmith.train import distill

    teachers, objective = [], distill.DistillObjective
    monkeypatch.setattr(
        distill, "DistillObjective", lambda t, *a, **k: teachers.append(t) or objective(t, *a, **k)
    )
    runs = {}
    for k in (0, 320, 8):  # 320: every token of the shared vocabulary, the live teacher's distribution
        out = tmp_path / f"k{k}"
        result = run_distill(distill_config(tiny_hf_dir, data, out, teacher, precompute_teacher=k,
                                            train={"max_steps": 4, "precision": "fp32"}))  # fmt: skip
        runs[k] = [*losses_of(out), *losses_of(out, "val_kd"), result["metrics"]["val_teacher_nll"]]
    assert runs[320] == pytest.approx(runs[0], rel=1e-6)
    assert runs[8][-1] == pytest.approx(runs[0][-1], rel=1e-6)  # the teacher's NLL: over its whole vocabulary
    assert runs[8][:4] != pytest.approx(runs[0][:4], rel=1e-3)  # 8 tokens: another target distribution
    assert teachers[0] is not None and teachers[1] is teachers[2] is None  # no teacher while training
    with safe_open(str(tmp_path / "k320" / "teacher_topk.safetensors"), "pt") as f:
        assert f.get_tensor("train.ids").shape[1] == 320 and f.metadata()["vocab"] == "320"
        assert len(f.get_tensor("train.nll")) == f.get_tensor("train.ids").shape[0] > 100


def test_a_top_k_run_resumes_from_its_table_without_the_teacher(
    tiny_hf_dir, data, teacher, tmp_path, monkeypatch
):
    from test_finetune import _losses_after, _run_until_checkpoint

    from weightsmith.train import distill

    steps, k = 48, 8
    train = {"max_steps": steps, "save_every": 2, "eval_every": 0}
    reference = tmp_path / "ref"
    run_distill(distill_config(tiny_hf_dir, data, reference, teacher, precompute_teacher=k, train=train))
    cut = tmp_path / "cut"
    flags = [f"--train.{key.replace('_', '-')}={value}" for key, value in {**TRAIN, **train}.items()]
    args = ["distill", str(tiny_hf_dir), f"--teacher={teacher}", f"--data={data}", f"--out={cut}", "--max-seq-len=64",
            f"--precompute-teacher={k}", *flags, "--lora.rank=4", "--lora.alpha=8", "--lora.dropout=0.0"]  # fmt: skip
    proc = _run_until_checkpoint(_cli(*args), cut / "checkpoints", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name[5:]) for p in (cut / "checkpoints").glob("step-*"))
    assert done and done[-1] < steps, "the run finished before it was interrupted"
    monkeypatch.setattr(distill, "_load_teacher", lambda *a, **kw: pytest.fail("the teacher was loaded"))
    assert main(["distill", "--resume", str(cut)]) == 0
    ref_losses, cut_losses = (_losses_after(o / "metrics.jsonl", done[-1]) for o in (reference, cut))
    assert sorted(cut_losses) == list(range(done[-1] + 1, steps + 1))
    for step, loss in ref_losses.items():
        assert abs(cut_losses[step] - loss) <= 1e-6, step


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("ids out of range", "train.ids has token ids outside 0..319"),
        ("rows cut", "does not match the data (train.ids is torch.int32"),
        ("no vocab", "teacher_topk.safetensors: missing or unreadable"),
        ("not safetensors", "teacher_topk.safetensors: missing or unreadable"),
    ],
)
def test_a_damaged_top_k_table_stops_the_resume_in_one_line(
    tiny_hf_dir, data, teacher, tmp_path, capsys, tamper, message
):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "run"
    run_distill(
        distill_config(
            tiny_hf_dir, data, out, teacher, precompute_teacher=8, train={"max_steps": 2, "save_every": 1}
        )
    )
    table = out / "teacher_topk.safetensors"
    with safe_open(str(table), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    if tamper == "ids out of range":
        tensors["train.ids"][0, 0] = 5000
    elif tamper == "rows cut":
        tensors["train.ids"] = tensors["train.ids"][:-1]
    elif tamper == "no vocab":
        meta = {"k": "8"}
    if tamper == "not safetensors":
        table.write_bytes(b"\x00" * 64)
    else:
        save_file(tensors, str(table), metadata=meta)
    (out / "run.json").unlink()  # as a run interrupted after its last checkpoint leaves it
    capsys.readouterr()
    before = (out / "metrics.jsonl").read_text()
    assert main(["distill", "--resume", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert (out / "metrics.jsonl").read_text() == before  # nothing trained, nothing appended
