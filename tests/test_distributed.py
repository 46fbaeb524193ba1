"""Training on two gloo processes started through the real CLI (`--nproc-per-node 2`):
LoRA with DDP and LoRA DPO equal one process with the same global batch (losses and final
adapter weights, 1e-5 in fp32); a SIGKILLed rank ends the job naming it, and the run
resumes from its last complete checkpoint on 2 or on 1 process with the uninterrupted
losses; bad distributed input stops with one line before anything trains."""

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
from safetensors.torch import load_file

from weightsmith.cli.main import main
from weightsmith.train.sft import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import write_data  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT = 180

COMMON = [
    "--max-seq-len", "64", "--device", "cpu", "--valid-fraction", "0.1",
    "--train.precision", "fp32", "--train.lr", "5e-3", "--train.seed", "3",
    "--lora.rank", "4", "--lora.dropout", "0",
]  # fmt: skip


def cli(
    *args: str, timeout: float = TIMEOUT, wait: bool = True
) -> subprocess.Popen | subprocess.CompletedProcess:
    """`weightsmith ARGS` in a fresh process group (killed whole on timeout)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "weightsmith.cli.main", *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    if not wait:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]


def val_losses(out: Path) -> list[float]:
    return [m["val_loss"] for m in read_metrics(out / "metrics.jsonl") if "val_loss" in m]


def assert_same_weights(a: Path, b: Path) -> None:
    """Equal up to float summation order, as AdamW amplifies it: a weight whose gradient is near
    AdamW's eps (a rare token's embedding) moves by lr * g / (|g| + eps), so a last-bit difference
    in g's sum (two ranks' reduce against one process's) can move it by ~1e-5 in 5 steps at lr
    1e-3 (1.6e-5 seen on an AMD EPYC). A lost or doubled gradient moves weights by ~lr a step."""
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-4, msg=key)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 20 training rows: batches of 4 with accumulation 2 end each epoch on a short step
    return write_data(tmp_path_factory.mktemp("dist") / "train.jsonl", n=22)


def finetune(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["finetune", str(model), "--data", str(data), "--out", str(out), *COMMON]
    done = cli(*args, "--train.batch-size", "4", "--train.grad-accum", "2", "--train.eval-every", "2", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_lora_ddp_on_two_ranks_equals_one_process(tiny_hf_dir, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(tiny_hf_dir, data, one, "--train.max-steps", "5")
    done = finetune(tiny_hf_dir, data, two, "--train.max-steps", "5", "--nproc-per-node", "2")
    assert done.stdout.count("trained ") == 1  # the result is printed once
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val_losses(two), val_losses(one), rtol=1e-5, atol=1e-5)
    assert len(losses(one)) == 5
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")
    run = json.loads((two / "run.json").read_text())
    assert run["steps"] == 5 and run["method"] == "lora"


def test_qlora_on_fsdp_equals_one_process(tiny_hf_dir, data, tmp_path):
    """The 4-bit base stays whole on every rank (its weights are buffers); the adapters, norms
    and embeddings are sharded, and the steps are still the single process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    qlora = ["--method", "qlora", "--train.max-steps", "3", "--train.eval-every", "0"]
    finetune(tiny_hf_dir, data, one, *qlora)
    finetune(tiny_hf_dir, data, two, *qlora, "--nproc-per-node", "2", "--strategy", "fsdp")
    assert len(losses(one)) == 3
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-5)
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")


def write_pairs(path: Path, n: int = 14) -> Path:
    words = ["fox", "dog", "cat", "owl", "bee", "elk", "ant"]
    lines = []
    for i in range(n):
        a, b = words[i % len(words)], words[(3 * i + 1) % len(words)]
        lines.append(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"name a {a}"}],
                    "chosen": [{"role": "assistant", "content": f"the {a} {b}"}],
                    "rejected": [{"role": "assistant", "content": f"no {b}"}],
                }
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def on_one_and_two_ranks(
    args: list[str], tmp_path: Path, keys: tuple[str, ...], ranks: int = 2
) -> tuple[Path, Path]:
    """Run `weightsmith ARGS` in one process (OUT one) and on two (or `ranks`) ranks (OUT two);
    their losses and the metrics `keys` (summed over ranks, then divided) must agree."""
    for out, extra in ((tmp_path / "one", []), (tmp_path / "two", ["--nproc-per-node", str(ranks)])):
        done = cli(*args, "--out", str(out), *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-5)
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    for a, b in zip(m1, m2, strict=True):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    return one, two


