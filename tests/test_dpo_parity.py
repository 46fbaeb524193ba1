"""DPO parity with TRL: on a tiny random Llama mirrored into transformers, TRL's own
`DPOTrainer` (its dataset preparation, collator and `compute_loss`, with a peft LoRA or a full
model and a reference copy) and weightsmith's pairs and `PreferenceObjective` see the same
token ids and answer masks and give the same losses, rewards, reward accuracy and margin,
policy log-probs and gradients (fp32, 1e-5), for every loss and every data format.

Nothing here re-implements TRL's formulas: the expected values come from running TRL."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.lora import LoraConfig, apply_lora
from weightsmith.train.dpo import PreferenceObjective
from weightsmith.train.losses import PREFERENCE_LOSSES
from weightsmith.train.preference_data import PairSource, parse_pair, tokenize_pairs

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
USER = ["fox dog?", "Once upon a time?", "Bonjour le monde!", "quick brown 0123?"]
GOOD = ["The quick brown fox jumps.", "there was a small model.", "Hola mundo.", "The lazy dog. 42"]
BAD = ["No.", "A dog sleeps over the lazy time and the world.", "Grüße aus Köln 🙂", "model model"]


def rows_in(fmt: str) -> list[dict]:
    """Four pairs of different lengths in one of TRL's preference formats."""
    rows = []
    for u, good, bad in zip(USER, GOOD, BAD, strict=True):
        user = [{"role": "user", "content": u}]
        if fmt == "conversational":
            rows.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}],
                }
            )
        elif fmt == "implicit":
            system = [{"role": "system", "content": "Be brief."}]
            rows.append(
                {
                    "chosen": system + user + [{"role": "assistant", "content": good}],
                    "rejected": system + user + [{"role": "assistant", "content": bad}],
                }
            )
        else:
            rows.append({"prompt": f"Q: {u}\nA:", "chosen": f" {good}", "rejected": f" {bad}"})
    return rows


def ours_model(path: Path, method: str) -> torch.nn.Module:
    model = load_checkpoint(path, decode_layout=False).model
    if method == "lora":
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS))
        torch.manual_seed(1)
        with (
            torch.no_grad()
        ):  # B starts at zero: give the adapter an effect, so the policy differs from the reference
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
    else:
        model.requires_grad_(True)
    return model


def policy_and_reference(path: Path, method: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """`ours_model`, and for full fine-tuning a frozen copy of the checkpoint as the reference,
    with the policy moved away from it as training would (LoRA's reference: adapters off)."""
    model = ours_model(path, method)
    if method != "full":
        return model, None
    reference = load_checkpoint(path, decode_layout=False).model.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, reference


def peft_lora():
    """peft's LoRA for TRL to wrap the model with: `ours_model`'s adapter."""
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


def copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module, lora: bool) -> str:
    """Our trainable weights into TRL's model (every LoRA weight; for a full model, every
    weight); the prefix peft puts before our parameter names."""
    prefix = "base_model.model." if lora else ""
    state = {prefix + n: p for n, p in ours.named_parameters()}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name in state:
                p.copy_(state[name])
    return prefix


