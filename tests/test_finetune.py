"""The finetune command and training loop on a tiny random model: outputs, the loss,
gradient accumulation, exact resume after SIGKILL and Ctrl-C, QLoRA, full fine-tuning,
merge, and --adapter on generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cli.main import main
from weightsmith.config import config_from_dict
from weightsmith.lora import LoRALinear, load_adapter
from weightsmith.train.data import IGNORE, Example, collate, to_rows
from weightsmith.train.sft import FinetuneConfig, load_data, read_metrics, run_finetune, sft_loss

WORDS = ["fox", "dog", "model", "time", "world", "quick", "lazy", "small"]


def write_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Conversations whose answers mostly repeat one sentence, so even a tiny model learns them."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g))
        messages = [
            {"role": "user", "content": f"{a} {b}?"},
            {"role": "assistant", "content": f"The {a} jumps over the lazy dog."},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def finetune_config(model: Path, data: Path, out: Path, *, dropout: float = 0.1, **train) -> FinetuneConfig:
    options = {"lr": 5e-3, "max_steps": 12, "batch_size": 4, "eval_every": 4, "save_every": 4, "seed": 3}
    options.update(train)
    return config_from_dict(
        FinetuneConfig,
        {
            "model": str(model),
            "data": str(data),
            "out": str(out),
            "max_seq_len": 64,
            "train": options,
            "lora": {"rank": 4, "alpha": 8, "dropout": dropout},
        },
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def test_lora_run_writes_outputs_and_learns(tiny_hf_dir, data, tmp_path):
    out = tmp_path / "run"
    result = run_finetune(finetune_config(tiny_hf_dir, data, out, max_steps=30, lr=1e-2))
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "run.json",
    ):
        assert (out / name).is_file(), name
    metrics = read_metrics(out / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert result["parameters"]["trainable"] < result["parameters"]["total"] / 5
    assert result["data"]["train"]["examples"] + result["data"]["valid"]["examples"] == 24
    lineage = json.loads((out / "run.json").read_text())
    assert len(lineage["data_sha256"]["data"]) == 64
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_checkpoints


def test_sft_loss_is_cross_entropy_on_target_tokens_only(tiny_hf_dir):
    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    rows = to_rows(
        [
            Example([5, 6, 7, 8, 9], [False, False, True, True, False]),
            Example([10, 11, 12], [False, True, True]),
        ],
        16,
        packing=False,
    )
    batch = collate(rows, pad_id=0)
    loss, n = sft_loss(model, batch)
    logits = model(batch.inputs)
    keep = batch.labels != IGNORE
    reference = F.cross_entropy(logits[keep], batch.labels[keep], reduction="sum")
    assert n == 4
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_validation_batches_rows_of_like_length_and_its_loss_is_each_examples(tiny_hf_dir, tmp_path):
    """Validation rows are batched shortest first (less padding than file order), and the
    validation loss is still the mean over all target tokens of each example scored alone."""

    lines = []
    for i in range(10):  # answers of very different lengths, in no order
        answer = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(2 + (i * 7) % 19))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": answer}]}))  # fmt: skip
    valid = tmp_path / "valid.jsonl"
    valid.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = config_from_dict(
        FinetuneConfig,
        {"model": str(tiny_hf_dir), "data": str(valid), "valid": str(valid), "out": str(tmp_path / "run"),
         "max_seq_len": 64, "train": {"max_steps": 1, "batch_size": 4, "eval_every": 0, "save_every": 0},
         "lora": {"rank": 4, "alpha": 8}},
    )  # fmt: skip
    loaded = load_checkpoint(str(tiny_hf_dir), dtype=torch.float32)
    _, rows, _ = load_data(cfg, loaded.tokenizer)
    lengths = [len(r.ids) for r in rows]
    assert lengths == sorted(lengths) and len(set(lengths)) > 5
    total, targets = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one at a time: no padding, no batch-mates
            batch = collate([row], 0)
            keep = batch.labels != IGNORE
            logits = loaded.model(batch.inputs)[keep]
            total += F.cross_entropy(logits, batch.labels[keep], reduction="sum").item()
            targets += int(keep.sum())
    result = run_finetune(cfg)
    assert result["initial_val_loss"] == pytest.approx(total / targets, rel=1e-5)


def test_group_by_length_hands_the_batch_order_each_rows_length(tiny_hf_dir, data, tmp_path, monkeypatch):
    from weightsmith.train import loop

    made = []
    real = loop.BatchOrder
    monkeypatch.setattr(loop, "BatchOrder", lambda *a, **k: made.append(k) or real(*a, **k))
    result = run_finetune(finetune_config(tiny_hf_dir, data, tmp_path / "run", group_by_length=True))
    cfg = finetune_config(tiny_hf_dir, data, tmp_path / "x")
    rows, _, _ = load_data(cfg, load_checkpoint(str(tiny_hf_dir), dtype=torch.float32).tokenizer)
    assert made[0]["lengths"] == [len(r.ids) for r in rows] and len(set(made[0]["lengths"])) > 3
    assert result["metrics"]["val_loss"] < result["initial_val_loss"]
    assert "group_by_length: true" in (tmp_path / "run" / "config.yaml").read_text()


def test_gradient_accumulation_equals_one_big_batch(tiny_hf_dir, data, tmp_path):
    """Loss is averaged over all target tokens of a step, so 2 x 2 equals 1 x 4
    (without dropout, whose random masks depend on the batch shapes)."""
    exact = {"dropout": 0.0, "max_steps": 3, "precision": "fp32"}  # no bf16 rounding of other batch shapes
    one = run_finetune(finetune_config(tiny_hf_dir, data, tmp_path / "a", **exact, batch_size=4))
    two = run_finetune(
        finetune_config(tiny_hf_dir, data, tmp_path / "b", **exact, batch_size=2, grad_accum=2)
    )
    a = [m["loss"] for m in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in m]
    b = [m["loss"] for m in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in m]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert one["metrics"]["val_loss"] == pytest.approx(two["metrics"]["val_loss"], rel=1e-5)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_compiled_layers_give_the_eager_gradients(tiny_hf_dir, dora):
    """--train.compile's regional compilation (`compile_layers`): the loss and every adapter
    gradient of a packed batch (a per-document mask) equal the eager model's (DoRA's magnitudes
    too; its weight norm is computed outside the compiled graph)."""
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.train.loop import compile_layers

    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    apply_lora(model, LoraConfig(r=4, alpha=8, use_dora=dora))
    for name, p in model.named_parameters():
        if p.requires_grad and "magnitude" not in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; give every adapter weight a gradient path
    examples = [Example(list(range(3 + i, 20 + 2 * i)), [True] * (17 + i)) for i in range(4)]
    batch = collate(to_rows(examples, 48, packing=True), pad_id=0)
    assert batch.documents is not None
    out = []
    for compiled in (False, True):
        if compiled:
            assert compile_layers(model, torch.device("cpu")) == model.config.num_hidden_layers
            assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
        model.zero_grad()
        loss, _ = sft_loss(model, batch)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = out
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compile_without_a_cpp_compiler_is_refused_before_training(tiny_hf_dir, data, tmp_path, monkeypatch):
    import shutil

    from weightsmith.errors import ConfigError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        run_finetune(finetune_config(tiny_hf_dir, data, tmp_path / "run", compile=True))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "weightsmith.cli.main", *args]


def _losses_after(path: Path, step: int) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(path) if "loss" in m and m["step"] > step}


def _run_until_checkpoint(cmd: list[str], ckpts: Path, sig: int, *, min_step: int = 4) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith("step-") and int(p.name[5:]) >= min_step for p in ckpts.glob("step-*")):
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    proc.wait(60)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_resume_gives_the_uninterrupted_losses(tiny_hf_dir, data, tmp_path, sig):
    steps = 48
    reference = tmp_path / "ref"
    run_finetune(finetune_config(tiny_hf_dir, data, reference, max_steps=steps, save_every=2, eval_every=0))
    cut = tmp_path / "cut"
    args = [
        "finetune", str(tiny_hf_dir), "--data", str(data), "--out", str(cut), "--max-seq-len", "64",
        "--train.lr", "5e-3", "--train.max-steps", str(steps), "--train.batch-size", "4", "--train.seed", "3",
        "--train.eval-every", "0", "--train.save-every", "2", "--lora.rank", "4", "--lora.alpha", "8",
        "--lora.dropout", "0.1",
    ]  # fmt: skip
    proc = _run_until_checkpoint(_cli(*args), cut / "checkpoints", sig)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, proc.stderr.read().decode()
        assert b"checkpoint was saved" in proc.stderr.read()
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (cut / "adapter_model.safetensors").exists()
    done = sorted(int(p.name[5:]) for p in (cut / "checkpoints").glob("step-*"))
    assert done and done[-1] < steps, "the run finished before it was interrupted"
    resumed_from = done[-1]
    assert main(["finetune", "--resume", str(cut)]) == 0
    ref_losses = _losses_after(reference / "metrics.jsonl", resumed_from)
    cut_losses = _losses_after(cut / "metrics.jsonl", resumed_from)
    assert sorted(cut_losses) == list(range(resumed_from + 1, steps + 1))
    for step, loss in ref_losses.items():
        assert abs(cut_losses[step] - loss) <= 1e-6, step
    assert not [p for p in (cut / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_resume_needs_a_run_and_refuses_other_flags(tmp_path, tiny_hf_dir, data, capsys):
    assert main(["finetune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "config.yaml: not found" in capsys.readouterr().err
    out = tmp_path / "run"
    run_finetune(finetune_config(tiny_hf_dir, data, out, max_steps=2))
    assert main(["finetune", str(tiny_hf_dir), "--data", str(data), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def started_run(cfg, out: Path) -> Path:
    """OUT as a run leaves it before its first checkpoint: the resolved config.yaml alone."""
    from weightsmith.config import dump_config_yaml

    out.mkdir(parents=True)
    dump_config_yaml(cfg, out / "config.yaml")
    return out


def test_resume_with_another_method_model_or_data_is_refused(tmp_path, tiny_hf_dir, data, capsys):
    import dataclasses

    out = started_run(
        dataclasses.replace(finetune_config(tiny_hf_dir, data, tmp_path / "x"), method="qlora"),
        tmp_path / "run",
    )
    other = write_data(tmp_path / "other.jsonl", seed=1)
    for flags, expect in (
        (["--method", "full"], "--method full differs from the run's method qlora"),
        (["--method", "lora"], "--method lora differs from the run's method qlora"),
        ([str(tmp_path)], f"MODEL {tmp_path} differs from the run's model {tiny_hf_dir}"),
        (["--data", str(other)], f"--data {other} differs from the run's data {data}"),
        (["--method", "full", "--nproc-per-node", "2"], "--method full differs"),  # before any rank starts
    ):
        assert main(["finetune", "--resume", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert expect in err and "drop " in err and "another --out" in err and "\n" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # nothing started
    # the saved values themselves (a path spelled differently too) pass on to the checkpoint lookup
    same = ["--method", "qlora", str(tiny_hf_dir / "."), "--data", str(data)]
    assert main(["finetune", "--resume", str(out), *same]) == 1
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_bad_data_stops_before_anything_is_written(tmp_path, tiny_hf_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "run"
    assert main(["finetune", str(tiny_hf_dir), "--data", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{bad}:1: the conversation has no assistant turn" in err and "\n" not in err
    assert not out.exists()


def test_adapter_on_generate_and_merge_match_the_adapted_model(tiny_hf_dir, data, tmp_path):
    import weightsmith

    out = tmp_path / "run"
    run_finetune(finetune_config(tiny_hf_dir, data, out, max_steps=6))
    adapted = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    load_adapter(adapted, out)
    assert not any(m.training for m in adapted.modules())  # new adapter layers follow the model's mode
    assert any(isinstance(m, LoRALinear) for m in adapted.modules())
    ids = torch.tensor([[5, 17, 33, 60, 2, 41]])
    with torch.no_grad():
        expected = adapted(ids)
        base = load_checkpoint(tiny_hf_dir).model(ids)
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the model
    llm = weightsmith.load(tiny_hf_dir, adapter=out)
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), expected, atol=1e-5, rtol=1e-4)
    merged = tmp_path / "merged"
    assert main(["merge", str(tiny_hf_dir), "--adapter", str(out), "--out", str(merged)]) == 0
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_full_finetune_saves_a_loadable_model(tiny_hf_dir, data, tmp_path):
    out = tmp_path / "full"
    result = run_finetune(
        config_from_dict(
            FinetuneConfig,
            {**_plain(finetune_config(tiny_hf_dir, data, out, max_steps=10, lr=1e-3)), "method": "full"},
        )
    )
    assert result["parameters"]["trainable"] == result["parameters"]["total"]
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < losses[0]
    tuned = load_checkpoint(out / "model").model
    base = load_checkpoint(tiny_hf_dir).model
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters(), strict=True))


def test_qlora_stores_the_base_in_4_bits_and_learns_like_lora(tiny_hf_dir, data, tmp_path):
    lora = run_finetune(finetune_config(tiny_hf_dir, data, tmp_path / "lora", max_steps=20))
    q = run_finetune(
        config_from_dict(
            FinetuneConfig,
            {**_plain(finetune_config(tiny_hf_dir, data, tmp_path / "q", max_steps=20)), "method": "qlora"},
        )
    )
    assert q["parameters"]["trainable"] == lora["parameters"]["trainable"]
    assert q["metrics"]["loss"] == pytest.approx(lora["metrics"]["loss"], rel=0.15)
    assert q["metrics"]["val_loss"] == pytest.approx(lora["metrics"]["val_loss"], rel=0.15)


def _plain(cfg: FinetuneConfig) -> dict:
    from weightsmith.config import config_to_dict

    return config_to_dict(cfg)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_hf_dir, method):
    from weightsmith.lora import LoraConfig, apply_lora

    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    if method == "qlora":
        from weightsmith.quant.nf4 import quantize_linears_nf4

        quantize_linears_nf4(model)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; give every adapter weight a gradient path
    batch = collate(to_rows([Example(list(range(3, 40)), [True] * 37)], 64, packing=False), pad_id=0)
    grads = []
    for checkpoint in (False, True):
        model.zero_grad()
        loss, _ = sft_loss(model, batch, checkpoint=checkpoint)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tensorboard_without_the_package_is_refused_before_training(tiny_hf_dir, data, tmp_path):
    import importlib.util

    from weightsmith.errors import WeightsmithError

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(WeightsmithError, match="pip install tensorboard"):
        run_finetune(finetune_config(tiny_hf_dir, data, tmp_path / "tb", tensorboard=True))
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("trainable", ["hidden", "everything"])
def test_fused_head_loss_gradients_equal_plain_cross_entropy(tiny_hf_dir, trainable, monkeypatch):
    """The chunked LM-head + cross-entropy gives the loss and gradients of logits -> F.cross_entropy,
    for the hidden states (LoRA) and for a tied head/embedding weight (full fine-tuning)."""
    from weightsmith.train import losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 320 * 3)  # several chunks of 3 rows on the tiny vocab
    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    model.requires_grad_(trainable == "everything")
    h = torch.randn(10, model.config.hidden_size, requires_grad=True)
    targets = torch.randint(model.config.vocab_size, (10,))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        h.grad = None
        normed = model.model.norm(h)
        if fused:
            loss = losses.linear_cross_entropy(normed, model.lm_head.weight, targets)
        else:
            loss = F.cross_entropy(model.lm_head(normed), targets, reduction="sum")
        (loss * 0.5).backward()
        params = [p.grad for p in model.parameters() if p.grad is not None]
        grads.append((loss.detach(), h.grad.clone(), params))
    (loss_a, h_a, p_a), (loss_b, h_b, p_b) = grads
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_a, h_b, rtol=1e-5, atol=1e-6)
    assert len(p_a) == len(p_b) == (0 if trainable == "hidden" else 2)  # norm weight and tied head
    for a, b in zip(p_a, p_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_head_loss_takes_bf16_activations_over_an_fp32_head():
    """Under bf16 autocast the hidden states arrive in bf16 while the head weight is fp32."""
    from weightsmith.train.losses import linear_cross_entropy

    torch.manual_seed(0)
    w = torch.randn(50, 16)
    h = torch.randn(7, 16).bfloat16().requires_grad_()
    t = torch.randint(50, (7,))
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    ref_h = h.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_h @ w.t(), t, reduction="sum")
    ref.backward()
    assert h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.grad.float(), ref_h.grad, rtol=5e-2, atol=5e-2)


def test_merge_refuses_bad_input_without_writing(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_hf_dir), "--out", str(out)]) == 2
    assert "needs --adapter DIR" in capsys.readouterr().err
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    assert main(["merge", str(tiny_hf_dir), "--adapter", str(empty), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "adapter_config.json" in err and "\n" not in err
    assert not out.exists()


def test_adamw_is_fused_on_a_gpu_and_its_update_is_foreachs():
    """make_optimizer picks AdamW's fused kernel for CUDA parameters and foreach elsewhere (and
    for FSDP's DTensors); the two give the same update, weight-decay groups included."""
    from types import SimpleNamespace

    from weightsmith.train.optim import adamw_kernel, make_optimizer

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert adamw_kernel([SimpleNamespace(device=cuda)] * 2) == "fused"
    assert adamw_kernel([SimpleNamespace(device=cuda), SimpleNamespace(device=cpu)]) == "foreach"
    assert adamw_kernel([SimpleNamespace(device=cuda, device_mesh=object())]) == "foreach"
    assert adamw_kernel([torch.zeros(2)]) == "foreach"

    def trained(kernel: str | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        args = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
        opt = make_optimizer(model, **args)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices; norms and biases
        assert opt.param_groups[0]["foreach"] and not opt.param_groups[0]["fused"]
        if kernel is not None:  # the same groups through the other kernel
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **{kernel: True})
            assert opt.param_groups[0][kernel] and not opt.param_groups[0]["foreach"]
        for step in range(5):
            loss = model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).square().sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(trained(None), trained("fused"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adapter_training_on_a_cpu_with_amx_runs_in_bf16(tiny_hf_dir, data, tmp_path, monkeypatch):
    """precision/dtype "auto" on a CPU: bf16 autocast over bf16 base weights for adapters where
    the CPU multiplies bf16 in hardware (AMX), fp32 elsewhere; fp32 weights for full fine-tuning;
    `--train.precision fp32` keeps fp32 throughout. The bf16 run learns and saves fp32 adapters."""
    from weightsmith.device import cpu_multiplies_bf16, train_dtype
    from weightsmith.train import loop

    cpu, bf16, fp32 = torch.device("cpu"), torch.bfloat16, torch.float32
    assert loop.use_bf16("auto", cpu) == cpu_multiplies_bf16()
    assert train_dtype("auto", cpu, full=False, autocast=True) == bf16
    assert train_dtype("auto", cpu, full=False, autocast=False) == fp32
    assert train_dtype("auto", cpu, full=True, autocast=True) == fp32
    assert train_dtype("fp32", cpu, full=False, autocast=True) == fp32
    monkeypatch.setattr(loop, "cpu_multiplies_bf16", lambda: True)  # as on a Xeon with AMX
    assert loop.use_bf16("auto", cpu) and not loop.use_bf16("fp32", cpu)
    monkeypatch.setattr(loop, "cpu_multiplies_bf16", lambda: False)  # as on an AVX2-only CPU
    assert not loop.use_bf16("auto", cpu) and loop.use_bf16("bf16", cpu)

    monkeypatch.setattr(loop, "cpu_multiplies_bf16", lambda: True)
    seen: list[torch.dtype] = []
    original = loop.Trainer._autocast

    def spy(self):
        seen.append(next(p.dtype for p in self.model.parameters() if not p.requires_grad))
        return original(self)

    monkeypatch.setattr(loop.Trainer, "_autocast", spy)
    result = run_finetune(finetune_config(tiny_hf_dir, data, tmp_path / "run", dropout=0.0, max_steps=8))
    assert seen and set(seen) == {bf16}
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert losses[-1] < losses[0] and result["metrics"]["val_loss"] < result["initial_val_loss"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {fp32}


def test_a_bf16_training_step_on_a_cpu_attends_in_fp32(tiny_hf_dir, monkeypatch):
    """torch's CPU flash-attention backward is about twice as slow in bf16 as in fp32, so a bf16
    model attends in fp32 when it trains on a CPU (even under bf16 autocast), and in bf16 when it
    only infers; both give the bf16 model's logits within bf16 rounding."""
    import weightsmith.models.model as model_module

    model = load_checkpoint(str(tiny_hf_dir), dtype=torch.bfloat16).model.requires_grad_(True)
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inferred = model(ids)
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(ids)
    trained.float().sum().backward()
    assert set(seen) == {torch.float32} and trained.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    torch.testing.assert_close(trained.float(), inferred.float(), rtol=0.05, atol=0.05)