def test_lora_dpo_on_two_ranks_equals_one_process(tiny_hf_dir, tmp_path):
    """With --precompute-ref each rank scores every other batch of pairs with the reference (the
    adapters off, as every live step does) and the parts are gathered: the stored log-probs and
    the run are one process's. (The live reference of each step is the same pass, run by
    GRPO's and KTO's two-rank tests.)"""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    args = [
        "dpo",
        str(tiny_hf_dir),
        "--data",
        str(pairs),
        *COMMON,
        "--train.batch-size",
        "4",
        "--precompute-ref",
    ]
    args += ["--train.max-steps", "4", "--train.eval-every", "2"]
    one, two = on_one_and_two_ranks(args, tmp_path, ("reward_margin", "val_reward_accuracy"))
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")
    from weightsmith.train.dpo import REFERENCE_FILE

    refs = [load_file(str(out / REFERENCE_FILE)) for out in (one, two)]
    assert refs[0].keys() == refs[1].keys() and refs[0]["train"].shape[0] > 4  # more than one batch
    for key, value in refs[0].items():
        torch.testing.assert_close(refs[1][key], value, rtol=0, atol=0)


def test_kto_on_three_ranks_equals_one_process_with_z0_pooled_over_ranks(tiny_hf_dir, tmp_path):
    """KTO's z0 is the mean over every rank's KL completions (each rank holds 1 of a micro-batch's
    3): per-rank values would change the losses. The last validation micro-batch holds 2
    examples, so the third rank runs a stand-in (a copy of the first) whose KL log-ratio must
    count for nothing."""
    from test_dpo import write_jsonl
    from test_kto import feedback_rows

    rows = feedback_rows(20)
    train, valid = write_jsonl(tmp_path / "t.jsonl", rows[:15]), write_jsonl(tmp_path / "v.jsonl", rows[15:])
    args = [
        "kto",
        str(tiny_hf_dir),
        "--data",
        str(train),
        "--valid",
        str(valid),
        *COMMON,
        "--train.batch-size",
        "3",
    ]
    args += ["--train.max-steps", "4", "--train.eval-every", "2"]
    one, two = on_one_and_two_ranks(args, tmp_path, ("kl", "reward_chosen", "val_kl", "val_loss"), ranks=3)
    kl = [m["kl"] for m in read_metrics(one / "metrics.jsonl") if "kl" in m]
    assert max(kl) > 0  # z0 is not clamped to 0 throughout, so pooling it is tested
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")


