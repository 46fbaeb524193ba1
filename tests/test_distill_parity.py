"""Distillation parity with TRL: the divergences equal `GKDTrainer.generalized_jsd_loss` (every
beta, at temperatures 1 and 2, values and gradients); TRL's `GKDTrainer` itself (its ChatML
collator and `compute_loss`, lmbda 0: the data's completions) on a tiny random student mirrored
into transformers, with a peft LoRA or a full model, and a wider, deeper teacher, gives the loss
and gradients of weightsmith's `DistillObjective` on the same batch (fp32, 1e-5); TRL's chunked
`DistillationTrainer` loss gives the same at another temperature. The fused, chunked head equals
plain autograd over whole logits, and the data's cross-entropy mixes in by --kd-ratio.

Nothing here re-implements TRL's formulas: the expected values come from running TRL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_hf_dir
from test_dpo_parity import assert_same_gradients, copy_weights, ours_model, peft_lora

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.train import distill_loss
from weightsmith.train.data import IGNORE, Batch
from weightsmith.train.distill import DistillObjective
from weightsmith.train.distill_loss import DistillSpec, divergence, linear_distill, token_losses

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

#: (our --loss, --beta) and the GKD beta that is the same divergence
NAMES = [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 0.5), ("jsd", 0.2, 0.2)]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("loss", "beta", "gkd_beta"), NAMES)
def test_divergences_equal_trl_generalized_jsd(loss, beta, gkd_beta, temperature):
    torch.manual_seed(0)
    student = (torch.randn(2, 5, 40, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = torch.randn(2, 5, 40, dtype=torch.float64) * 3
    theirs = GKDTrainer.generalized_jsd_loss(
        student, teacher, beta=gkd_beta, temperature=temperature, reduction="none"
    ).sum(-1)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), student)
    ours = divergence(student.reshape(10, 40), teacher.reshape(10, 40), DistillSpec(loss, beta, temperature))
    (g_ours,) = torch.autograd.grad(ours.sum(), student)
    torch.testing.assert_close(ours, theirs.reshape(10), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    assert ours.min() > 0


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.4])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_the_fused_chunked_head_equals_autograd_over_whole_logits(monkeypatch, loss, kd_ratio, cap):
    monkeypatch.setattr(distill_loss, "CHUNK_ELEMENTS", 2 * 7 * 50)  # 7 rows a chunk: 3 chunks
    torch.manual_seed(1)
    h = torch.randn(19, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.5).requires_grad_(True)
    teacher_logits = torch.randn(19, 50) * 2
    targets = torch.randint(0, 50, (19,))
    spec = DistillSpec(loss, 0.3, 1.5, kd_ratio)
    total, stats = linear_distill(h, w, lambda a, b: teacher_logits[a:b], targets, spec, cap)
    (total * 0.7).backward()
    logits = h @ w.t() if cap is None else torch.tanh(h @ w.t() / cap) * cap  # Gemma's soft cap
    losses, want = token_losses(logits, teacher_logits, targets, spec)
    gh, gw = torch.autograd.grad(losses.sum() * 0.7, (h, w))
    torch.testing.assert_close(total, losses.sum())
    torch.testing.assert_close(stats, want)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)
    # the mix: kd_ratio x divergence + (1 - kd_ratio) x cross-entropy on the data's tokens
    ce = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(stats[1], ce)
    torch.testing.assert_close(losses, kd_ratio * want[0] + (1 - kd_ratio) * ce)
    with torch.no_grad():  # validation: the same sweep without gradients
        again, _ = linear_distill(h, w, lambda a, b: teacher_logits[a:b], targets, spec, cap)
    torch.testing.assert_close(again, total)


# ----- whole steps against TRL's trainers ----------------------------------------------------------

ROWS = [
    ("fox dog?", "The quick brown fox jumps."),
    ("Once upon a time?", "there was a small model that learned to talk."),
    ("Bonjour le monde!", "Hola mundo."),
    ("quick brown 0123?", "The lazy dog. 42 Grüße aus Köln"),
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher wider and deeper than the tiny student, with the same tokenizer."""
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    return build_tiny_hf_dir(path, seed=7, hidden_size=96, intermediate_size=160, num_hidden_layers=3)


def chat_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]} for u, a in ROWS
    ]


def our_batch(hf_batch: dict) -> Batch:
    """TRL's left-padded batch as ours: right-padded, labels[i] the token position i predicts
    (TRL's shifted by one). RoPE sees only relative positions, so the shift changes nothing."""
    ids, labels = torch.zeros_like(hf_batch["input_ids"]), torch.full_like(hf_batch["labels"], IGNORE)
    for row, keep in enumerate(hf_batch["attention_mask"].bool()):
        n = int(keep.sum())
        ids[row, :n] = hf_batch["input_ids"][row, keep]
        labels[row, : n - 1] = hf_batch["labels"][row, keep][1:]
    return Batch(ids, labels)