def trl_run(
    path: Path, ours: torch.nn.Module, rows: list[dict], loss_type: str, beta: float, eps: float, tmp: Path
):
    """TRL's DPOTrainer on the HF mirror of `ours` (same weights); its prepared rows, the loss of
    one batch of all rows, its logged metrics and the gradients by weightsmith parameter name."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    lora = any("lora_" in n for n, _ in ours.named_parameters())
    args = trl.DPOConfig(
        output_dir=str(tmp / "trl"),
        beta=beta,
        loss_type=loss_type.split("+"),  # "sigmoid+sft": DPO plus the chosen answers' NLL (RPO)
        loss_weights=[1.0, SFT_WEIGHT] if "+" in loss_type else None,
        label_smoothing=eps,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=None,
        per_device_train_batch_size=len(rows),
        disable_dropout=True,
        gradient_checkpointing=False,
    )
    trainer = trl.DPOTrainer(
        model=hf,
        ref_model=None if lora else copy.deepcopy(hf).eval(),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        # TRL wraps the model itself: a new adapter, whose reference is the model with adapters disabled
        peft_config=peft_lora() if lora else None,
    )
    prefix = copy_weights(ours, trainer.model, lora)
    prepared = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(prepared)
    trainer.model.train()  # TRL logs under "train" only in training mode (dropout is off either way)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {
        n.removeprefix(prefix): p.grad for n, p in trainer.model.named_parameters() if p.grad is not None
    }
    return prepared, loss.detach(), metrics, grads


def assert_same_gradients(
    model: torch.nn.Module, trl_grads: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Our model's gradients equal TRL's (by our parameter names; fp32, 1e-5), and are not all zero."""
    our_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(our_grads) == set(trl_grads) and our_grads
    for name, g in our_grads.items():
        torch.testing.assert_close(
            g, trl_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert max(g.abs().max() for g in our_grads.values()) > 1e-4  # the gradients are not all zero
    return our_grads


def records_of(rows: list[dict]) -> list:
    return [parse_pair(json.dumps(r), f"pairs.jsonl:{i + 1}")[0] for i, r in enumerate(rows)]


def ours_run(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    loss: str,
    beta: float,
    eps: float,
    reference=None,
    sft_weight: float = 0.0,
):
    pairs, _ = tokenize_pairs(records_of(rows), tokenizer, max_seq_len=4096)
    batch = PairSource(pairs, pad_id=0).batch(range(len(pairs)))
    objective = PreferenceObjective(PREFERENCE_LOSSES[loss], beta, eps, reference, sft_weight=sft_weight)
    total, n, extra = objective(model, batch)
    (total / n).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return pairs, total.detach() / n, {k: float(v) / n for k, v in extra.items()}, grads


SFT_WEIGHT = 0.7  # --sft-weight in the "+sft" cases

CASES = [  # (our --loss, TRL's loss_type, label smoothing, data format, method)
    ("dpo", "sigmoid", 0.0, "conversational", "lora"),
    ("ipo", "ipo", 0.0, "conversational", "lora"),
    ("hinge", "hinge", 0.0, "conversational", "lora"),
    ("robust", "robust", 0.1, "conversational", "lora"),
    ("dpo", "sigmoid", 0.0, "implicit", "lora"),
    ("ipo", "ipo", 0.0, "text", "lora"),
    ("dpo", "sigmoid", 0.0, "conversational", "full"),
    ("dpo", "sigmoid+sft", 0.0, "conversational", "lora"),
    ("dpo", "sigmoid+sft", 0.0, "text", "full"),
    ("sigmoid_norm", "sigmoid_norm", 0.0, "conversational", "lora"),
    ("exo_pair", "exo_pair", 1e-3, "conversational", "lora"),
    ("nca_pair", "nca_pair", 0.0, "conversational", "lora"),
    ("bco_pair", "bco_pair", 0.0, "text", "lora"),
    ("sppo_hard", "sppo_hard", 0.0, "conversational", "lora"),
    ("apo_zero", "apo_zero", 0.0, "conversational", "lora"),
    ("apo_down", "apo_down", 0.0, "implicit", "lora"),
    ("discopop", "discopop", 0.0, "conversational", "lora"),
]


@pytest.mark.parametrize(("loss", "trl_loss", "eps", "fmt", "method"), CASES, ids=lambda v: str(v))
def test_loss_rewards_and_gradients_equal_trl(tiny_hf_dir, tmp_path, loss, trl_loss, eps, fmt, method):
    beta = 0.5
    rows = rows_in(fmt)
    model, reference = policy_and_reference(tiny_hf_dir, method)
    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    prepared, trl_loss_value, trl_metrics, trl_grads = trl_run(
        tiny_hf_dir, model, rows, trl_loss, beta, eps, tmp_path
    )
    sft = SFT_WEIGHT if "+sft" in trl_loss else 0.0
    pairs, our_loss, ours, our_grads = ours_run(model, tokenizer, rows, loss, beta, eps, reference, sft)

    for p, t in zip(pairs, prepared, strict=True):  # same ids, same prompt/answer split
        assert (p.prompt, p.chosen, p.rejected) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
    torch.testing.assert_close(our_loss, trl_loss_value, rtol=1e-5, atol=1e-5)
    pairs_of = {
        "reward_chosen": "rewards/chosen",
        "reward_rejected": "rewards/rejected",
        "reward_accuracy": "rewards/accuracies",
        "reward_margin": "rewards/margins",
        "logps_chosen": "logps/chosen",
        "logps_rejected": "logps/rejected",
    }
    # Summed log-probabilities here are about -64 to -128 in fp32, 7.6e-6 apart; a reward margin
    # is beta times a sum of four of them, so a few of those steps is fp32's own noise.
    for mine, theirs in pairs_of.items():
        assert ours[mine] == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=2e-5), mine
    assert 0 < ours["reward_accuracy"] < 1 or method == "full"  # the pairs are not all alike
    assert_same_gradients(model, trl_grads)


