"""Picking the next token of a decode step from its logits: weightsmith vs transformers, one run.

What is timed is the sampler alone, on random (rows, vocabulary) fp32 logits on the CPU: ours is
`weightsmith.sampling.sample_batch` (each row with its own seeded generator, as the engine and
the server run it: temperature, top-k, top-p looking at the most likely tokens first, then one
uniform draw a row against the cumulative probabilities); transformers' is what its
`generate(do_sample=True)` does each step: its Temperature / TopK / TopP warpers, the softmax, and `torch.multinomial` over the batch (one
generator for all rows, so no per-row seeds). Vocabulary sizes are the default model's
(SmolLM2, 49,152), Qwen3's (151,936) and Gemma 3's (262,144). Both sides run in this process
with the same thread count, alternating (ours, peer, ours, ...) after a warm-up; medians are
printed, with the ratio peer / ours (> 1: weightsmith is faster). For scale: a greedy decode
step of the default model through the C step takes about 17 ms at 1 row and 100 ms at 32 on
2 cores of an AMD EPYC (Zen 4).

    python benchmarks/sampling.py [--threads 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import cpu_description  # beside this file

VOCABS = {"smollm2": 49_152, "qwen3": 151_936, "gemma3": 262_144}
SETTINGS = {
    "temperature 0.8": dict(temperature=0.8),
    "t 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "t 0.8, top-k 50, top-p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
}


def ours(rows: int, vocab: int, setting: dict):
    from weightsmith.sampling import Sampler, SamplingParams, sample_batch

    samplers = [
        Sampler(SamplingParams(seed=i, **setting), [], vocab, torch.device("cpu")) for i in range(rows)
    ]
    return lambda logits: sample_batch(samplers, logits)


def peer(setting: dict):
    import transformers

    warpers = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(setting["temperature"])])
    if setting.get("top_k"):
        warpers.append(transformers.TopKLogitsWarper(setting["top_k"]))
    if setting.get("top_p", 1.0) < 1.0:
        warpers.append(transformers.TopPLogitsWarper(setting["top_p"]))
    no_input = torch.zeros((1, 1), dtype=torch.long)

    def pick(logits: torch.Tensor) -> list[int]:
        scores = warpers(no_input, logits)
        return torch.multinomial(scores.softmax(-1), 1)[:, 0].tolist()

    return pick


def timed(fn, logits: torch.Tensor, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn(logits)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_description())
    print(f"threads {args.threads}; ms per decode step's pick, median of {args.rounds} alternating rounds")
    print(
        f"{'vocabulary':>18} {'setting':>28} {'rows':>4} {'weightsmith':>11} {'transformers':>12} {'peer/ours':>9}"
    )
    for name, vocab in VOCABS.items():
        for label, setting in SETTINGS.items():
            for rows in args.rows:
                logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 4
                sides = {"ours": ours(rows, vocab, setting), "peer": peer(setting)}
                repeats = max(1, 64 // rows)
                times: dict[str, list[float]] = {k: [] for k in sides}
                for fn in sides.values():
                    timed(fn, logits, 2)  # warm-up
                for _ in range(args.rounds):
                    for k, fn in sides.items():
                        times[k].append(timed(fn, logits, repeats))
                a, b = (statistics.median(times[k]) for k in ("ours", "peer"))
                print(
                    f"{name + ' ' + str(vocab):>18} {label:>28} {rows:>4} {a:>11.3f} {b:>12.3f} {b / a:>8.2f}x"
                )


if __name__ == "__main__":
    main()
