"""synth's two speed claims, each against its peer in the same run.

1. Near-duplicate filtering: 20,000 generated instructions deduplicated at ROUGE-L >= 0.7
   (every one against all kept before it) by `weightsmith.synth.rouge.dedup` (prefix-filtered
   candidates, exact bit-parallel LCS) vs a plain all-pairs loop over `rouge-score`'s
   RougeScorer, as self-instruct's code does. The loop is run on the first `--sample`
   instructions, where both kept sets must be identical; its time per comparison there is
   extrapolated to the comparisons it would make on all of them (the sum over instructions
   of the kept set before each, which is the same for both). Instructions are made by a
   seeded generator: templates, a Zipf-distributed vocabulary, and rewordings (words
   dropped, inserted, swapped) of earlier ones, so near-duplicates occur as in real runs.
2. Generation: 64 answers generated in process by the batching engine (all in flight)
   vs one at a time, tokens/s on the default model (greedy, the same prompts).

    python benchmarks/synth.py [--n 20000] [--sample 1500] [--answers 64] [--max-tokens 48] [--skip-generation]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from machine import cpu_isa, cpu_model  # beside this file

TEMPLATES = (
    "Write a {adj} {form} about {topic}.", "Explain {topic} to {audience}.", "List {k} facts about {topic}.",
    "Summarise the {adj} history of {topic} in {k} sentences.", "Give {k} tips for {activity} with {topic}.",
    "Compare {topic} and {topic2} for {audience}.", "What is the most {adj} thing about {topic}?",
    "Describe how {audience} could use {topic} when {activity}.", "Translate a {adj} {form} about {topic} into French.",
)  # fmt: skip
FILL = {
    "adj": [
        "short",
        "funny",
        "detailed",
        "simple",
        "formal",
        "surprising",
        "sad",
        "clear",
        "brief",
        "strange",
    ],
    "form": ["poem", "story", "email", "essay", "song", "report", "letter", "dialogue", "riddle", "tweet"],
    "audience": [
        "a child",
        "a beginner",
        "an engineer",
        "a doctor",
        "my grandmother",
        "a student",
        "a tourist",
    ],
    "activity": ["cooking", "travelling", "studying", "gardening", "saving money", "running", "moving house"],
}


def instructions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [
        f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa") for b in range(300)
    ]
    weights = [1 / (i + 1) for i in range(len(vocab))]  # Zipf: a few topics are very common
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.25:  # a rewording of an earlier instruction
            words = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                if op < 0.4 and len(words) > 3:
                    del words[rng.randrange(len(words))]
                elif op < 0.8:
                    words.insert(
                        rng.randrange(len(words) + 1), rng.choice(["please", "now", "the", "very", "also"])
                    )
                else:
                    i = rng.randrange(len(words) - 1)
                    words[i], words[i + 1] = words[i + 1], words[i]
            out.append(" ".join(words))
            continue
        topic, topic2 = (" ".join(rng.choices(vocab, weights, k=rng.randint(2, 4))) for _ in range(2))
        fill = {k: rng.choice(v) for k, v in FILL.items()}
        out.append(rng.choice(TEMPLATES).format(topic=topic, topic2=topic2, k=rng.randint(2, 7), **fill))
    return out


def all_pairs(texts: list[str], threshold: float) -> tuple[list[int], int]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept: list[int] = []
    comparisons = 0
    for i, t in enumerate(texts):
        dup = False
        for j in kept:
            comparisons += 1
            if scorer.score(texts[j], t)["rougeL"].fmeasure >= threshold:
                dup = True
                break
        if not dup:
            kept.append(i)
    return kept, comparisons


def bench_dedup(n: int, sample: int, threshold: float) -> None:
    from weightsmith.synth.rouge import dedup

    texts = instructions(n)
    head = texts[:sample]
    t0 = time.perf_counter()
    peer_kept, peer_comparisons = all_pairs(head, threshold)
    peer_seconds = time.perf_counter() - t0
    ours_head = dedup(head, threshold)
    assert ours_head == peer_kept, "kept sets differ on the sample"
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        kept = dedup(texts, threshold)
        times.append(time.perf_counter() - t0)
    ours = statistics.median(times)
    # The loop compares each instruction with the kept ones before it until one is a duplicate;
    # without the early exit (the upper bound) it is the whole kept set before each instruction.
    # Its comparisons on all n are estimated from the sample's share of early exits.
    kept_before, k = 0, 0
    kept_set = set(kept)
    for i in range(n):
        kept_before += k
        k += i in kept_set
    full_on_sample = sum(range(len(peer_kept))) + sum(
        sum(1 for j in peer_kept if j < i) for i in range(sample) if i not in set(peer_kept)
    )
    share = peer_comparisons / full_on_sample if full_on_sample else 1.0
    peer_estimate = peer_seconds / peer_comparisons * kept_before * share
    print(f"dedup of {n} instructions at ROUGE-L >= {threshold}: kept {len(kept)}")
    print(f"  identical kept sets on the first {sample}: yes ({len(peer_kept)} kept)")
    print(f"  rouge-score all-pairs: {peer_seconds:.1f} s for {peer_comparisons} comparisons on the sample "
          f"({1e6 * peer_seconds / peer_comparisons:.1f} us each) -> ~{peer_estimate:.0f} s for all {n}")  # fmt: skip
    print(f"  weightsmith (median of 3): {ours:.2f} s  -> {peer_estimate / ours:.0f}x faster")


def bench_generation(answers: int, max_tokens: int, runs: int) -> None:
    import torch

    from weightsmith import load
    from weightsmith.synth.generation import LocalGenerator, Request, Sampling

    torch.set_num_threads(2)
    llm = load("smollm2-135m-instruct", device="cpu")
    topics = instructions(answers, seed=1)
    requests = [Request([{"role": "user", "content": t}], seed=i) for i, t in enumerate(topics)]
    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    contenders = {"batched (all in flight)": LocalGenerator(llm, sampling, batch_size=answers),
                  "one at a time": LocalGenerator(llm, sampling, batch_size=1)}  # fmt: skip
    contenders["batched (all in flight)"].complete(requests[:4])  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(runs):
        for name, gen in contenders.items():
            t0 = time.perf_counter()
            replies = gen.complete(requests)
            seconds = time.perf_counter() - t0
            rates[name].append(sum(r.tokens for r in replies) / seconds)
    print(
        f"generation of {answers} answers (<= {max_tokens} tokens, greedy) on the default model, 2 threads:"
    )
    for name, values in rates.items():
        print(f"  {name}: {statistics.median(values):.1f} tokens/s (median of {runs})")
    one, many = (statistics.median(rates[k]) for k in ("one at a time", "batched (all in flight)"))
    print(f"  batched / one at a time: {many / one:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--sample", type=int, default=1500)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--answers", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--skip-dedup", action="store_true")
    args = ap.parse_args()
    print(f"cpu: {cpu_model()} ({platform.machine()}; {cpu_isa()}), python {platform.python_version()}")
    if not args.skip_dedup:
        bench_dedup(args.n, args.sample, args.threshold)
    if not args.skip_generation:
        bench_generation(args.answers, args.max_tokens, args.runs)


if __name__ == "__main__":
    main()