def ranks_of(parent: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes whose parent is `parent` (the launcher)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(
                item.split("=", 1)
                for item in (entry / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigkill_of_a_rank_ends_the_job_and_the_run_resumes_on_two_or_one(tiny_hf_dir, data, tmp_path):
    steps = ["--train.max-steps", "8", "--train.save-every", "2"]
    full = tmp_path / "full"
    finetune(tiny_hf_dir, data, full, *steps)
    killed = tmp_path / "killed"
    args = ["finetune", str(tiny_hf_dir), "--data", str(data), "--out", str(killed), *COMMON, *steps]
    args += ["--train.batch-size", "4", "--train.grad-accum", "2", "--train.eval-every", "2"]
    proc = cli(*args, "--nproc-per-node", "2", "--dist-timeout", "20", wait=False)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not (killed / "checkpoints" / "step-00000002").is_dir():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        ranks = ranks_of(proc.pid)
        assert 1 in ranks, ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert "rank 1 failed: killed by SIGKILL" in last, err[-3000:]
    assert not (killed / "run.json").exists()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert done and all(name.startswith("step-") for name in done)
    for nproc in ("2", "1"):
        again = tmp_path / f"again-{nproc}"
        subprocess.run(["cp", "-r", str(killed), str(again)], check=True)
        resumed = cli("finetune", "--resume", str(again), "--nproc-per-node", nproc)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        torch.testing.assert_close(losses(again), losses(full), rtol=1e-5, atol=1e-5)
        assert_same_weights(full / "adapter_model.safetensors", again / "adapter_model.safetensors")


def test_the_rank_named_is_the_cause_not_one_that_lost_contact_in_the_same_second(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from weightsmith.train.distributed import LostContact, root_cause

    def failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
        made = ProcessFailure(rank, 1000 + rank, exitcode, str(tmp_path / f"none-{rank}.json"))
        made.timestamp = timestamp
        return made

    lost, killed = LostContact.exit_code, -signal.SIGKILL
    # rank 0 noticed within the second torchrun stamped rank 1's kill: torchrun would name rank 0
    assert root_cause({0: failure(0, lost, 100), 1: failure(1, killed, 100)})[0] == 1
    assert root_cause({0: failure(0, lost, 99), 1: failure(1, 1, 100)})[0] == 1
    assert root_cause({0: failure(0, 1, 101), 1: failure(1, killed, 100)})[0] == 1  # earliest cause
    assert root_cause({0: failure(0, 1, 100), 1: failure(1, killed, 100)})[0] == 0  # tie: lowest
    assert root_cause({0: failure(0, lost, 100), 1: failure(1, lost, 99)})[0] == 1  # all lost


# ----- bad input: one line, nothing starts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "env", "needle"),
    [
        (["--nproc-per-node", "0"], {}, "--nproc-per-node 0: must be at least 1"),
        (["--nproc-per-node", "2", "--train.batch-size", "3"], {}, "must be a multiple of the world size 2"),
        ([], {"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT is not"),
        ([], {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "MASTER_ADDR, MASTER_PORT is not"),
    ],
)
def test_bad_distributed_input_is_one_line(
    tiny_hf_dir, data, tmp_path, monkeypatch, capsys, extra, env, needle
):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    code = main(["finetune", str(tiny_hf_dir), "--data", str(data), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


# ----- FSDP2: full fine-tuning sharded over two ranks ---------------------------------------------


def full_model_weights(out: Path) -> Path:
    return out / "model" / "model.safetensors"


def resume_last_step(run: Path, copy: Path, nproc: str) -> None:
    """Copy a finished run, forget its end, and finish it again from its last checkpoint."""
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    (copy / "run.json").unlink()
    done = cli("finetune", "--resume", str(copy), "--nproc-per-node", nproc)
    assert done.returncode == 0, done.stderr[-3000:]


def test_full_fsdp_on_two_ranks_equals_one_process_and_resumes_on_other_world_sizes(
    tiny_hf_dir, data, tmp_path
):
    steps = ["--method", "full", "--strategy", "fsdp", "--train.max-steps", "5", "--train.save-every", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    finetune(tiny_hf_dir, data, one, *steps, "--train.lr", "1e-3")
    finetune(tiny_hf_dir, data, two, *steps, "--train.lr", "1e-3", "--nproc-per-node", "2")
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=1e-5)
    assert len(losses(one)) == 5
    assert_same_weights(full_model_weights(one), full_model_weights(two))
    assert (two / "checkpoints" / "step-00000004" / ".metadata").is_file()  # DCP shards
    # DCP reshards: the 2-rank run finishes on 1 process, the 1-process run on 2 ranks
    for run, nproc in ((two, "1"), (one, "2")):
        again = tmp_path / f"{run.name}-on-{nproc}"
        resume_last_step(run, again, nproc)
        torch.testing.assert_close(losses(again), losses(one), rtol=1e-5, atol=1e-5)
        assert_same_weights(full_model_weights(one), full_model_weights(again))


# ----- dropout: each rank draws its own masks, and resumes its own stream ------------------------


def _rank_streams(rank: int, init: str, out: str) -> None:
    """One rank of a two-process gloo group: the draws that dropout would make, before and
    after a checkpoint's RNG state is saved and restored (on two ranks, and on one)."""
    from weightsmith.train import checkpoints as ckpt
    from weightsmith.train.distributed import World

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        world = World(rank=rank, size=2)
        torch.manual_seed(7)  # what every rank holds after building the same model
        ckpt.split_rng(rank)
        first = torch.rand(8)
        saved = ckpt.rng_state(world.gather(ckpt.rng_state()))
        after = torch.rand(8)
        ckpt.set_rng_state(saved, rank, 2)
        again = torch.rand(8)
        ckpt.set_rng_state(saved, 0, 1)  # resumed on one process: rank 0's stream
        single = torch.rand(8)
        ckpt.set_rng_state(saved, rank, 3)  # resumed on three: split afresh
        three = torch.rand(8)
        torch.save({"first": first, "after": after, "again": again, "single": single, "three": three}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_draw_different_dropout_masks_and_resume_their_own(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.start_processes(lambda r: _rank_streams(r, init, outs[r]), nprocs=2, start_method="fork", join=True)
    r0, r1 = (torch.load(p) for p in outs)
    assert not torch.equal(r0["first"], r1["first"])  # not one mask for every rank's rows
    for r in (r0, r1):
        torch.testing.assert_close(r["again"], r["after"], rtol=0, atol=0)  # each rank's own stream
    torch.testing.assert_close(r1["single"], r0["after"], rtol=0, atol=0)
    assert not torch.equal(r0["three"], r1["three"])


def write_prompts(path: Path, n: int = 8) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"say {i}"}], "contains": ["e", "o"]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "reuse",
    [[], ["--num-iterations", "2", "--scale-rewards", "batch", "--top-entropy-quantile", "0.5"]],
    ids=["1", "2"],
)
def test_lora_grpo_on_two_ranks_equals_one_process(tiny_hf_dir, tmp_path, reuse):
    """Each rank samples its share of the prompts with the seeds one process would use, so the
    losses, rewards, weights and the record of every sample match; with batches that serve two
    steps each, advantages scaled by the deviation of every rank's rewards and the entropy
    threshold taken over every rank's tokens too."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    args = ["grpo", str(tiny_hf_dir), "--data", str(prompts), *COMMON, "--train.batch-size", "4", *reuse]
    args += ["--train.max-steps", "3", "--reward", "contains", "--reward", "length:0.5", "--num-generations", "3",
             "--max-completion-len", "6", "--beta", "0.04", "--valid-fraction", "0.25", "--train.eval-every", "2"]  # fmt: skip
    one, two = on_one_and_two_ranks(args, tmp_path, ("reward", "reward_contains", "kl", "val_reward"))
    m1 = read_metrics(one / "metrics.jsonl")
    assert any(m.get("reward_contains", 0) > 0 for m in m1)  # the rewards are not all zero
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")
    rollouts = [(out / "rollouts.jsonl").read_text() for out in (one, two)]
    assert rollouts[0] == rollouts[1]  # every rank's samples, in one process's order


def test_on_policy_distill_on_two_ranks_equals_one_process(tiny_hf_dir, tmp_path):
    """Every rank draws the same micro-batches for the student to answer and samples its share of
    the prompts with one process's seeds; the teacher scores them on each rank: the losses, the
    divergence, the share answered and the answers' lengths match, and so do the weights."""
    from conftest import build_tiny_hf_dir
    from test_distill import chat_rows
    from test_dpo import write_jsonl

    teacher = build_tiny_hf_dir(tmp_path / "teacher", seed=1, num_hidden_layers=3)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    args = ["distill", str(tiny_hf_dir), "--teacher", str(teacher), "--data", str(data), *COMMON,
            "--train.batch-size", "4", "--train.max-steps", "4", "--train.eval-every", "2", "--on-policy", "0.3",
            "--max-completion-len", "6", "--loss", "jsd"]  # fmt: skip
    one, two = on_one_and_two_ranks(
        args, tmp_path, ("kd", "on_policy", "completion_len", "val_kd", "val_nll")
    )
    shares = [m["on_policy"] for m in read_metrics(one / "metrics.jsonl") if "on_policy" in m]
    assert 0 < sum(shares) < len(shares)  # some steps the student's answers, some the data's
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")


def test_precomputed_teacher_table_on_two_ranks_equals_one_process(tiny_hf_dir, tmp_path):
    """`--precompute-teacher`: each rank runs the teacher over every other batch of rows and the
    parts are gathered (the validation rows, one batch, fall to rank 0 alone); the stored table
    is one process's, byte for byte, and training from it gives the same losses and weights."""
    from conftest import build_tiny_hf_dir
    from test_distill import chat_rows
    from test_dpo import write_jsonl

    from weightsmith.train.distill_topk import TOPK_FILE

    teacher = build_tiny_hf_dir(tmp_path / "teacher", seed=1, num_hidden_layers=3)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    args = ["distill", str(tiny_hf_dir), "--teacher", str(teacher), "--data", str(data), *COMMON,
            "--train.batch-size", "4", "--train.max-steps", "3", "--train.eval-every", "3",
            "--precompute-teacher", "8"]  # fmt: skip
    one, two = on_one_and_two_ranks(args, tmp_path, ("kd", "teacher_nll", "val_kd"))
    tables = [load_file(str(out / TOPK_FILE)) for out in (one, two)]  # the header's key order varies
    assert tables[0].keys() == tables[1].keys() and {"train.ids", "valid.ids"} <= tables[0].keys()
    for key, value in tables[0].items():
        assert torch.equal(value, tables[1][key]), key
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")
