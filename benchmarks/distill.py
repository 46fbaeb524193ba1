"""LoRA distillation step time and peak memory: weightsmith vs TRL's GKDTrainer, one run.

The student is the default model (SmolLM2-135M-Instruct); the teacher has SmolLM2-360M's shape
(32 layers, hidden 960, 15 heads, 5 KV heads, MLP 2560, the same 49,152-token vocabulary) with
seeded random weights, saved once as an fp32 HF folder both sides load (no 360M checkpoint can
be fetched here; the time and memory of a forward do not depend on the weights' values). Both
train a fresh LoRA adapter on the student (rank 8, alpha 16, no dropout, all seven projections)
with GKD's generalized JSD (beta 0.5, temperature 1, pure distillation: `--kd-ratio 1`), fp32 on
the CPU with the same thread count, AdamW, on the same batch: `--examples` rows of exactly
`--seq-len` tokens from the bundled Kettlebird data, a prompt (at most half) and an answer whose
tokens carry the loss. weightsmith tokenizes them; TRL's side gets those ids as `input_ids` /
`labels` (-100 on the prompt) and runs its own `GKDTrainer.compute_loss` (lmbda 0: the data's
answers, no sampling), on a peft LoRA over the transformers model converted from the same GGUF.

A step is: teacher forward (no grad) + student forward + backward + AdamW step. Ours keeps the
teacher's hidden states only at answer tokens and runs both heads and the divergence fused and
chunked (train/distill_loss.py); TRL materialises both models' full (rows x tokens x vocab)
logits.

A third contender, `topk`, is `--precompute-teacher 64`'s step: another process first stores the
teacher's top 64 logits at every answer token (as the command does before training), and this
one trains from that table alone, forward KL, with no teacher in memory: its peak is what a run
needs once the table exists (a resumed run, or the training after the precompute).

Each contender runs in its own process (so peak resident memory is its own), warms up for one
step, then times `--steps` steps; processes alternate (ours, peer, ours, ...). Medians and the
ratio peer/ours are printed (> 1 means weightsmith is faster), with both sides' first loss (they
agree: the same models and tokens) and the CPU model and instruction sets.

    python benchmarks/distill.py [--threads 2] [--examples 4] [--seq-len 256] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import torch
from dpo import LORA_TARGETS, compare, make_pairs, start, time_steps  # beside this file

NAMES = {
    "ours": "weightsmith LoRA distill",
    "peer": "TRL GKDTrainer + peft LoRA",
    "topk": "weightsmith, stored top 64",  # --precompute-teacher: the table only, no teacher
}
TOP_K = 64
BETA = 0.5
TEACHER_SHAPE = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                     num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                     max_position_embeddings=8192, rms_norm_eps=1e-5)  # fmt: skip


def make_teacher(hf_dir: str) -> str:
    """A seeded random teacher of SmolLM2-360M's shape with the student's tokenizer: its folder."""
    import transformers

    out = os.path.join(hf_dir, "teacher")
    if not os.path.isdir(out):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEACHER_SHAPE)).eval()
        model.save_pretrained(out)
        transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out)
    return out


def rows_of(path: str, n: int, seq_len: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of `n` rows of exactly `seq_len` tokens: dpo.py's prompts and chosen
    answers, by our tokenizer."""
    from weightsmith.train.runs import load_tokenizer

    return [(p.prompt + p.chosen, len(p.prompt)) for p in make_pairs(load_tokenizer(Path(path)), n, seq_len)]


