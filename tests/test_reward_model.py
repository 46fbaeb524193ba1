"""The reward command: parity with TRL's `RewardTrainer` (its tokenization, sequence-classification
forward, Bradley-Terry loss with margins and centring, metrics and gradients; LoRA with the score
head in modules_to_save, and full), what it writes loads in transformers and peft and scores
alike, and on a tiny random model it learns which answers are preferred, resumes exactly, and
refuses bad input in one line."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import pytest
import torch
from test_dpo import _cli, losses_of, pair_rows, run_config, write_jsonl
from test_dpo_parity import TARGETS, assert_same_gradients, ours_model, rows_in

from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.cli.main import main
from weightsmith.train.preference_data import read_pairs, tokenize_pairs
from weightsmith.train.reward_model import (
    RewardConfig,
    RewardObjective,
    RewardSource,
    attach_score,
    run_reward,
)

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


def with_pad_as_eos(path: Path, tmp: Path) -> Path:
    """A copy of the tiny checkpoint whose tokenizer pads with its EOS token: a text answer then
    ends on the padding id, and the score is read one token earlier (transformers' rule)."""
    import shutil

    copy_dir = tmp / "pad-eos"
    shutil.copytree(path, copy_dir)
    config = json.loads((copy_dir / "tokenizer_config.json").read_text())
    config["pad_token"] = config["eos_token"]
    (copy_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return copy_dir


def trl_run(path: Path, ours: torch.nn.Module, rows: list[dict], center, tmp: Path):
    """TRL's RewardTrainer on transformers' sequence-classification model with our weights: its
    prepared rows, the loss of one batch of all rows, its metrics and the gradients by our names."""
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.float32
    )
    lora = any("lora_" in n for n, _ in ours.named_parameters())
    args = trl.RewardConfig(
        output_dir=str(tmp / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None,
        per_device_train_batch_size=len(rows), disable_dropout=True, center_rewards_coefficient=center,
    )  # fmt: skip
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        task_type="SEQ_CLS",
        modules_to_save=["score"],
    )
    trainer = trl.RewardTrainer(
        model=hf, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(path), peft_config=peft_config if lora else None,
    )  # fmt: skip
    names = {}  # theirs -> ours
    for name, _ in trainer.model.named_parameters():
        mine = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        names[name] = mine.replace(".original_module", "")
    ours_state = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if names[name] in ours_state and (not lora or "lora_" in name or "score" in name):
                p.copy_(ours_state[names[name]])
    prepared = [trainer.train_dataset[i] for i in range(len(rows))]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(prepared))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {names[n]: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    return prepared, loss.detach(), metrics, grads


CASES = [  # (data format, method, centre coefficient, margins, pad is EOS)
    ("conversational", "lora", None, False, False),
    ("text", "lora", 0.01, True, False),
    ("implicit", "full", None, True, False),
    ("text", "full", 0.1, False, True),
]


@pytest.mark.parametrize(("fmt", "method", "center", "margins", "pad_eos"), CASES, ids=str)
def test_loss_metrics_and_gradients_equal_trl(tiny_hf_dir, tmp_path, fmt, method, center, margins, pad_eos):
    path = with_pad_as_eos(tiny_hf_dir, tmp_path) if pad_eos else tiny_hf_dir
    rows = rows_in(fmt)
    if margins:
        rows = [{**r, "margin": m} for r, m in zip(rows, [0.5, 0.0, 2.0, -1.0], strict=True)]
    model = ours_model(path, method)
    attach_score(model, seed=4)
    prepared, trl_loss, trl_metrics, trl_grads = trl_run(path, model, rows, center, tmp_path)

    tokenizer = load_checkpoint(path).tokenizer
    pairs, _ = tokenize_pairs(
        read_pairs(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, max_seq_len=4096
    )
    for p, t in zip(pairs, prepared, strict=True):  # the whole of prompt + answer, as TRL tokenizes it
        assert (p.prompt + p.chosen, p.prompt + p.rejected) == (t["chosen_ids"], t["rejected_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_eos:
        assert all(p.chosen[-1] == pad for p in pairs)  # the score is read before the final EOS
    batch = RewardSource(pairs, pad).batch(range(len(pairs)))
    total, n, extra = RewardObjective(center)(model, batch)
    (total / n).backward()

    torch.testing.assert_close(total.detach() / n, trl_loss, rtol=1e-5, atol=1e-5)
    ours = {k: (float(v.total) / v.n if hasattr(v, "n") else float(v) / n) for k, v in extra.items()}
    for mine, theirs in (("accuracy", "accuracy"), ("margin", "margin"), ("mean_reward", "mean_reward")):
        assert ours[mine] == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-5), mine
    assert 0 < ours["accuracy"] < 1  # the pairs are not all alike
    assert "score.weight" in assert_same_gradients(model, trl_grads)


# ----- the command ------------------------------------------------------------------------------------

TRAIN = {"lr": 1e-2, "max_steps": 30, "batch_size": 4, "eval_every": 10, "save_every": 10, "seed": 3}


def reward_config(model: Path, data: Path, out: Path, **fields) -> RewardConfig:
    return run_config(RewardConfig, model, data, out, TRAIN, **fields)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rm") / "pairs.jsonl", pair_rows(24))


def hf_rewards(model, tokenizer, pairs) -> torch.Tensor:
    """transformers' sequence-classification scores of prompt + chosen, then prompt + rejected."""
    ids = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    width = max(map(len, ids))
    pad = model.config.pad_token_id
    inputs = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    with torch.no_grad():
        return model(input_ids=inputs, attention_mask=(torch.arange(width) < torch.tensor([[len(x)] for x in ids]))
                     .long()).logits[:, 0]  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_trained_reward_model_ranks_pairs_and_transformers_scores_it_alike(
    tiny_hf_dir, pairs_file, tmp_path, method
):
    out = tmp_path / "rm"
    result = run_reward(
        reward_config(tiny_hf_dir, pairs_file, out, method=method, train={"precision": "fp32"})
    )
    accuracy = losses_of(out, "accuracy")
    assert sum(accuracy[-5:]) / 5 > 0.9 and result["metrics"]["val_accuracy"] > 0.5
    losses = losses_of(out)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert json.loads((out / "lineage.json").read_text())["kind"] == "reward"

    tokenizer = load_checkpoint(tiny_hf_dir).tokenizer
    pairs, _ = tokenize_pairs(read_pairs(pairs_file), tokenizer, max_seq_len=64)
    if method == "lora":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
        base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_hf_dir, num_labels=1)
        hf = peft.PeftModel.from_pretrained(base, out).eval()
    else:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
        assert hf.config.num_labels == 1 and hf.config.architectures == ["LlamaForSequenceClassification"]
    theirs = hf_rewards(hf, tokenizer, pairs)
    assert (theirs[: len(pairs)] > theirs[len(pairs) :]).float().mean() > 0.9  # it ranks the pairs

    ours = load_checkpoint(tiny_hf_dir, decode_layout=False).model  # the same scores here
    if method == "lora":
        from weightsmith.lora import head_weight, load_adapter

        load_adapter(ours, out, reward=True)
        attach_score(ours, 0, head_weight(out))
    else:
        from safetensors.torch import load_file

        with pytest.raises(Exception, match="a reward model .it scores text, it cannot generate"):
            load_checkpoint(out / "model")  # chat, generate, serve: refused in one line
        ours = load_checkpoint(out / "model", decode_layout=False, reward=True).model
        attach_score(ours, 0, load_file(str(out / "model" / "model.safetensors"))["score.weight"])
    from weightsmith.train.reward_model import pair_rewards

    with torch.no_grad():
        mine = pair_rewards(ours.eval(), RewardSource(pairs, hf.config.pad_token_id).batch(range(len(pairs))))
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-4, atol=1e-4)


def test_resume_after_sigkill_gives_the_uninterrupted_losses(tiny_hf_dir, pairs_file, tmp_path):
    from test_finetune import _losses_after, _run_until_checkpoint

    steps, train = 48, {"max_steps": 48, "save_every": 2, "eval_every": 0}
    reference = tmp_path / "ref"
    run_reward(reward_config(tiny_hf_dir, pairs_file, reference, train=train))
    cut = tmp_path / "cut"
    flags = [f"--train.{key.replace('_', '-')}={value}" for key, value in {**TRAIN, **train}.items()]
    lora = ["--lora.rank", "4", "--lora.alpha", "8", "--lora.dropout", "0.0"]
    args = [
        "reward",
        str(tiny_hf_dir),
        f"--data={pairs_file}",
        f"--out={cut}",
        "--max-seq-len=64",
        *flags,
        *lora,
    ]
    proc = _run_until_checkpoint(_cli(*args), cut / "checkpoints", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.name[5:]) for p in (cut / "checkpoints").glob("step-*"))
    assert done and done[-1] < steps, "the run finished before it was interrupted"
    assert main(["reward", "--resume", str(cut)]) == 0
    ref_losses, cut_losses = (_losses_after(o / "metrics.jsonl", done[-1]) for o in (reference, cut))
    assert sorted(cut_losses) == list(range(done[-1] + 1, steps + 1))
    for step, loss in ref_losses.items():
        assert abs(cut_losses[step] - loss) <= 1e-6, step


