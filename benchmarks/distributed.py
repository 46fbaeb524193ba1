"""What data parallelism costs on one CPU: 2 ranks x 1 thread (DDP over gloo) against
1 process x 2 threads, on the same LoRA job, and the time each step spends in the all-reduce.

Both run the real command, `weightsmith finetune` on the default model (the
smollm2-135m-instruct GGUF from the store), LoRA r=8 on every projection, fp32, rows of the
bundled Kettlebird sample packed to `--seq-len` tokens, `--batch` rows per step (split 2 + 2
over the ranks), no validation or checkpoints. The two contenders use the same cores: DDP as
`--nproc-per-node 2` with OMP_NUM_THREADS=1 per rank, the single process with 2 threads. With
WEIGHTSMITH_TIME_COMM=1 the ranks time their gradient all-reduce (train/distributed.py) and
rank 0's metrics.jsonl carries, per step, `allreduce_s` (the all-reduce of the adapter
gradients) and `wait_s` (rank 0 waiting at a barrier for the slower rank just before it).

Step 1 of each run is a warm-up and is dropped; the runs alternate (ddp, single, ddp, ...)
so a noisy neighbour slows both alike. Medians over every remaining step of every round are
printed, with the ratio DDP / single-process tokens/s (> 1: two ranks are faster).

    python benchmarks/distributed.py [--batch 4] [--seq-len 256] [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_description  # beside this file

SRC = str(Path(__file__).resolve().parents[1] / "src")
CONTENDERS = {
    "ddp": ("2 ranks x 1 thread (DDP, gloo)", "1", ["--nproc-per-node", "2", "--strategy", "ddp"]),
    "single": ("1 process x 2 threads", "2", []),
}


def run_once(who: str, model: str, data: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """One `finetune` run; its per-step metrics after the warm-up step."""
    _, threads, flags = CONTENDERS[who]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": threads, "WEIGHTSMITH_TIME_COMM": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "weightsmith", "finetune", model, "--data", data, "--out", str(out),
        "--overwrite", "--device", "cpu", "--packing", "--max-seq-len", str(args.seq_len),
        "--valid-fraction", "0", "--train.batch-size", str(args.batch), "--train.max-steps", str(args.steps),
        "--train.precision", "fp32", "--train.eval-every", "0", "--train.save-every", "0",
        "--train.seed", "0", "--lora.rank", "8", "--lora.alpha", "16", "--lora.dropout", "0", *flags,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{who} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [m for m in map(json.loads, lines) if "loss" in m]
    previous = 0.0
    for m in steps:  # elapsed_s is cumulative
        m["step_s"], previous = m["elapsed_s"] - previous, m["elapsed_s"]
    return steps[1:]


def median(rows: list[dict], key: str) -> float:
    return statistics.median(m.get(key, 0.0) for m in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="rows per step, over all ranks")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="steps per run; the first is a warm-up")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="GGUF path (default: the default model from the store)")
    args = p.parse_args()
    sys.path.insert(0, SRC)
    from weightsmith.datasets import sample_path

    if args.model is None:
        from weightsmith.checkpoint.pull import resolve

        args.model = str(resolve("smollm2-135m-instruct"))
    data = str(sample_path("kettlebird/train.jsonl"))
    print(f"cpu: {cpu_description()}; torch {torch.__version__}")
    rows: dict[str, list[dict]] = {who: [] for who in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="weightsmith-distbench-") as tmp:
        for r in range(args.rounds):
            for who in CONTENDERS:
                started = time.perf_counter()
                got = run_once(who, args.model, data, args, Path(tmp) / who)
                rows[who] += got
                comm = f"  all-reduce {median(got, 'allreduce_s') * 1e3:.1f} ms" if who == "ddp" else ""
                print(
                    f"round {r + 1} {who:6s}: {median(got, 'tokens_per_s'):7.0f} tok/s  "
                    f"step {median(got, 'step_s'):.2f}s{comm}  (run {time.perf_counter() - started:.0f}s, "
                    f"first timed loss {got[0]['loss']:.4f})",
                    flush=True,
                )
    tps = {who: median(rows[who], "tokens_per_s") for who in CONTENDERS}
    step = {who: median(rows[who], "step_s") for who in CONTENDERS}
    ddp = rows["ddp"]
    reduce_s, wait_s = median(ddp, "allreduce_s"), median(ddp, "wait_s")
    print(
        f"\nLoRA r=8 all-linear, batch {args.batch} x {args.seq_len} tokens, fp32, "
        f"{args.steps - 1} timed steps x {args.rounds} rounds"
    )
    print(f"{'':34s}{'tok/s':>10s}{'step s':>10s}")
    for who, (label, _, _) in CONTENDERS.items():
        print(f"{label:34s}{tps[who]:10.0f}{step[who]:10.2f}")
    print(
        f"DDP per step: all-reduce of the adapter gradients {reduce_s * 1e3:.1f} ms "
        f"({reduce_s / step['ddp']:.1%} of the step), waiting for the slower rank {wait_s * 1e3:.1f} ms"
    )
    print(f"tokens/s ratio (2 x 1-thread DDP / 1 x 2-thread): {tps['ddp'] / tps['single']:.2f}x")


if __name__ == "__main__":
    main()
