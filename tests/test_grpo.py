"""The `grpo` command end to end on a tiny random model: the rewarded behaviour grows, an
interrupted run resumes to the uninterrupted run's losses and samples, the outputs are
written (adapter, metrics with rewards, rollouts.jsonl, lineage), and bad flags and data stop
before any model loads. The loss itself is checked against TRL in test_grpo_parity.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from weightsmith.cli.main import main
from weightsmith.config import config_from_dict
from weightsmith.errors import WeightsmithError
from weightsmith.train.data import DataError
from weightsmith.train.grpo import GrpoConfig, run_grpo
from weightsmith.train.loop import TrainingInterrupted
from weightsmith.train.rewards import Reward
from weightsmith.train.runs import read_metrics

TRAIN = {"lr": 2e-2, "max_steps": 6, "batch_size": 2, "eval_every": 0, "save_every": 2, "seed": 3}
VOWELS = set("aeiouAEIOU")


def write_prompts(path: Path, n: int = 8) -> Path:
    rows = [
        {"prompt": [{"role": "user", "content": f"Say something, number {i}."}], "id": i} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(model: Path, data: Path, out: Path, **fields) -> GrpoConfig:
    values = {
        "model": str(model), "data": str(data), "out": str(out), "max_seq_len": 96, "num_generations": 4,
        "max_completion_len": 8, "valid_fraction": 0.0, "reward": [],
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "train": {**TRAIN, **fields.pop("train", {})}, **fields,
    }  # fmt: skip
    return config_from_dict(GrpoConfig, values)


def vowels(texts: list[str], rows: list[dict], lengths: list[int]) -> list[float | None]:
    """A dense reward the tiny model can learn: the share of its characters that are vowels."""
    return [sum(c in VOWELS for c in t) / max(len(t), 1) for t in texts]


def test_training_raises_the_reward(tiny_hf_dir, tmp_path):
    """The tiny model with half its vocabulary as end tokens and the length reward at full
    band (-length / L): the shorter the better, so the end tokens must grow likelier. The LM
    head is adapted too: a random tiny model's head holds nearly all of its say over them."""
    path = tmp_path / "tiny"
    shutil.copytree(tiny_hf_dir, path)
    for name in ("config.json", "generation_config.json"):
        config_json = json.loads((path / name).read_text())
        config_json["eos_token_id"] = list(range(160))
        (path / name).write_text(json.dumps(config_json))
    out = tmp_path / "run"
    cfg = config(
        path, write_prompts(tmp_path / "p.jsonl", 16), out, reward=["length"], overlong_cache=8,
        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]},
        train={"max_steps": 80, "save_every": 0, "schedule": "constant", "lr": 3e-2},
    )  # fmt: skip
    result = run_grpo(cfg)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(steps) == 80 and all("reward_length" in m and "completion_len" in m for m in steps)
    first = {k: sum(m[k] for m in steps[:8]) / 8 for k in ("reward", "completion_len")}
    last = {k: sum(m[k] for m in steps[-10:]) / 10 for k in ("reward", "completion_len")}
    # An end token first half the time: about 2 tokens a completion (reward -0.25); all the time: 1 (-0.125)
    assert first["completion_len"] > 1.6 and last["completion_len"] < 1.3, (first, last)
    assert last["reward"] > first["reward"] + 0.06
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 80 * 2 * 4  # steps x prompts x completions
    assert {r["step"] for r in rollouts} == set(range(1, 81))
    assert all(r["prompt"].startswith(str(tmp_path / "p.jsonl:")) for r in rollouts)
    assert (out / "adapter_model.safetensors").is_file() and (out / "run.json").is_file()
    assert result["rewards"] == {"length": 1.0} and result["num_generations"] == 4