def test_disabled_adapters_are_the_same_reference_as_a_frozen_copy(tiny_hf_dir):
    """The LoRA reference (the same model, adapters off) equals a separate frozen base model."""
    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    rows = rows_in("conversational")
    results = []
    for frozen in (False, True):
        model = ours_model(tiny_hf_dir, "lora")
        reference = (
            load_checkpoint(tiny_hf_dir, decode_layout=False).model.requires_grad_(False) if frozen else None
        )
        _, loss, metrics, grads = ours_run(model, tokenizer, rows, "dpo", 0.5, 0.0, reference)
        results.append((loss, metrics, grads))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    assert m_a["reward_margin"] != 0  # the adapter moved the policy from the reference
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert m_a == pytest.approx(m_b, rel=1e-6, abs=1e-6)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-6, atol=1e-7)


def test_answer_mask_starts_where_trl_says_when_the_template_renders_the_prompt_differently(tmp_path):
    """A template whose generation prompt is not a prefix of the rendered answer turn (like
    Gemma's empty thought block): TRL starts the answer where the two token lists part, and so do we."""
    from conftest import build_tiny_hf_dir

    path = build_tiny_hf_dir(tmp_path / "odd")
    config = json.loads((path / "tokenizer_config.json").read_text())
    generation = "{% if add_generation_prompt %}<|im_start|>assistant\n"
    assert generation in config["chat_template"]
    config["chat_template"] = config["chat_template"].replace(generation, generation + "<|endoftext|>")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    rows = rows_in("conversational")
    model = ours_model(path, "lora")
    prepared, *_ = trl_run(path, model, rows, "sigmoid", 0.1, 0.0, tmp_path)
    pairs, stats = tokenize_pairs(records_of(rows), load_checkpoint(path).tokenizer, max_seq_len=4096)
    for p, t in zip(pairs, prepared, strict=True):
        assert (p.prompt, p.chosen, p.rejected) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
    assert stats.prompt_mismatch == len(rows)


REFERENCE_FREE_CASES = [  # (our --loss, TRL trainer, its loss_type, label smoothing, --sft-weight, method)
    ("simpo", "cpo", "simpo", 0.0, 0.0, "lora"),
    ("simpo", "cpo", "simpo", 0.1, 0.0, "full"),
    ("simpo", "cpo", "simpo", 0.0, 0.7, "lora"),  # CPO-SimPO: cpo_alpha, the chosen answers' NLL
    ("orpo", "orpo", None, 0.0, 0.0, "lora"),  # the odds-ratio term (see below for its NLL term)
    ("orpo", "orpo", None, 0.0, 0.0, "full"),
]


