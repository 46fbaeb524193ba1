"""One LoRA GRPO step: weightsmith vs TRL's GRPOTrainer, each in its own process, one run.

A step is what a GRPO trainer does for one batch: sample `--generations` completions for each
of `--prompts` prompts with the weights being trained (temperature 1), score them (the same
length-only reward for both: what is timed is the machinery, not a checker), compute the
advantages, then forward + backward of the clipped policy loss over every completion token and
an AdamW step. Both sides train a fresh LoRA adapter (rank 8, alpha 16, no dropout, all seven
projections) on the default model (SmolLM2-135M-Instruct; TRL on transformers' own conversion
of the same GGUF file to fp32), fp32 on the CPU with the same thread count. Every completion
is exactly `--completion-len` tokens on both sides (end tokens ignored: ours `ignore_eos`,
TRL's `min_new_tokens`), so both do the same work. The prompts are the bundled Kettlebird
questions in the model's chat template (the same token ids: tests/test_grpo_parity.py).

With `--num-iterations N` each sampling serves N updates (GRPO's mu), as both trainers
offer: TRL (`num_iterations=N`) runs one more forward at sampling time for the log-probabilities
the later updates are clipped against; weightsmith keeps those of the first update. A timed
step is then one sampling and N updates, and the printed step is its time / N (per update).

With `--reward-model`, completions are scored by a reward model instead: a LoRA reward adapter
(`weightsmith reward`, 2 steps on Kettlebird pairs) over the same default model. Ours loads it
beside the trained adapter on the policy's own base weights, as `grpo --reward model:DIR` does
for a LoRA run; the peer gets the adapter merged into a transformers sequence-classification
folder (TRL loads a reward model from a path as its own copy); a third contender, ours with a
second copy of the base (how `grpo` scored before, and still does under QLoRA), shows what the
sharing saves.

Each contender warms up for one step, then times `--steps` steps; processes alternate (ours,
peer, ours, ...) so a noisy neighbour slows both alike. Printed: the median step, its sampling
part, completion tokens per second, peak memory and the ratio peer / ours (> 1: weightsmith
is faster), with the CPU model and instruction sets.

    python benchmarks/grpo.py [--threads 2] [--prompts 4] [--generations 8] [--completion-len 32] [--steps 2]
                              [--rounds 2] [--num-iterations 1] [--reward-model]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from dpo import LORA_TARGETS, alternate, convert, start, time_steps  # beside this file

NAMES = {"ours": "weightsmith grpo (LoRA)", "peer": "TRL GRPOTrainer + peft LoRA"}
#: With --reward-model: ours scoring with a second copy of the base, as before sharing.
COPY = {"ours-copy": "weightsmith, reward model copied"}


def prompt_rows(n: int) -> list[dict]:
    """The first `n` single-turn Kettlebird questions, as conversational prompts."""
    from weightsmith.datasets import sample_path

    convs = [json.loads(line)["messages"] for line in sample_path("kettlebird/train.jsonl").open()]
    questions = [[m for m in c if m["role"] == "user"][:1] for c in convs]
    return [{"prompt": q} for q in questions if q][:n]


def lengths_reward(completions, rows, lengths):
    return [float(n % 5) for n in lengths]  # varied enough that groups have advantages


def make_reward_model(path: str, hf_dir: str) -> None:
    """A LoRA reward adapter over the GGUF model in HF_DIR/rm (2 Bradley-Terry steps: the
    bundled answer over a curt one), and that adapter merged into a transformers
    sequence-classification folder, HF_DIR/rm-merged, for TRL."""
    import peft
    import transformers

    from weightsmith.config import config_from_dict
    from weightsmith.datasets import sample_path
    from weightsmith.train.reward_model import RewardConfig, run_reward

    pairs = Path(hf_dir) / "pairs.jsonl"
    with pairs.open("w", encoding="utf-8") as f:
        for line in list(sample_path("kettlebird/train.jsonl").open())[:16]:
            convo = json.loads(line)["messages"]
            prompt, answer = convo[:-1], convo[-1]
            rejected = {"role": "assistant", "content": "No idea."}
            f.write(json.dumps({"prompt": prompt, "chosen": [answer], "rejected": [rejected]}) + "\n")
    run_reward(config_from_dict(RewardConfig, {
        "model": path, "data": str(pairs), "out": f"{hf_dir}/rm", "max_seq_len": 256, "valid_fraction": 0.0,
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 2, "precision": "fp32", "eval_every": 0, "save_every": 0},
    }))  # fmt: skip
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, num_labels=1, dtype=torch.float32
    )
    merged = peft.PeftModel.from_pretrained(base, f"{hf_dir}/rm").merge_and_unload()
    merged.config.pad_token_id = merged.config.pad_token_id or base.config.eos_token_id
    merged.save_pretrained(f"{hf_dir}/rm-merged")
    transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(f"{hf_dir}/rm-merged")


def run_ours(path: str, args: argparse.Namespace) -> dict:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.device import tune_cpu_allocator
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.train.grpo import GrpoObjective
    from weightsmith.train.grpo_data import PromptRecord, Rollout, tokenize_prompts
    from weightsmith.train.optim import make_optimizer
    from weightsmith.train.rewards import Reward

    tune_cpu_allocator()
    ckpt = load_checkpoint(path, dtype=torch.float32, decode_layout=False)
    model = ckpt.model.train()
    reward = Reward("len", lengths_reward)
    if args.reward_model:  # loaded before the LoRA is applied, as grpo loads it
        from weightsmith.train.reward_model import ModelReward, SharedBase

        scorer = ModelReward(f"model:{args.hf_dir}/rm", f"{args.hf_dir}/rm")
        shared = SharedBase(Path(path), model, ckpt.tokenizer) if args.child == "ours" else None
        scorer.load(torch.device("cpu"), Path(path), shared)
        reward = Reward("rm", scorer)
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS))
    opt = make_optimizer(model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    records = [PromptRecord(f"bench:{i}", r["prompt"], r) for i, r in enumerate(prompt_rows(args.prompts))]
    examples, _ = tokenize_prompts(records, ckpt.tokenizer, 4096, [])
    rollout = Rollout(model, ckpt.tokenizer, [reward], args.generations,
                      args.completion_len, ignore_eos=True)  # fmt: skip
    objective = GrpoObjective(keep=args.num_iterations > 1)
    counter = iter(range(10**6))
    sampling: list[float] = []

    def step() -> float:
        start = time.perf_counter()
        batch = rollout(examples, [f"bench/{next(counter)}/{i}" for i in range(len(examples))])
        sampling.append(time.perf_counter() - start)
        for _ in range(args.num_iterations):
            loss, count, _ = objective(model, batch)
            (loss / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert batch.count == args.prompts * args.generations * args.completion_len
        return float(loss) / count

    return time_steps(step, args.steps, lambda: {"sampling": sampling[1:]})


def run_peer(args: argparse.Namespace, hf_dir: str) -> dict:
    import datasets
    import peft
    import transformers
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    n = args.prompts * args.generations
    config = trl.GRPOConfig(
        output_dir="/tmp/weightsmith-bench-grpo", report_to="none", use_cpu=True, bf16=False,
        per_device_train_batch_size=n, num_generations=args.generations, max_completion_length=args.completion_len,
        generation_kwargs={"min_new_tokens": args.completion_len}, temperature=1.0, beta=0.0, loss_type="dapo",
        disable_dropout=True, gradient_checkpointing=False, num_iterations=args.num_iterations,
    )  # fmt: skip
    rows = prompt_rows(args.prompts)
    lengths = lambda completion_ids, **kw: lengths_reward(None, None, map(len, completion_ids))  # noqa: E731
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=[f"{hf_dir}/rm-merged" if args.reward_model else lengths],
        args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )  # fmt: skip
    policy = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    inputs = [r for r in rows for _ in range(args.generations)]
    sampling: list[float] = []

    def step() -> float:
        start = time.perf_counter()
        batch = trainer._generate_and_score_completions(inputs)
        sampling.append(time.perf_counter() - start)
        for _ in range(args.num_iterations):
            loss = trainer.compute_loss(policy, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert int(batch["completion_mask"].sum()) == n * args.completion_len
        return float(loss)

    return time_steps(step, args.steps, lambda: {"sampling": sampling[1:]})


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "convert":
        return convert(args.model, args.hf_dir)
    got = run_peer(args, args.hf_dir) if args.child == "peer" else run_ours(args.model, args)
    print(json.dumps(got))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--num-iterations", type=int, default=1, help="updates per sampling (GRPO's mu)")
    p.add_argument(
        "--reward-model", action="store_true", help="score with a LoRA reward model over the same base"
    )
    if "--reward-model" in sys.argv:
        NAMES.update(COPY)
    started = start(p, NAMES, child, "grpo")
    if started is None:
        return
    args, base, hf_dir = started
    if args.reward_model:
        make_reward_model(args.model, hf_dir)
    shape = ["--prompts", str(args.prompts), "--generations", str(args.generations),
             "--completion-len", str(args.completion_len), "--steps", str(args.steps),
             "--num-iterations", str(args.num_iterations)] + (["--reward-model"] if args.reward_model else [])  # fmt: skip
    results: dict[str, dict[str, list[float]]] = {who: {"t": [], "s": [], "mem": []} for who in NAMES}
    for r, who, got in alternate(base, NAMES, shape, args.rounds):
        results[who]["t"] += got["times"]
        results[who]["s"] += got["sampling"]
        results[who]["mem"].append(got["peak_gib"])
        print(f"round {r + 1} {who:4s}: step {statistics.median(got['times']):.2f}s "
              f"(sampling {statistics.median(got['sampling']):.2f}s)  peak {got['peak_gib']:.2f} GiB")  # fmt: skip
    shutil.rmtree(hf_dir, ignore_errors=True)
    if not all(results[who]["t"] for who in NAMES):
        return
    t = {who: statistics.median(results[who]["t"]) / args.num_iterations for who in NAMES}  # per update
    s = {who: statistics.median(results[who]["s"]) for who in NAMES}
    mem = {who: max(results[who]["mem"]) for who in NAMES}
    tokens = args.prompts * args.generations * args.completion_len
    scored = "a LoRA reward model" if args.reward_model else "a length reward"
    print(f"\nLoRA r=8 GRPO step: {args.prompts} prompts x {args.generations} completions x "
          f"{args.completion_len} tokens scored by {scored}, fp32, {args.threads} threads, "
          f"{args.num_iterations} update(s) a sampling (step s: per update)")  # fmt: skip
    print(f"{'':32s}{'step s':>9s}{'sampling s':>12s}{'tokens/s':>10s}{'peak GiB':>10s}")
    for who, label in NAMES.items():
        print(f"{label:32s}{t[who]:9.2f}{s[who]:12.2f}{tokens / t[who]:10.1f}{mem[who]:10.2f}")
    print(f"speed-up (peer / ours): step {t['peer'] / t['ours']:.2f}x, sampling {s['peer'] / s['ours']:.2f}x, "
          f"peak memory (ours / peer) {mem['ours'] / mem['peer']:.2f}x")  # fmt: skip
    if "ours-copy" in mem:
        print(
            f"reward model on the policy's base vs a copy: peak memory {mem['ours'] / mem['ours-copy']:.2f}x "
            f"({(mem['ours-copy'] - mem['ours']) * 1024:.0f} MiB less), step {t['ours-copy'] / t['ours']:.2f}x"
        )


if __name__ == "__main__":
    main()
