"""Multiple-choice scoring throughput: weightsmith's eval scorer vs lm-eval's Hugging Face
backend, on the same task, the same model and the same thread count, in one run.

Both score exactly the same (context, continuation) requests, built from a built-in
suite by our task loader (lm-eval's own prompt format), and the test suite checks the
numbers agree. weightsmith loads the default model's GGUF file dequantized to fp32;
lm-eval gets transformers' fp32 load of the same file. Each side is warmed up, then the
runs are interleaved (ours, peer, ours, peer, ...) and medians taken. Read the ratio:
the machines are shared and noisy, so a lone absolute figure means little.

    python benchmarks/eval.py [--suite arith-mc] [--docs 100] [--batch-size 64] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch


def build_requests(suite: str, docs: int) -> list[tuple[str, str]]:
    from weightsmith.eval.runner import load_tasks

    taskset = load_tasks([f"builtin:{suite}"])
    reqs = []
    for d in taskset.tasks[0].build(limit=docs):
        reqs.extend((a[0], a[1]) for a in d.arguments)
    return reqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--suite", action="append", help="built-in suite(s) (default: arith-mc and reading-mc)"
    )
    parser.add_argument("--docs", type=int, default=100, help="documents per suite")
    parser.add_argument("--batch-size", type=int, default=64, help="both sides")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # lm-eval's per-batch chatter

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from weightsmith import load
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.eval.scorer import Scorer

    path = resolve(args.model)
    llm = load(args.model, dtype="fp32", device="cpu")
    scorer = Scorer(llm.model, llm.tokenizer, batch_size=args.batch_size)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hflm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=args.batch_size, device="cpu")

    print(
        f"model {args.model} (fp32), {args.threads} threads, batch size {args.batch_size}, medians of {args.runs}"
    )
    print(
        f"{'suite':<12} {'requests':>8} {'weightsmith req/s':>18} {'lm-eval+HF req/s':>17} {'ratio':>7} {'max |dll|':>10}"
    )
    for suite in args.suite or ["arith-mc", "reading-mc"]:
        reqs = build_requests(suite, args.docs)
        instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
        ours_out = scorer.loglikelihood(reqs)  # warm-up, and the numbers to compare
        peer_out = hflm.loglikelihood(instances, disable_tqdm=True)
        diff = max(abs(a[0] - b[0]) for a, b in zip(ours_out, peer_out, strict=True))
        ours_t, peer_t = [], []
        for _ in range(args.runs):
            start = time.perf_counter()
            scorer.loglikelihood(reqs)
            ours_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            hflm.loglikelihood(instances, disable_tqdm=True)
            peer_t.append(time.perf_counter() - start)
        ours_rate = len(reqs) / statistics.median(ours_t)
        peer_rate = len(reqs) / statistics.median(peer_t)
        print(
            f"{suite:<12} {len(reqs):>8} {ours_rate:>18.1f} {peer_rate:>17.1f} "
            f"{ours_rate / peer_rate:>6.2f}x {diff:>10.2e}"
        )


if __name__ == "__main__":
    main()