def test_a_reward_adapter_is_not_a_chat_adapter_and_bad_margins_are_named(
    tiny_hf_dir, pairs_file, tmp_path, capsys
):
    out = tmp_path / "rm"
    run_reward(reward_config(tiny_hf_dir, pairs_file, out, train={"max_steps": 2}))
    code = main(["generate", str(tiny_hf_dir), "--adapter", str(out), "--prompt", "hi", "-n", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "a reward model's adapter" in err and "\n" not in err
    from weightsmith.lora import load_adapter

    with pytest.raises(Exception, match="not a reward model's adapter"):
        fresh = load_checkpoint(tiny_hf_dir, decode_layout=False).model
        run_dir = tmp_path / "lora"
        from weightsmith.lora import LoraConfig, apply_lora, save_adapter

        apply_lora(fresh, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
        save_adapter(fresh, run_dir, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
        load_adapter(
            copy.deepcopy(load_checkpoint(tiny_hf_dir, decode_layout=False).model), run_dir, reward=True
        )
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**pair_rows(1)[0], "margin": "big"}])
    code = main(["reward", str(tiny_hf_dir), "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and f"{bad}:1: margin: must be a number" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


# ----- as a grpo reward -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_rm(tiny_hf_dir, pairs_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "rm"
    run_reward(reward_config(tiny_hf_dir, pairs_file, out, train={"max_steps": 6, "precision": "fp32"}))
    return out


def test_a_model_reward_scores_as_trl_scores_with_a_reward_model(tiny_hf_dir, trained_rm):
    """TRL's GRPOTrainer renders prompt + completion with the reward model's chat template (text:
    prompt + completion), tokenizes without special tokens and reads the classifier's logit."""
    from weightsmith.train.rewards import RewardContext, parse_rewards

    (reward,) = parse_rewards([f"model:{trained_rm}:0.5"], RewardContext(8))
    assert reward.name == "model" and reward.weight == 0.5
    reward.fn.load(torch.device("cpu"), tiny_hf_dir)
    rows = [{"prompt": [{"role": "user", "content": "fox dog?"}]}, {"prompt": "Q: quick brown?\nA:"}] * 2
    completions = ["The fox jumps over the lazy dog.", " No dog, fox fox.", "No fox.", " The quick one."]
    ours = torch.tensor(reward.fn(completions, rows, [0] * 4))

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    texts = [
        tokenizer.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": c}], tokenize=False)
        if isinstance(r["prompt"], list) else r["prompt"] + c
        for r, c in zip(rows, completions, strict=True)
    ]  # fmt: skip
    inputs = tokenizer(
        text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    )
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_hf_dir, num_labels=1)
    hf = peft.PeftModel.from_pretrained(base, trained_rm).eval()
    with torch.no_grad():
        theirs = hf(**inputs).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0  # the scores tell the completions apart


def test_grpo_trains_against_a_reward_model(tiny_hf_dir, trained_rm, tmp_path):
    from test_grpo import config, write_prompts

    from weightsmith.train.grpo import run_grpo

    out = tmp_path / "rl"
    result = run_grpo(
        config(tiny_hf_dir, write_prompts(tmp_path / "p.jsonl"), out, reward=[f"model:{trained_rm}"])
    )
    assert result["rewards"] == {"model": 1.0}
    scores = [
        m["reward_model"] for m in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
    ]
    assert len(scores) == 6 and len(set(scores)) > 1
    lineage = json.loads((out / "lineage.json").read_text())
    assert any("reward_model" in json.dumps(i) for i in lineage["inputs"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [("model:", "give the reward model's folder"), ("model:/nowhere/rm", "/nowhere/rm holds no reward model"),
     ("model:{rm}:0", "the weight must be a finite non-zero number")],
)  # fmt: skip
def test_bad_reward_model_specs_are_one_line_errors(trained_rm, spec, message):
    from weightsmith.errors import ConfigError
    from weightsmith.train.rewards import RewardContext, parse_rewards

    with pytest.raises(ConfigError, match=message):
        parse_rewards([spec.format(rm=trained_rm)], RewardContext(8))


def test_qlora_trains_a_reward_head_over_a_4bit_base(tiny_hf_dir, pairs_file, tmp_path):
    out = tmp_path / "rm"
    result = run_reward(reward_config(tiny_hf_dir, pairs_file, out, method="qlora", train={"max_steps": 3}))
    assert result["method"] == "qlora" and result["parameters"]["trainable"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    from weightsmith.train.reward_model import load_scorer

    scorer = load_scorer(
        out, torch.device("cpu"), "model:" + str(out), tiny_hf_dir
    )  # scored over the full-precision base
    assert scorer([[5, 6, 7], [8, 9]]).isfinite().all()


def test_a_reward_adapter_naming_another_base_path_is_refused(trained_rm, tiny_hf_dir, tmp_path):
    """adapter_config.json is a shared file: its base path is loaded only where it is the model
    being trained (the command line names that one)."""
    import shutil

    from weightsmith.errors import ConfigError
    from weightsmith.train.reward_model import load_scorer

    hostile = tmp_path / "rm"
    shutil.copytree(trained_rm, hostile)
    config = json.loads((hostile / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "elsewhere")
    (hostile / "adapter_config.json").write_text(json.dumps(config))
    for policy in (tiny_hf_dir, None):
        with pytest.raises(
            ConfigError,
            match="its adapter.s base is the path .*elsewhere, not a model the command line names",
        ):
            load_scorer(hostile, torch.device("cpu"), f"model:{hostile}", policy)
    assert load_scorer(trained_rm, torch.device("cpu"), "model:x", tiny_hf_dir).pad_id is not None


def test_a_reward_adapter_beside_the_trained_one_scores_as_its_own_copy(tiny_hf_dir, trained_rm):
    """A reward adapter over the checkpoint being trained with LoRA is loaded onto that model as
    a second, frozen adapter: its scores are those of a separately loaded reward model while the
    trained adapter (other targets, dropout, non-zero) stays active and unchanged around them."""
    from weightsmith.lora import LoraConfig, apply_lora, lora_layers
    from weightsmith.train.reward_model import SharedBase, load_scorer

    cpu = torch.device("cpu")
    ids = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    alone = load_scorer(trained_rm, cpu, "model:x", tiny_hf_dir)(ids)
    ckpt = load_checkpoint(tiny_hf_dir, device=cpu, dtype=torch.float32)
    model = ckpt.model
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.5)
    model.eval()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(x)
    model.train()
    scorer = load_scorer(
        trained_rm, cpu, "model:x", tiny_hf_dir, SharedBase(tiny_hf_dir, model, ckpt.tokenizer)
    )
    assert scorer.adapter == "reward0" and scorer.model is model
    torch.testing.assert_close(scorer(ids), alone, rtol=0, atol=1e-6)
    assert model.training and all(m.training for m in model.modules())  # the mode is given back
    layers = lora_layers(model)
    assert {m.active_adapter for m in layers.values()} == {"default"}
    assert len(layers) > 2 * len(model.model.layers)  # the reward adapter wraps linears of its own
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    from weightsmith.quant.nf4 import quantize_linears_nf4

    four_bit = load_checkpoint(tiny_hf_dir, device=cpu, dtype=torch.float32).model
    quantize_linears_nf4(four_bit)  # a 4-bit base would score otherwise: the reward model gets its own copy
    copy = load_scorer(
        trained_rm, cpu, "model:x", tiny_hf_dir, [SharedBase(tiny_hf_dir, four_bit, ckpt.tokenizer)]
    )
    assert copy.adapter is None and copy.model is not four_bit
    torch.testing.assert_close(copy(ids), alone, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_grpo_scores_with_a_reward_adapter_on_its_own_base(tiny_hf_dir, trained_rm, tmp_path, caplog, method):
    """GRPO with LoRA and a reward adapter over the same checkpoint keeps one copy of the base:
    every logged reward, through six steps of a changing policy adapter, equals a separate reward
    model's score, and only the policy's adapter is trained and saved. Under QLoRA the base is
    4-bit, so the reward model loads its own full-precision copy (and scores alike)."""
    import logging

    from safetensors.torch import load_file
    from test_grpo import config, write_prompts

    from weightsmith.train.grpo import run_grpo
    from weightsmith.train.rewards import RewardContext, parse_rewards

    prompts, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "rl"
    cfg = config(tiny_hf_dir, prompts, out, reward=[f"model:{trained_rm}"], method=method,
                 train={"precision": "fp32"})  # fmt: skip
    with caplog.at_level(logging.INFO, logger="weightsmith"):
        result = run_grpo(cfg)
    assert ("no second copy of the base model" in caplog.text) == (method == "lora")
    logged = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == 6 * 2 * 4 and len({r["reward"] for r in logged}) > 4
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    (alone,) = parse_rewards([f"model:{trained_rm}"], RewardContext(8))
    alone.fn.load(torch.device("cpu"), tiny_hf_dir)  # a second copy, as before sharing
    texts = [r["completion"] for r in logged]
    which = [rows[int(r["prompt"].rpartition(":")[2]) - 1] for r in logged]
    torch.testing.assert_close(
        torch.tensor([r["reward"] for r in logged]), torch.tensor(alone.fn(texts, which, [0] * len(texts))),
        rtol=0, atol=2e-6,
    )  # fmt: skip
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == result["parameters"]["trainable"]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
