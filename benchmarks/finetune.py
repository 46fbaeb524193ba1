"""LoRA training step time and peak memory: weightsmith vs transformers + peft, one run.

Both train LoRA (rank 8, alpha 16, no dropout) on all seven projections of the
default model, fp32 on the CPU with the same thread count, with AdamW, on the
same batches: rows of the bundled Kettlebird sample data packed to exactly
`--seq-len` tokens, loss on assistant tokens only. Both see the rows as plain
causal sequences (no per-document masking), so they do the same attention work.

Each side runs in its own process (so peak resident memory is its own), warms up
for one step, then times `--steps` steps; the processes alternate
(ours, peer, ours, peer) so a noisy neighbour slows both alike. Medians and the
ratio peer/ours are printed: > 1 means weightsmith is faster.

    python benchmarks/finetune.py [--threads 2] [--batch 4] [--seq-len 256] [--steps 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batch(tokenizer, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and (B, T) next-token labels (-100 off target), from packed sample data."""
    from weightsmith.datasets import sample_path
    from weightsmith.train.data import IGNORE, read_records, to_rows, tokenize_records

    records = read_records(sample_path("kettlebird/train.jsonl"))
    examples, _ = tokenize_records(records, tokenizer, max_seq_len=seq_len + 1)
    ids, targets = [], []
    for row in to_rows(examples, 10**9, packing=True)[:1]:
        ids, targets = row.ids, row.targets
    need = batch * (seq_len + 1)
    assert len(ids) >= need, "not enough sample data for this batch shape"
    ids_t = torch.tensor(ids[:need]).view(batch, seq_len + 1)
    keep = torch.tensor(targets[:need]).view(batch, seq_len + 1)
    labels = torch.where(keep[:, 1:], ids_t[:, 1:], IGNORE)
    labels[:, -1] = IGNORE  # transformers cannot score the last position: neither do we
    return ids_t[:, :-1].contiguous(), labels


def run_ours(path: str, batch: int, seq_len: int, steps: int) -> list[float]:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.train.data import Batch
    from weightsmith.train.optim import make_optimizer
    from weightsmith.train.sft import sft_loss

    ckpt = load_checkpoint(path, dtype=torch.float32, decode_layout=False)
    model = ckpt.model.train()
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS))
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    inputs, labels = make_batch(ckpt.tokenizer, batch, seq_len)
    b = Batch(inputs, labels)

    def step() -> None:
        loss, n = sft_loss(model, b)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_steps(step, steps)


def run_peer(path: str, batch: int, seq_len: int, steps: int) -> list[float]:
    import peft
    import transformers

    from weightsmith.checkpoint.load import load_checkpoint

    tokenizer = load_checkpoint(path, dtype=torch.float32).tokenizer  # same token ids for both
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1], dtype=torch.float32
    )
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    ).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    inputs, labels = make_batch(tokenizer, batch, seq_len)
    # Ours: labels[t] is the token after position t. transformers shifts by itself and
    # wants hf_labels[t + 1] = labels[t].
    hf_labels = torch.cat([torch.full((batch, 1), -100), labels[:, :-1]], dim=1)

    def step() -> None:
        out = model(input_ids=inputs, labels=hf_labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time_steps(step, steps)


def _time_steps(step, steps: int) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    fn = run_ours if args.child == "ours" else run_peer
    times = fn(args.model, args.batch, args.seq_len, args.steps)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"times": times, "peak_gib": peak_gib}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="GGUF path (default: the default model from the store)")
    p.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.model is None:
        from weightsmith.checkpoint.hub import resolve

        args.model = str(resolve("smollm2-135m-instruct"))
    results: dict[str, dict[str, list[float]]] = {"ours": {"t": [], "mem": []}, "peer": {"t": [], "mem": []}}
    for r in range(args.rounds):
        for who in ("ours", "peer"):
            cmd = [sys.executable, __file__, "--child", who, "--model", args.model, "--threads", str(args.threads),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]  # fmt: skip
            out = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            got = json.loads(out)
            results[who]["t"] += got["times"]
            results[who]["mem"].append(got["peak_gib"])
            print(
                f"round {r + 1} {who:5s}: step {statistics.median(got['times']):.2f}s  peak {got['peak_gib']:.2f} GiB"
            )
    ours_t, peer_t = statistics.median(results["ours"]["t"]), statistics.median(results["peer"]["t"])
    ours_m, peer_m = max(results["ours"]["mem"]), max(results["peer"]["mem"])
    print(f"\nLoRA r=8 all-linear, batch {args.batch} x {args.seq_len} tokens, fp32, {args.threads} threads")
    print(f"{'':24s}{'step s':>10s}{'peak GiB':>10s}")
    print(f"{'weightsmith':24s}{ours_t:10.2f}{ours_m:10.2f}")
    print(f"{'transformers + peft':24s}{peer_t:10.2f}{peer_m:10.2f}")
    print(f"speed-up (peer / ours): {peer_t / ours_t:.2f}x   memory (ours / peer): {ours_m / peer_m:.2f}x")


if __name__ == "__main__":
    main()