def gkd_step(student_dir, teacher_dir, ours, beta: float, tmp):
    hf = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(student_dir)
    lora = any("lora_" in n for n, _ in ours.named_parameters())
    args = GKDConfig(
        output_dir=str(tmp / "gkd"), report_to="none", use_cpu=True, bf16=False, lmbda=0.0, beta=beta,
        per_device_train_batch_size=len(ROWS), disable_dropout=True, max_length=256,
    )  # fmt: skip
    trainer = GKDTrainer(
        model=hf, teacher_model=teacher, args=args, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(chat_rows()), peft_config=peft_lora() if lora else None,
    )  # fmt: skip
    prefix = copy_weights(ours, trainer.model, lora)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {
        n.removeprefix(prefix): p.grad for n, p in trainer.model.named_parameters() if p.grad is not None
    }
    return batch, loss.detach(), grads


@pytest.mark.parametrize(
    ("loss", "beta", "gkd_beta", "method"),
    [("jsd", 0.5, 0.5, "lora"), ("forward_kl", 0.5, 0.0, "full"), ("reverse_kl", 0.5, 1.0, "lora")],
)
def test_a_step_equals_trl_gkd_trainer(tiny_hf_dir, teacher_dir, tmp_path, loss, beta, gkd_beta, method):
    model = ours_model(tiny_hf_dir, method)
    hf_batch, trl_loss, trl_grads = gkd_step(tiny_hf_dir, teacher_dir, model, gkd_beta, tmp_path)
    teacher = load_checkpoint(teacher_dir, decode_layout=False).model.requires_grad_(False).eval()
    objective = DistillObjective(teacher, DistillSpec(loss, beta, 1.0, 1.0), vocab=320)
    total, n, metrics = objective(model, our_batch(hf_batch))
    (total / n).backward()
    assert n == int((hf_batch["labels"] != IGNORE).sum()) > 20
    torch.testing.assert_close(total.detach() / n, trl_loss, rtol=1e-5, atol=1e-6)
    assert float(metrics["kd"]) / n == pytest.approx(float(trl_loss), rel=1e-5)
    assert_same_gradients(model, trl_grads)


def test_a_tempered_step_equals_trl_distillation_loss(tiny_hf_dir, teacher_dir):
    """TRL's DistillationTrainer divides by the temperature inside its chunked loss (GKDTrainer's
    step does not): at temperature 2, its loss and the student's gradients are ours."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    collate = trl.experimental.utils.DataCollatorForChatML(tokenizer=tokenizer, max_length=256)
    hf_batch = collate(chat_rows())
    ids, mask = hf_batch["input_ids"], hf_batch["attention_mask"]
    with torch.no_grad():
        th = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    sh = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    valid = (hf_batch["labels"][:, 1:] != IGNORE).long()
    theirs, _, n = _chunked_divergence_loss(
        sh, th, hf.lm_head.weight, teacher.lm_head.weight, valid, beta=0.3, temperature=2.0
    )
    theirs.backward()
    trl_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}

    model = ours_model(tiny_hf_dir, "full")
    ours_teacher = load_checkpoint(teacher_dir, decode_layout=False).model.requires_grad_(False).eval()
    total, count, _ = DistillObjective(ours_teacher, DistillSpec("jsd", 0.3, 2.0, 1.0), vocab=320)(
        model, our_batch(hf_batch)
    )
    (total / count).backward()
    assert count == int(n)
    torch.testing.assert_close(total.detach() / count, theirs.detach(), rtol=1e-5, atol=1e-6)
    assert_same_gradients(model, trl_grads)


def test_a_soft_capped_student_is_fused_as_its_own_logits_say(tmp_path, teacher_dir):
    """A Gemma 2 student (final logits soft-capped, here at 2 so the cap bites) runs the fused
    head: loss and gradients equal plain autograd through the model's own `logits`."""
    from conftest import TINY_SHAPE, save_perturbed_hf

    config = transformers.Gemma2Config(**TINY_SHAPE, head_dim=16, final_logit_softcapping=2.0)
    path = save_perturbed_hf(tmp_path / "gemma2", config)
    teacher = load_checkpoint(teacher_dir, decode_layout=False).model.requires_grad_(False).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_batch = trl.experimental.utils.DataCollatorForChatML(tokenizer=tokenizer, max_length=256)(chat_rows())
    batch = our_batch(hf_batch)
    spec = DistillSpec("jsd", 0.3, 1.5, 0.6)
    grads = []
    for fused in (True, False):
        model = ours_model(path, "full")
        if fused:
            total, n, _ = DistillObjective(teacher, spec, vocab=320)(model, batch)
        else:  # the model's own soft-capped logits, every target row at once, plain autograd
            keep = batch.labels != IGNORE
            logits = model.logits(model.hidden_states(batch.inputs)[keep]).float()
            with torch.no_grad():
                taught = teacher.logits(teacher.hidden_states(batch.inputs)[keep]).float()
            losses, _ = token_losses(logits, taught, batch.labels[keep], spec)
            total, n = losses.sum(), len(losses)
        (total / n).backward()
        grads.append((total.detach() / n, {k: p.grad for k, p in model.named_parameters()}))
    assert model.config.final_logit_softcapping == 2.0
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for name, g in grads[1][1].items():
        torch.testing.assert_close(
            grads[0][1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
