"""KTO parity with TRL: on a tiny random Llama mirrored into transformers, TRL's own
`KTOTrainer` (its dataset preparation, KL completions, collator and loss, with a peft LoRA or a
full model and a reference copy) and weightsmith's unpaired examples and `KtoObjective` see the
same token ids and give the same loss, KL estimate, rewards, log-probs and gradients (fp32,
1e-5), for both losses, text and conversational data, and uneven class weights.

TRL gives example i the completion of example i - 1 (in its batch) as its KL completion; ours
are seeded partners (`kl_partners`), set here to TRL's rotation so that both score the same
mismatched pairs. Nothing here re-implements TRL's formulas: the expected values come from
running TRL."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_dpo_parity import USER, assert_same_gradients, copy_weights, peft_lora, policy_and_reference

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.train.kto import KtoObjective
from weightsmith.train.unpaired_data import UnpairedSource, read_unpaired, tokenize_unpaired

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

COMPLETIONS = ["The quick brown fox jumps.", "No.", "Hola mundo, y adiós.", "model model model"]
LABELS = [True, False, True, True]  # uneven: three desirable, one not


def rows_in(fmt: str) -> list[dict]:
    rows = []
    for u, c, label in zip(USER, COMPLETIONS, LABELS, strict=True):
        if fmt == "conversational":
            rows.append({"prompt": [{"role": "user", "content": u}],
                         "completion": [{"role": "assistant", "content": c}], "label": label})  # fmt: skip
        else:
            rows.append({"prompt": f"Q: {u}\nA:", "completion": f" {c}", "label": label})
    return rows


def trl_run(path: Path, ours: torch.nn.Module, rows: list[dict], loss_type: str, weights, tmp: Path):
    """TRL's KTOTrainer on the HF mirror of `ours`: its prepared rows, the loss of one batch of
    all rows, its logged metrics and the gradients by weightsmith parameter name."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = any("lora_" in n for n, _ in ours.named_parameters())
    args = trl.KTOConfig(
        output_dir=str(tmp / "trl"), beta=0.5, loss_type=loss_type, desirable_weight=weights[0],
        undesirable_weight=weights[1], report_to="none", use_cpu=True, bf16=False, max_length=None,
        per_device_train_batch_size=len(rows), disable_dropout=True, gradient_checkpointing=False,
    )  # fmt: skip
    trainer = trl.KTOTrainer(
        model=hf,
        ref_model=None if lora else copy.deepcopy(hf).eval(),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(path),
        peft_config=peft_lora() if lora else None,
    )
    prefix = copy_weights(ours, trainer.model, lora)
    prepared = [trainer.train_dataset[i] for i in range(len(rows))]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(prepared))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {
        n.removeprefix(prefix): p.grad for n, p in trainer.model.named_parameters() if p.grad is not None
    }
    return prepared, loss.detach(), metrics, grads


CASES = [  # (loss, data format, method, (desirable weight, undesirable weight))
    ("kto", "conversational", "lora", (1.0, 1.0)),
    ("kto", "text", "lora", (0.8, 2.5)),
    ("kto", "conversational", "full", (1.0, 1.5)),
    ("apo_zero_unpaired", "conversational", "lora", (1.0, 1.0)),
    ("apo_zero_unpaired", "text", "full", (1.2, 0.7)),
]


@pytest.mark.parametrize(("loss", "fmt", "method", "weights"), CASES, ids=str)
def test_loss_kl_rewards_and_gradients_equal_trl(tiny_hf_dir, tmp_path, loss, fmt, method, weights):
    rows = rows_in(fmt)
    model, reference = policy_and_reference(tiny_hf_dir, method)
    prepared, trl_loss, trl_metrics, trl_grads = trl_run(tiny_hf_dir, model, rows, loss, weights, tmp_path)

    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    examples, stats = tokenize_unpaired(read_unpaired(data), tokenizer, max_seq_len=4096)
    assert (stats.desirable, stats.undesirable) == (3, 1)
    for e, t in zip(examples, prepared, strict=True):  # same ids, same prompt/completion split
        assert (e.prompt, e.completion, e.label) == (t["prompt_ids"], t["completion_ids"], t["label"])
    n = len(examples)
    partners = [(i - 1) % n for i in range(n)] if loss == "kto" else None  # TRL's rotation
    if partners:
        assert [examples[j].completion for j in partners] == [t["KL_completion_ids"] for t in prepared]
    batch = UnpairedSource(examples, 0, 4096, partners).batch(range(n))
    objective = KtoObjective(loss, 0.5, *weights, reference=reference)
    total, count, extra = objective(model, batch)
    (total / count).backward()

    torch.testing.assert_close(total.detach() / count, trl_loss, rtol=1e-5, atol=1e-5)
    ours = {k: float(v.total) / max(v.n, 1e-12) for k, v in extra.items()}
    names = {"kl": "kl", "reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected",
             "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected"}  # fmt: skip
    for mine, theirs in names.items():
        assert ours[mine] == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=2e-5), mine
    if loss == "kto":
        assert ours["kl"] > 0 or method == "full"  # full: the estimate came out negative; 0, as TRL clamps it
    assert_same_gradients(model, trl_grads)