class Interrupting:
    """The vowel reward, sending this process SIGINT during step `at`'s sampling: the loop then
    finishes that step, saves a checkpoint and stops (as Ctrl-C does)."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls = at, 0

    def __call__(self, texts, rows, lengths):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return vowels(texts, rows, lengths)


@pytest.mark.parametrize("iterations", [1, 2])
def test_an_interrupted_run_resumes_to_the_same_losses_and_samples(tiny_hf_dir, tmp_path, iterations):
    """With --num-iterations 2 each draw serves two steps: the stop asked for during step 3's
    sampling waits for step 4, the last to learn from that draw, and the checkpoint is step 4's."""
    data = write_prompts(tmp_path / "p.jsonl")
    whole = tmp_path / "whole"
    flags = {"num_iterations": iterations, "scale_rewards": "batch" if iterations > 1 else "group"}
    run_grpo(config(tiny_hf_dir, data, whole, **flags), rewards=[Reward("vowels", Interrupting(None))])
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted, match="grpo --resume"):
        run_grpo(
            config(tiny_hf_dir, data, cut, train={"save_every": 0}, **flags),
            rewards=[Reward("vowels", Interrupting(3 if iterations == 1 else 2))],
        )
    saved = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert saved == [f"step-0000000{3 if iterations == 1 else 4}"]
    run_grpo(
        config(tiny_hf_dir, data, cut, resume=str(cut), **flags),
        rewards=[Reward("vowels", Interrupting(None))],
    )

    def losses(path: Path) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in read_metrics(path / "metrics.jsonl") if "loss" in m}

    assert sorted(losses(cut)) == list(range(1, 7))
    for step, loss in losses(whole).items():
        assert abs(losses(cut)[step] - loss) <= 1e-6, step
    assert (cut / "rollouts.jsonl").read_text() == (whole / "rollouts.jsonl").read_text()
    if iterations == 1:
        return
    steps = [m for m in read_metrics(whole / "metrics.jsonl") if "loss" in m]
    rollouts = [json.loads(line) for line in (whole / "rollouts.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rollouts} == {1, 3, 5} and len(rollouts) == 3 * 2 * 4  # a draw every 2 steps
    for first, second in zip(steps[::2], steps[1::2], strict=True):  # the same completions, other weights
        assert first["reward"] == second["reward"] and first["loss"] != second["loss"]
        assert first["clip_low"] == first["clip_high"] == 0  # at the first pass the ratio is 1
        assert 0 <= second["clip_low"] + second["clip_high"] < 1
    assert any(m["clip_low"] + m["clip_high"] > 0 for m in steps[1::2])  # lr 2e-2 moves the ratios


def test_the_cli_trains_with_builtin_rewards_and_writes_its_outputs(tiny_hf_dir, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    rows = [{"prompt": f"Q{i}: what is {i} + {i}? A:", "answer": 2 * i} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cli"
    args = ["grpo", str(tiny_hf_dir), "--data", str(data), "--out", str(out), "--reward", "answer",
            "--reward", "length:0.5", "--num-generations", "2", "--max-completion-len", "6", "--max-seq-len", "64",
            "--valid-fraction", "0.34", "--train.max-steps", "2", "--train.batch-size", "2", "--lora.rank", "2",
            "--beta", "0.04", "--num-iterations", "2", "--importance-sampling", "sequence", "--delta", "4",
            "--scale-rewards", "batch", "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rewards"] == {"answer": 1.0, "length": 0.5}
    metrics = result["metrics"]
    for key in ("loss", "reward", "reward_answer", "reward_length", "kl", "val_reward", "completion_len", "entropy",
                "clip_low", "clip_high"):  # fmt: skip
        assert key in metrics, key
    assert -1.0 <= metrics["reward_length"] <= 0.0
    assert (out / "adapter_config.json").is_file() and (out / "lineage.json").is_file()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_generations": 1}, "--num-generations 1: must be at least 2"),
        ({"reward": ["answr"]}, "answr"),
        ({"max_completion_len": 96}, "--max-completion-len 96: must be below --max-seq-len 96"),
        ({"temperature": 0.0}, "--temperature 0.0: must be above 0"),
        ({"epsilon": 1.5}, "--epsilon 1.5"),
        ({"num_iterations": 0}, "--num-iterations 0: must be 1 or more"),
        ({"delta": 1.1, "epsilon_high": 0.28}, "--delta 1.1: must be above 1 + epsilon-high"),
        ({"importance_sampling": "word"}, "importance_sampling: expected one of token, sequence, got 'word'"),
        ({"scale_rewards": "global"}, "scale_rewards: expected one of group, batch, none, got 'global'"),
        ({"sapo_temperature_neg": 0.0}, "--sapo-temperature-neg 0.0: must be above 0"),
        ({"top_entropy_quantile": 0.0}, "--top-entropy-quantile 0.0: must be in (0, 1]"),
        ({"loss": "bnpo", "nproc_per_node": 2}, "--loss bnpo normalises each micro-batch by a rank's"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_hf_dir, tmp_path, fields, message):
    with pytest.raises(WeightsmithError, match=re.escape(message)) as err:
        config(tiny_hf_dir, tmp_path / "p.jsonl", tmp_path / "o", **fields)
    assert "\n" not in str(err.value)


def test_a_row_without_the_rewards_field_stops_before_the_model_loads(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2="}\n')
    cfg = config(tmp_path / "no-such-model", data, tmp_path / "o", reward=["answer"])
    with pytest.raises(DataError, match=r"q.jsonl:2: answer: missing"):
        from weightsmith.train.grpo import load_prompts
        from weightsmith.train.runs import resolve_config

        load_prompts(resolve_config(cfg, "grpo"), tokenizer=None)


def test_reproduce_gives_the_same_adapter_and_samples(tiny_hf_dir, tmp_path, capsys):
    data = write_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "run"
    args = ["grpo", str(tiny_hf_dir), "--data", str(data), "--out", str(out), "--reward", "length",
            "--num-generations", "2", "--max-completion-len", "4", "--max-seq-len", "64", "--valid-fraction", "0",
            "--train.max-steps", "2", "--train.batch-size", "2", "--lora.rank", "2"]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["reproduce", str(out), "--out", str(again), "--root", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    status = {o["path"]: o["status"] for o in result["outputs"]}
    assert status["adapter_model.safetensors"] == status["rollouts.jsonl"] == "identical", status


def test_reproduce_refuses_a_run_scored_by_python_functions(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(tiny_hf_dir, write_prompts(tmp_path / "p.jsonl", 4), out, reward=["length"],
                 train={"max_steps": 1, "save_every": 0})  # fmt: skip
    run_grpo(cfg, rewards=[Reward("vowels", vowels)])
    assert main(["reproduce", str(out), "--out", str(tmp_path / "again"), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Python reward functions (vowels)" in err and len(err.strip().splitlines()) == 1


def test_reward_metrics_of_a_split_step_are_those_of_the_whole_batch() -> None:
    """A step's completions split over micro-batches or ranks (here halves with different
    lengths and declined rewards) report the means over all its completions, as TRL logs them:
    each part's (sum, count) is added up before dividing, not each part's mean weighed by its
    tokens."""
    import math

    import torch

    from weightsmith.train.grpo_data import _metrics
    from weightsmith.train.metric_sums import Mean, MetricSums

    rewards = [Reward("a", lambda *a: []), Reward("b", lambda *a: [])]
    nan = math.nan
    table = torch.tensor([[1.0, nan], [0.0, 2.0], [nan, nan], [1.0, 1.0], [0.5, nan], [0.0, 3.0]])
    total = torch.tensor([1.0, 2.0, nan, 2.0, 0.5, 3.0])
    ids = [[1], [1, 2, 3], [1, 2], [1, 2, 3, 4, 5, 6], [1], [1, 2]]
    truncated = [False, True, False, True, False, False]

    def means(parts: list[slice]) -> dict[str, float]:
        sums = MetricSums()
        for part in parts:
            got = _metrics(rewards, table[part], total[part], 3, ids[part], truncated[part])
            sums.add({key: Mean(*pair) for key, pair in got.items()})
        return sums.means(sums.flat(), 1.0)

    whole = means([slice(0, 6)])
    assert means([slice(0, 3), slice(3, 6)]) == pytest.approx(whole)
    assert whole["reward"] == pytest.approx((1 + 2 + 2 + 0.5 + 3) / 5)  # the declined one left out
    assert whole["reward_a"] == pytest.approx(2.5 / 5) and whole["reward_b"] == pytest.approx(6 / 3)
    assert whole["completion_len"] == pytest.approx(15 / 6) and whole["truncated"] == pytest.approx(2 / 6)
    # both groups' scored rewards differ (the declined one left out, as in the advantages)
    assert whole["reward_zero_std"] == 0.0
    same = torch.tensor([2.0, nan, 2.0, 1.0, 1.0, 1.0])
    got = _metrics(rewards, table, same, 3, ids, truncated)["reward_zero_std"]
    assert got == (2.0, 2.0)
    lone = torch.tensor([nan, nan, 5.0, 1.0, 2.0, 1.0])  # one scored reward: no spread to learn from
    assert _metrics(rewards, table, lone, 3, ids, truncated)["reward_zero_std"] == (1.0, 2.0)


def test_batch_scaling_divides_by_the_deviation_of_the_whole_step() -> None:
    """--scale-rewards batch: a step's micro-batches (and ranks) are scaled by the deviation of
    all its rewards together, as TRL scales a generation batch; a stand-in batch's completions
    count in neither the deviation nor the log."""
    import math

    import torch

    from weightsmith.train.distributed import World
    from weightsmith.train.grpo import StepSource
    from weightsmith.train.grpo_data import GroupBatch, PromptSource, group_advantages

    parts = [torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0]), torch.tensor([5.0, math.nan, 4.0, 0.0, 0.0, 0.0])]
    stand_in = torch.tensor([9.0, 0.0, 9.0, 0.0, 9.0, 0.0])

    def batch(rewards: torch.Tensor, tag: str) -> GroupBatch:
        empty = torch.zeros(0, dtype=torch.long)
        return GroupBatch(
            *[empty] * 6, group_advantages(rewards, 3, "batch"), torch.zeros(0), n_tokens=0, count=0,
            completions=[{"tag": tag, "advantage": None} for _ in rewards], rewards=rewards,
            centred=group_advantages(rewards, 3, "none"),
        )  # fmt: skip

    batches = [(batch(parts[0], "a"), True), (batch(stand_in, "x"), False), (batch(parts[1], "b"), True)]
    logged: list[dict] = []
    StepSource(PromptSource([]), logged.extend, World(), batch_scale=True).whole_step(batches)  # type: ignore[arg-type]
    want = group_advantages(torch.cat(parts), 3, "batch")
    torch.testing.assert_close(torch.cat([batches[0][0].advantages, batches[2][0].advantages]), want)
    assert not torch.allclose(batches[0][0].advantages, group_advantages(parts[0], 3, "batch"))
    assert [c["tag"] for c in logged] == ["a"] * 6 + ["b"] * 6
    assert [c["advantage"] for c in logged] == [round(a, 6) for a in want.tolist()]
    assert batches[2][0].advantages[1] == 0  # declined