@pytest.mark.parametrize(
    ("loss", "trainer", "loss_type", "eps", "sft", "method"), REFERENCE_FREE_CASES, ids=str
)
def test_reference_free_losses_equal_trls_cpo_and_orpo(tiny_hf_dir, tmp_path, monkeypatch, loss, trainer, loss_type,
                                                       eps, sft, method):  # fmt: skip
    """SimPO against TRL's CPOTrainer (`loss_type="simpo"`, `cpo_alpha` our --sft-weight) and ORPO's
    odds-ratio term against its ORPOTrainer's (`odds_ratio_loss` on its own forward), both in
    trl.experimental: each tokenizes the pairs its own way (an end token after each answer), so
    ours runs on the ids it prepared. Loss, implicit rewards (beta x mean token log-prob),
    accuracy, margin and gradients agree (fp32), and no reference runs. ORPO's NLL term is the
    chosen answer's (our --sft-weight, 1 by default for orpo; tested against DPOTrainer's "sft"
    above): TRL's ORPOTrainer takes it over prompt and answer, the ORPO authors' code can leave
    the prompt out (`disable_prompt_loss`), as we do."""
    import warnings

    from weightsmith.train import dpo
    from weightsmith.train.dpo import DpoConfig
    from weightsmith.train.losses import simpo_loss
    from weightsmith.train.preference_data import PairExample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = __import__(f"trl.experimental.{trainer}", fromlist=["x"])
    config_cls, trainer_cls = (module.CPOConfig, module.CPOTrainer) if trainer == "cpo" else (
        module.ORPOConfig, module.ORPOTrainer)  # fmt: skip
    beta, gamma = (2.0, 0.8) if loss == "simpo" else (0.5, None)
    rows = rows_in("conversational")
    model = ours_model(tiny_hf_dir, method)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    extra = {"loss_type": loss_type, "cpo_alpha": sft, "simpo_gamma": gamma, "label_smoothing": eps} if (
        trainer == "cpo") else {}  # fmt: skip
    args = config_cls(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, beta=beta,
                      per_device_train_batch_size=len(rows), disable_dropout=True, **extra)  # fmt: skip
    theirs = trainer_cls(model=hf, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=transformers.AutoTokenizer.from_pretrained(tiny_hf_dir),
                         peft_config=peft_lora() if method == "lora" else None)  # fmt: skip
    prefix = copy_weights(model, theirs.model, method == "lora")
    prepared = [theirs.train_dataset[i] for i in range(len(rows))]
    theirs.model.train()
    collated = theirs.data_collator(prepared)
    if trainer == "cpo":
        trl_loss, trl_metrics = theirs.get_batch_loss_metrics(theirs.model, collated)
    else:
        chosen_logps, rejected_logps, *_ = theirs.concatenated_forward(theirs.model, collated)
        terms, chosen_r, rejected_r, *_ = theirs.odds_ratio_loss(chosen_logps, rejected_logps)
        trl_loss = -terms.mean()
        trl_metrics = {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                       "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                       "rewards/margins": (chosen_r - rejected_r).mean()}  # fmt: skip
    trl_loss.backward()
    trl_grads = {
        n.removeprefix(prefix): p.grad for n, p in theirs.model.named_parameters() if p.grad is not None
    }

    pairs = []
    for t in prepared:
        n = len(t["prompt_input_ids"])
        assert t["chosen_input_ids"][:n] == t["rejected_input_ids"][:n] == t["prompt_input_ids"]
        pairs.append(
            PairExample(t["prompt_input_ids"], t["chosen_input_ids"][n:], t["rejected_input_ids"][n:])
        )
    batch = PairSource(pairs, pad_id=0).batch(range(len(pairs)))
    fn = functools.partial(simpo_loss, gamma=gamma) if loss == "simpo" else PREFERENCE_LOSSES[loss]
    objective = PreferenceObjective(fn, beta, eps, sft_weight=sft, reference_free=True)
    monkeypatch.setattr(dpo, "reference_log_probs", lambda *a, **k: pytest.fail("a reference forward ran"))
    total, n, extra_metrics = objective(model, batch)
    (total / n).backward()
    ours = {k: float(v) / n for k, v in extra_metrics.items()}
    torch.testing.assert_close(total.detach() / n, trl_loss.detach(), rtol=1e-5, atol=1e-5)
    for mine, key in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                      ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins")):  # fmt: skip
        assert ours[mine] == pytest.approx(float(trl_metrics[key]), rel=1e-5, abs=1e-5), mine
    assert_same_gradients(model, trl_grads)
    assert DpoConfig(model="m", data="d", out="o", loss=loss).sft_weight == (1.0 if loss == "orpo" else 0.0)
