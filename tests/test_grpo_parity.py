"""GRPO parity with TRL: our rollout samples a group of completions per prompt from a tiny
random Llama (LoRA or full weights); TRL's own `GRPOTrainer`, on the transformers mirror of the
same weights, is handed exactly those prompt and completion ids (its `rollout_func` hook) and
the same rewards, and computes the advantages, the loss and the gradients with its own code.
Ours must equal them (fp32, 1e-5) for every loss normalisation, with and without the KL term
to the reference, at a sampling temperature other than 1, with truncated completions masked.
TRL's tokenization of the prompts (its `_tokenize_prompts`) is compared with ours too.

Nothing here re-implements TRL's formulas: the expected values come from running TRL."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from test_dpo_parity import (  # a LoRA with random B, or all weights
    copy_weights,
    peft_lora,
    policy_and_reference,
)

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.train import losses
from weightsmith.train.grpo import GrpoObjective
from weightsmith.train.grpo_data import PromptRecord, Rollout, tokenize_prompts
from weightsmith.train.rewards import Reward

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

USER = ["fox dog?", "Once upon a time?", "Bonjour le monde!"]
G = 4  # completions per prompt
MAX_COMPLETION = 6
ROWS = [{"prompt": [{"role": "user", "content": u}]} for u in USER]
RECORDS = [
    PromptRecord(f"prompts.jsonl:{i + 1}", r["prompt"], {"prompt": u})
    for i, (u, r) in enumerate(zip(USER, ROWS, strict=True))
]


class Recorded:
    """A reward of the completion's text (crc32 buckets: varied within a group, reproducible),
    declining one completion (None); it keeps what it gave, for TRL's reward function."""

    def __init__(self) -> None:
        self.given: list[float | None] = []

    def __call__(self, texts: list[str], rows: list[dict], lengths: list[int]) -> list[float | None]:
        out: list[float | None] = [
            (zlib.crc32(t.encode()) % 7) / 7 + 0.1 * n for t, n in zip(texts, lengths, strict=True)
        ]
        out[G + 1] = None  # a completion no reward applies to: advantage 0, left out of its group
        self.given = out
        return out


def rollout_of(model, tokenizer, loss: str, temperature: float, mask_truncated: bool, records, scale="group"):
    examples, _ = tokenize_prompts(records, tokenizer, room=200, rewards=[])
    reward = Recorded()
    rollout = Rollout(
        model, tokenizer, [Reward("crc", reward, 1.0)], G, MAX_COMPLETION, loss=loss,
        mask_truncated=mask_truncated, temperature=temperature, scale_rewards=scale,
    )  # fmt: skip
    return examples, rollout(examples, [f"5/{i}" for i in range(len(examples))]), reward.given


def trl_trainer(path, ours, examples, batch, given, *, tmp, **config):
    """TRL's GRPOTrainer (GRPOConfig `config`) on the HF mirror of `ours`, handed our prompts and
    completions; with the weight-name prefix peft adds."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    lora = any("lora_" in n for n, _ in ours.named_parameters())
    prompt_ids = [e.ids for e in examples for _ in range(G)]
    completions = batch.completion_ids

    def rollout_func(prompts, trainer):
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completions,
            "logprobs": [[0.0] * len(c) for c in completions],
        }

    args = trl.GRPOConfig(
        output_dir=str(tmp / "trl"), report_to="none", use_cpu=True, bf16=False,
        per_device_train_batch_size=len(prompt_ids), num_generations=G, max_completion_length=MAX_COMPLETION,
        disable_dropout=True, gradient_checkpointing=False, **config,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=hf,
        reward_funcs=[lambda **kw: given],
        args=args,
        train_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=tokenizer,
        rollout_func=rollout_func,
        peft_config=peft_lora() if lora else None,
    )
    prefix = copy_weights(ours, trainer.model, lora)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.training_step sets: one micro-batch a step
    return trainer, prefix


def trl_loss_and_grads(trainer, prefix, inputs):
    """TRL's loss of `inputs` and its gradients, by our parameter names."""
    loss_value = trainer.compute_loss(trainer.model, inputs)
    loss_value.backward()
    grads = {
        n.removeprefix(prefix): p.grad for n, p in trainer.model.named_parameters() if p.grad is not None
    }
    return loss_value.detach(), grads