def run_ours(path: str, teacher_dir: str, n: int, seq_len: int, steps: int, table: str | None = None) -> dict:
    """Our step; with `table` (a folder), `--precompute-teacher`'s: forward KL from the teacher's
    stored top K, no teacher in the process (`make_table` wrote the table in another)."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.device import tune_cpu_allocator
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.train.data import collate
    from weightsmith.train.distill import DistillObjective
    from weightsmith.train.distill_loss import DistillSpec
    from weightsmith.train.optim import make_optimizer

    tune_cpu_allocator()  # what weightsmith's Trainer does before training on a CPU
    model = load_checkpoint(path, dtype=torch.float32, decode_layout=False).model.train()
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS))
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    vocab = TEACHER_SHAPE["vocab_size"]
    if table is None:
        teacher = load_checkpoint(teacher_dir, dtype=torch.float32, decode_layout=False).model
        batch = collate(bench_rows(path, n, seq_len), 0)
        objective = DistillObjective(
            teacher.requires_grad_(False).eval(), DistillSpec("jsd", BETA, 1.0, 1.0), vocab
        )
    else:
        batch = taught(path, n, seq_len, table, None).batch(range(n))
        objective = DistillObjective(None, DistillSpec("forward_kl", kd_ratio=1.0), vocab)

    def step() -> float:
        loss, count, _ = objective(model, batch)
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss) / count

    return time_steps(step, steps)


def bench_rows(path: str, n: int, seq_len: int) -> list:
    from weightsmith.train.data import Row

    return [
        Row(ids, [False] * p + [True] * (len(ids) - p), [len(ids)]) for ids, p in rows_of(path, n, seq_len)
    ]


def taught(path: str, n: int, seq_len: int, table: str, teacher) -> object:
    """The rows as a `--precompute-teacher` source: its top K computed by `teacher` into `table`,
    or (teacher None) read back from there."""
    from weightsmith.train.distill_topk import TaughtSource, fill_top_k
    from weightsmith.train.distributed import World

    source = TaughtSource(bench_rows(path, n, seq_len), 0)
    fill_top_k(teacher, {"train": source}, Path(table), None if teacher is not None else Path(table), k=TOP_K,
               vocab=TEACHER_SHAPE["vocab_size"], batch_size=n, device=torch.device("cpu"), precision="fp32",
               world=World())  # fmt: skip
    return source


def make_table(path: str, teacher_dir: str, n: int, seq_len: int, table: str) -> None:
    from weightsmith.checkpoint.load import load_checkpoint

    teacher = load_checkpoint(teacher_dir, dtype=torch.float32, decode_layout=False).model.eval()
    taught(path, n, seq_len, table, teacher)


def run_peer(path: str, teacher_dir: str, n: int, seq_len: int, steps: int, hf_dir: str) -> dict:
    """TRL's GKDTrainer.compute_loss on our token ids (labels -100 on the prompt, as its ChatML
    collator writes them)."""
    import warnings

    import datasets
    import peft
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    args = GKDConfig(output_dir="/tmp/weightsmith-bench-gkd", lmbda=0.0, beta=BETA, per_device_train_batch_size=n,
                     use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True,
                     report_to="none")  # fmt: skip
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    messages = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(messages), peft_config=lora)  # fmt: skip
    rows = rows_of(path, n, seq_len)
    ids = torch.tensor([r for r, _ in rows])
    labels = ids.clone()
    for i, (_, p) in enumerate(rows):
        labels[i, :p] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    policy = trainer.model.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def step() -> float:
        loss = trainer.compute_loss(policy, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return time_steps(step, steps)


def child(args: argparse.Namespace) -> None:
    import json

    from dpo import convert

    torch.set_num_threads(args.threads)
    if args.child == "convert":
        convert(args.model, args.hf_dir)
        make_teacher(args.hf_dir)
        return
    teacher = os.path.join(args.hf_dir, "teacher")
    if args.child == "table":
        return make_table(args.model, teacher, args.examples, args.seq_len, args.hf_dir)
    if args.child in ("ours", "topk"):
        table = args.hf_dir if args.child == "topk" else None
        got = run_ours(args.model, teacher, args.examples, args.seq_len, args.steps, table)
    else:
        got = run_peer(args.model, teacher, args.examples, args.seq_len, args.steps, args.hf_dir)
    print(json.dumps(got))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    started = start(p, {**NAMES, "table": ""}, child, "distill")
    if started is None:
        return
    args, base, hf_dir = started
    shape = ["--examples", str(args.examples), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    subprocess.run([*base, "--child", "table", *shape], check=True, capture_output=True)
    compare(
        base, NAMES, shape, args.rounds, hf_dir, lambda got: f"first loss {got['first_loss']:.6f}",
        f"LoRA r=8 all-linear distillation (GKD JSD, beta {BETA}), student 135M, teacher 360M-shape, "
        f"{args.examples} x {args.seq_len} tokens, fp32, {args.threads} threads",
    )  # fmt: skip


if __name__ == "__main__":
    main()
