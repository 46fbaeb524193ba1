"""LoRA training step time and peak memory: weightsmith vs transformers + peft, one run.

Both train LoRA (rank 8, alpha 16, no dropout unless --dropout) on all seven projections of the
default model, on the CPU with the same thread count and the same precision (`--precision`:
fp32, or bf16 autocast over bf16 base weights with fp32 adapters, which weightsmith picks by
default on a CPU with AMX; default: what weightsmith picks here), with AdamW, on the
same batches: rows of the bundled Kettlebird sample data packed to exactly
`--seq-len` tokens, loss on assistant tokens only. Both see the rows as plain
causal sequences (no per-document masking), so they do the same attention work.

weightsmith's training loop first tunes glibc's allocator to reuse freed memory
(device.tune_cpu_allocator); the peer runs with glibc's defaults, as transformers'
Trainer does, and "weightsmith LoRA, glibc defaults" shows what the tuning is worth.
weightsmith's QLoRA (the same LoRA over an NF4 base) is measured alongside, and
weightsmith with --train.compile (each decoder layer through torch.compile; its compile
is paid in the warm-up step, and is fast once inductor's cache holds it).
Each contender runs in its own process (so peak resident memory is its own), warms up
for one step, then times `--steps` steps; the processes alternate
(ours, qlora, peer, ours, ...) so a noisy neighbour slows all alike. Medians and
the ratio peer/ours are printed: > 1 means weightsmith is faster.

`--dora` trains DoRA adapters on both sides instead (PEFT's `use_dora=True`: a magnitude per
output row, each row's norm of W + s B A recomputed every step), and `--contenders` picks who runs.

    python benchmarks/finetune.py [--threads 2] [--batch 4] [--seq-len 256] [--steps 3] [--rounds 2]
    python benchmarks/finetune.py --dora --contenders ours,qlora,peer
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_description  # beside this file

NAMES = {
    "ours": "weightsmith LoRA",
    "compiled": "weightsmith LoRA, --train.compile",
    "untuned": "weightsmith LoRA, glibc defaults",
    "qlora": "weightsmith QLoRA (NF4 base)",
    "peer": "transformers + peft LoRA",
}
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


def run_ours(
    path: str,
    batch: int,
    seq_len: int,
    steps: int,
    dropout: float,
    *,
    qlora: bool = False,
    tune: bool = True,
    compile: bool = False,
    bf16: bool = False,
    dora: bool = False,
) -> tuple[list[float], float]:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.device import tune_cpu_allocator
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.train.data import Batch
    from weightsmith.train.losses import sft_loss
    from weightsmith.train.optim import make_optimizer

    if tune:
        tune_cpu_allocator()  # what weightsmith's Trainer does before training on a CPU
    from weightsmith.quant.nf4 import quantize_on_load

    hook = quantize_on_load() if qlora else None  # as `finetune --method qlora` loads
    dtype = torch.bfloat16 if bf16 else torch.float32  # what `finetune` loads (device.train_dtype)
    ckpt = load_checkpoint(path, dtype=dtype, decode_layout=False, on_tensor=hook)
    model = ckpt.model.train()
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=dropout, target_modules=LORA_TARGETS, use_dora=dora))
    for param in model.parameters():  # adapters train in fp32 over any base (train.runs)
        if param.requires_grad:
            param.data = param.data.float()
    if compile:  # what --train.compile does; the compile is paid in the warm-up step
        from weightsmith.train.loop import compile_layers

        compile_layers(model, torch.device("cpu"))
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    inputs, labels = make_batch(ckpt.tokenizer, batch, seq_len)
    b = Batch(inputs, labels)

    def step() -> float:
        with _autocast(bf16):
            loss, n = sft_loss(model, b)
        loss = loss / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return _time_steps(step, steps)


def run_peer(
    path: str, batch: int, seq_len: int, steps: int, dropout: float, bf16: bool = False, dora: bool = False
) -> tuple[list[float], float]:
    import peft
    import transformers

    from weightsmith.train.runs import load_tokenizer

    tokenizer = load_tokenizer(
        Path(path)
    )  # same token ids for both (the tokenizer alone: no model in memory)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1], dtype=torch.float32
    ).to(torch.bfloat16 if bf16 else torch.float32)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS, use_dora=dora),
    ).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    inputs, labels = make_batch(tokenizer, batch, seq_len)
    # Ours: labels[t] is the token after position t. transformers shifts by itself and
    # wants hf_labels[t + 1] = labels[t].
    hf_labels = torch.cat([torch.full((batch, 1), -100), labels[:, :-1]], dim=1)

    def step() -> float:
        with _autocast(bf16):
            out = model(input_ids=inputs, labels=hf_labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return _time_steps(step, steps)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _time_steps(step, steps: int) -> tuple[list[float], float]:
    first_loss = step()  # warm-up; the first loss shows both sides compute the same thing
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times, first_loss


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    kw = {"bf16": args.precision == "bf16", "dora": args.dora}
    fns = {
        "ours": lambda *a: run_ours(*a, **kw),
        "untuned": lambda *a: run_ours(*a, tune=False, **kw),
        "compiled": lambda *a: run_ours(*a, compile=True, **kw),
        "qlora": lambda *a: run_ours(*a, qlora=True, **kw),
        "peer": lambda *a: run_peer(*a, **kw),
    }
    times, first_loss = fns[args.child](args.model, args.batch, args.seq_len, args.steps, args.dropout)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"times": times, "peak_gib": peak_gib, "first_loss": first_loss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--dropout", type=float, default=0.0, help="LoRA dropout, both sides (first losses then differ)"
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="GGUF path (default: the default model from the store)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="both sides (default: weightsmith's here)")
    p.add_argument("--dora", action="store_true", help="DoRA adapters on both sides")
    p.add_argument("--contenders", default=",".join(NAMES), help="who runs, of " + ",".join(NAMES))
    p.add_argument("--child", choices=list(NAMES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.precision is None:
        from weightsmith.train.loop import use_bf16

        args.precision = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"
    if args.child:
        return child(args)
    if args.model is None:
        from weightsmith.checkpoint.pull import resolve

        args.model = str(resolve("smollm2-135m-instruct"))
    who_runs = [w for w in NAMES if w in args.contenders.split(",")]
    if "ours" not in who_runs or "peer" not in who_runs:
        raise SystemExit("--contenders must include ours and peer (the ratios compare them)")
    results: dict[str, dict[str, list[float]]] = {who: {"t": [], "mem": []} for who in who_runs}
    for r in range(args.rounds):
        for who in who_runs:
            cmd = [sys.executable, __file__, "--child", who, "--model", args.model, "--threads", str(args.threads),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--dropout", str(args.dropout), "--precision", args.precision] + ["--dora"] * args.dora  # fmt: skip
            out = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            got = json.loads(out)
            results[who]["t"] += got["times"]
            results[who]["mem"].append(got["peak_gib"])
            print(
                f"round {r + 1} {who:5s}: step {statistics.median(got['times']):.2f}s  peak {got['peak_gib']:.2f} GiB  "
                f"first loss {got['first_loss']:.5f}"
            )
    t = {who: statistics.median(results[who]["t"]) for who in who_runs}
    mem = {who: max(results[who]["mem"]) for who in who_runs}
    kind = "DoRA" if args.dora else "LoRA"
    print(f"\n{kind} r=8 all-linear, dropout {args.dropout}, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.precision}, {args.threads} threads; {cpu_description()}")  # fmt: skip
    print(f"{'':34s}{'step s':>10s}{'peak GiB':>10s}")
    for who in who_runs:
        print(f"{NAMES[who].replace('LoRA', kind):34s}{t[who]:10.2f}{mem[who]:10.2f}")
    print(f"speed-up {kind} (peer / ours): {t['peer'] / t['ours']:.2f}x   peak memory (ours / peer): "
          f"{mem['ours'] / mem['peer']:.2f}x")  # fmt: skip
    if "qlora" in t:
        print(f"QLoRA peak / LoRA peak: {mem['qlora'] / mem['ours']:.2f}x")
    if "compiled" in t:
        print(f"speed-up --train.compile (peer / compiled): {t['peer'] / t['compiled']:.2f}x   "
              f"(ours / compiled): {t['ours'] / t['compiled']:.2f}x   peak (compiled / peer): "
              f"{mem['compiled'] / mem['peer']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