def trl_run(
    path, ours, examples, batch, given, *, loss, beta, temperature, mask_truncated, tmp, scale="group"
):
    """TRL's advantages, loss and gradients (by our parameter names) for our completions."""
    trainer, prefix = trl_trainer(
        path, ours, examples, batch, given, tmp=tmp, temperature=temperature, beta=beta, loss_type=loss,
        mask_truncated_completions=mask_truncated, scale_rewards=scale,
    )  # fmt: skip
    tokenized, _, _ = trainer._tokenize_prompts([r["prompt"] for r in ROWS])
    inputs = trainer._generate_and_score_completions([r for r in ROWS for _ in range(G)])
    loss_value, grads = trl_loss_and_grads(trainer, prefix, inputs)
    return tokenized, inputs["advantages"], loss_value, grads, trainer._metrics["train"]


def assert_grads_equal(model, trl_grads):
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(trl_grads) and grads
    for name, g in grads.items():
        torch.testing.assert_close(
            g, trl_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert max(g.abs().max() for g in grads.values()) > 1e-4  # not all zero


CASES = [  # (loss, beta, temperature, mask_truncated, method, how a group's row attends, reward scaling)
    ("dapo", 0.0, 1.0, False, "lora", "mask", "group"),
    ("grpo", 0.04, 0.7, False, "lora", "mask", "group"),
    ("dr_grpo", 0.0, 1.3, False, "lora", "mask", "none"),
    ("dapo", 0.1, 1.0, True, "lora", "mask", "group"),
    ("grpo", 0.0, 1.0, True, "lora", "sequences", "none"),
    ("dapo", 0.04, 0.8, False, "full", "sequences", "group"),
    ("grpo", 0.0, 1.0, False, "lora", "mask", "batch"),
    ("bnpo", 0.04, 0.9, True, "lora", "mask", "group"),
]


@pytest.fixture(scope="module")
def ending_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny model with 50 end tokens (its pad id among them), so that within a few tokens
    some completions end and others are cut off: what --mask-truncated tells apart."""
    path = tmp_path_factory.mktemp("ending") / "tiny"
    shutil.copytree(tiny_hf_dir, path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = list(range(50))
        (path / name).write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("loss", "beta", "temperature", "mask_truncated", "method", "rows", "scale"), CASES, ids=str
)
def test_advantages_loss_and_gradients_equal_trl(tiny_hf_dir, ending_dir, tmp_path, monkeypatch, loss, beta,
                                                  temperature, mask_truncated, method, rows, scale):  # fmt: skip
    """Each group is one row, its prompt once; short rows attend under a mask, long ones as a
    causal sequence per completion (forced here by lowering the threshold)."""
    made = []
    if rows == "sequences":
        monkeypatch.setattr(losses, "SEQUENCES_FROM", 1)
        monkeypatch.setattr(
            losses, "pair_sequences", lambda s, real=losses.pair_sequences: made.append(1) or real(s)
        )
    if mask_truncated:
        tiny_hf_dir = ending_dir
    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    model, reference = policy_and_reference(tiny_hf_dir, method)
    examples, batch, given = rollout_of(model, tokenizer, loss, temperature, mask_truncated, RECORDS, scale)
    assert any(g is not None and g != given[0] for g in given[1:G])  # a group whose rewards differ
    truncated = [c["finish_reason"] == "length" for c in batch.completions]
    if mask_truncated:
        assert 0 < sum(truncated) < len(truncated), truncated  # some masked, some learnt
    tokenized, trl_advantages, trl_loss, trl_grads, logged = trl_run(
        tiny_hf_dir, model, examples, batch, given, loss=loss, beta=beta, temperature=temperature,
        mask_truncated=mask_truncated, tmp=tmp_path, scale=scale,
    )  # fmt: skip
    assert [e.ids for e in examples] == [list(ids) for ids in tokenized]  # TRL renders the prompts alike
    torch.testing.assert_close(batch.advantages, trl_advantages, rtol=1e-5, atol=1e-6)
    assert batch.advantages[G + 1] == 0  # the declined completion

    objective = GrpoObjective(epsilon=0.2, beta=beta, temperature=temperature, reference=reference)
    total, count, metrics = objective(model, batch)
    (total / count).backward()
    torch.testing.assert_close(total.detach() / count, trl_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(model, trl_grads)
    entropy = metrics["entropy"].total / metrics["entropy"].n  # the policy's mean token entropy
    assert entropy == pytest.approx(logged["entropy"][-1], rel=1e-5) and entropy > 0
    if beta:
        assert float(metrics["kl"]) > 0
    assert bool(made) == (rows == "sequences")


def test_bnpo_averages_each_micro_batchs_token_mean(ending_dir):
    """TRL's bnpo divides each micro-batch's token sum by its own token count (then by the
    accumulation steps): over two micro-batches of different token counts, our bnpo step is the
    mean of the two dapo (token-mean) losses, not the token mean of the whole step."""
    tokenizer = load_checkpoint(ending_dir).tokenizer
    model, _ = policy_and_reference(ending_dir, "lora")
    parts = [RECORDS[:2], RECORDS]  # 8 and 12 completions
    runs = {
        loss: [rollout_of(model, tokenizer, loss, 1.0, False, part)[1] for part in parts]
        for loss in ("dapo", "bnpo")
    }
    assert [b.completion_ids for b in runs["dapo"]] == [b.completion_ids for b in runs["bnpo"]]
    dapo = [GrpoObjective(epsilon=0.2, loss="dapo")(model, b)[:2] for b in runs["dapo"]]
    bnpo = [GrpoObjective(epsilon=0.2, loss="bnpo")(model, b)[:2] for b in runs["bnpo"]]
    assert dapo[0][1] != dapo[1][1] and [c for _, c in bnpo] == [1, 1]  # token counts differ
    step = sum(t for t, _ in bnpo) / 2
    torch.testing.assert_close(step, (dapo[0][0] / dapo[0][1] + dapo[1][0] / dapo[1][1]) / 2)
    whole = sum(t for t, _ in dapo) / sum(c for _, c in dapo)
    assert abs(float(step - whole)) > 1e-4 * abs(float(whole))


LATER = [  # (loss, beta, importance sampling level, delta, method)
    ("dapo", 0.0, "token", None, "lora"),
    ("grpo", 0.04, "sequence", None, "lora"),
    ("dr_grpo", 0.0, "token", 1.5, "lora"),
    ("dapo", 0.04, "token", None, "full"),
    ("grpo", 0.0, "sequence", None, "full"),
    ("cispo", 0.0, "token", None, "lora"),
    ("cispo", 0.04, "token", None, "full"),
    ("sapo", 0.0, "token", None, "lora"),
    ("sapo", 0.04, "sequence", None, "full"),
]


@pytest.mark.parametrize(("loss", "beta", "level", "delta", "method"), LATER, ids=str)
def test_a_later_iteration_equals_trl(tiny_hf_dir, tmp_path, loss, beta, level, delta, method):
    """--num-iterations 2: the second step learns from the first step's completions with weights
    that have moved, so pi / pi_old is no longer 1 and the clip acts. TRL (num_iterations=2) keeps
    the log-probabilities of the weights that sampled; we keep those of the first pass. After
    the same change of weights, loss, gradients and the clipped shares equal TRL's, per token and
    per completion (GSPO), with two-sided clipping; and for CISPO's capped, detached weight and
    SAPO's soft gate in place of the clip."""
    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    model, reference = policy_and_reference(tiny_hf_dir, method)
    examples, batch, given = rollout_of(model, tokenizer, loss, 1.0, False, RECORDS)
    low, high = (0.2, 0.28) if level == "token" else (3e-4, 4e-4)  # GSPO's clip is narrow: a mean moves less
    high = 1.05 if loss == "cispo" else high  # CISPO's cap is on the ratio itself
    trainer, prefix = trl_trainer(
        tiny_hf_dir, model, examples, batch, given, tmp=tmp_path, beta=beta, loss_type=loss, num_iterations=2,
        importance_sampling_level=level, delta=delta, epsilon=low, epsilon_high=high,
    )  # fmt: skip
    inputs = trainer._generate_and_score_completions([r for r in ROWS for _ in range(G)])
    assert inputs["old_per_token_logps"] is not None  # TRL keeps them for a later iteration

    objective = GrpoObjective(epsilon=low, epsilon_high=high, beta=beta, reference=reference, importance=level,
                              delta=delta, keep=True, loss=loss)  # fmt: skip
    objective(model, batch)  # the first pass: the ratio is 1; it keeps pi_old (and the reference's)
    assert batch.old_logp is not None and (batch.ref_logp is not None) == bool(beta)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the trained weights moved, far enough that some ratios leave the clip's range
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * (1.5 if method == "lora" else 0.3))
    copy_weights(model, trainer.model, method == "lora")
    model.zero_grad()
    total, count, metrics = objective(model, batch)
    (total / count).backward()
    trl_loss, trl_grads = trl_loss_and_grads(trainer, prefix, inputs)
    torch.testing.assert_close(total.detach() / count, trl_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(model, trl_grads)
    logged = trainer._metrics["train"]
    assert metrics["entropy"].total / metrics["entropy"].n == pytest.approx(logged["entropy"][-1], rel=1e-5)
    if loss == "sapo":  # a soft gate: nothing is clipped
        assert "clip_low" not in metrics and "clip_ratio/low_mean" not in logged
    elif loss == "cispo":  # only the cap on positive-advantage tokens' weights
        capped = metrics["clip_high"].total / metrics["clip_high"].n
        assert capped == pytest.approx(logged["cispo_clip_ratio"][-1], abs=1e-6) and 0 < capped < 1
    else:
        clipped = 0.0
        for side in ("low", "high"):
            ours = metrics[f"clip_{side}"].total / metrics[f"clip_{side}"].n
            assert ours == pytest.approx(logged[f"clip_ratio/{side}_mean"][-1], abs=1e-6)
            clipped += ours
        assert 0 < clipped < 1  # the clip held some ratios and not others
    if delta:  # and the cap bit
        with torch.no_grad():
            uncapped, _, _ = dataclasses.replace(objective, delta=None)(model, batch)
        assert float(uncapped) != pytest.approx(float(total.detach()), rel=1e-4)


@pytest.mark.parametrize(("loss", "beta"), [("dapo", 0.0), ("grpo", 0.04)])
def test_learning_from_the_high_entropy_tokens_equals_trl(tiny_hf_dir, tmp_path, loss, beta):
    """--top-entropy-quantile 0.2 (TRL's top_entropy_quantile): the policy term of all but the
    fifth of the micro-batch's tokens with the highest entropy is dropped (the KL term stays);
    loss and gradients equal TRL's, and differ from learning from every token."""
    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    model, _ = policy_and_reference(tiny_hf_dir, "lora")
    examples, batch, given = rollout_of(model, tokenizer, loss, 1.0, False, RECORDS)
    trainer, prefix = trl_trainer(tiny_hf_dir, model, examples, batch, given, tmp=tmp_path, beta=beta,
                                  loss_type=loss, top_entropy_quantile=0.2)  # fmt: skip
    inputs = trainer._generate_and_score_completions([r for r in ROWS for _ in range(G)])
    trl_loss, trl_grads = trl_loss_and_grads(trainer, prefix, inputs)
    objective = GrpoObjective(beta=beta, top_entropy_quantile=0.2)
    total, count, _ = objective(model, batch)
    (total / count).backward()
    torch.testing.assert_close(total.detach() / count, trl_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(model, trl_grads)
    with torch.no_grad():
        every, _, _ = GrpoObjective(beta=beta)(model, batch)
    assert float(every) != pytest.approx(float(total.detach()), rel=1e-3)


def test_prompts_are_checked_before_the_model_loads(tmp_path):
    from weightsmith.train.data import DataError
    from weightsmith.train.grpo_data import read_prompts

    cases = {
        '{"question": "2+2?"}': "prompts.jsonl:1: prompt: missing",
        '{"prompt": ""}': "prompts.jsonl:1: prompt: empty",
        '{"prompt": [{"role": "assistant", "content": "hi"}]}': "the last message is 'assistant'",
        '{"prompt": [{"role": "robot", "content": "hi"}]}': "has role 'robot'",
        "[1, 2]": "expected a JSON object",
    }
    for line, want in cases.items():
        path = tmp_path / "prompts.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=want.replace("(", r"\(")) as err:
            read_prompts(path)
        assert "\n" not in str(err.value)
    path.write_text('{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: prompt: this line is conversational"):
        read_prompts(path)


def test_a_prompt_without_room_for_its_completion_names_its_line(tiny_hf_dir):
    from weightsmith.train.data import DataError

    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    records = [
        PromptRecord("p.jsonl:1", "short", {}),
        PromptRecord("p.jsonl:2", "a much longer prompt " * 20, {}),
    ]
    with pytest.raises(DataError, match=r"p.jsonl:2: prompt: \d+ tokens leave no room"):
        tokenize_prompts(records, tokenizer, room=20, rewards=[])


def test_group_advantages_by_hand():
    from weightsmith.train.grpo_data import group_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, float("nan")])
    a = group_advantages(r, 4, "group")
    std = (1 / 3) ** 0.5 * 2 / 2  # sample std of (1, 0, 0, 1): sqrt(4 * 0.25 / 3)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(a[:4], want)
    torch.testing.assert_close(a[4:], torch.zeros(4))  # equal rewards: nothing to learn; NaN: 0
    torch.testing.assert_close(group_advantages(r, 4, "none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert json.dumps(a.tolist())  # finite
