"""Decode and prefill speed of weightsmith vs transformers on the default model, one run.

Both load the same GGUF file (dequantized to fp32) and run greedy decoding on the
CPU with the same thread count. Decode speed is measured as N extra tokens over the
time difference between generating N+1 tokens and generating 1 token, so prefill
is excluded the same way for both. Medians over repeated runs after a warm-up;
the ratio (ours / peer) is what to read, since the machines are shared and noisy.

    python benchmarks/generate.py [--threads 2] [--new-tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn) for _ in range(runs))


def bench_ours(path, prompt_ids, prefill_ids, new_tokens, runs) -> dict[str, float]:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.generate import TokenGenerator
    from weightsmith.sampling import SamplingParams

    model = load_checkpoint(path, dtype=torch.float32).model

    def gen(n: int) -> None:
        g = TokenGenerator(
            model, [prompt_ids], [SamplingParams(max_tokens=n, temperature=0)], eos_token_ids=set()
        )
        for _ in g:
            pass
        assert len(g.generated[0]) == n

    def prefill() -> None:
        with torch.inference_mode():
            model(torch.tensor([prefill_ids]), logits_at=torch.tensor([len(prefill_ids) - 1]))

    return rates(gen, prefill, new_tokens, len(prefill_ids), runs)


def bench_transformers(
    path, prompt_ids, prefill_ids, new_tokens, runs, cache: str | None
) -> dict[str, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([prompt_ids])
    extra = {"cache_implementation": cache} if cache else {}

    def gen(n: int) -> None:
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra
            )
        assert out.shape[1] == len(prompt_ids) + n

    def prefill() -> None:
        with torch.inference_mode():
            model(torch.tensor([prefill_ids]), logits_to_keep=1)

    return rates(gen, prefill, new_tokens, len(prefill_ids), runs)


def rates(gen, prefill, new_tokens: int, prefill_len: int, runs: int) -> dict[str, float]:
    t1 = median_time(lambda: gen(1), runs)
    tn = median_time(lambda: gen(new_tokens + 1), runs)
    tp = median_time(prefill, runs)
    return {"decode_tok_s": new_tokens / (tn - t1), "prefill_tok_s": prefill_len / tp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-static", action="store_true", help="skip transformers' static-cache variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from weightsmith.checkpoint.hub import resolve
    from weightsmith.checkpoint.load import load_checkpoint

    path = resolve(args.model)
    tok = load_checkpoint(path).tokenizer
    prompt_ids = tok.encode("The history of open-weight language models began when")
    text = "Open models let people run, study and adapt language technology on their own machines. " * 40
    prefill_ids = tok.encode(text)[: args.prefill_tokens]

    results = {"weightsmith": bench_ours(path, prompt_ids, prefill_ids, args.new_tokens, args.runs)}
    results["transformers eager"] = bench_transformers(
        path, prompt_ids, prefill_ids, args.new_tokens, args.runs, cache=None
    )
    if not args.skip_static:
        results["transformers static cache"] = bench_transformers(
            path, prompt_ids, prefill_ids, args.new_tokens, args.runs, cache="static"
        )

    print(f"model {args.model} (fp32), {args.threads} threads, batch 1, greedy, medians of {args.runs} runs")
    print(f"{'':28}{'decode tok/s':>14}{'prefill tok/s':>15}")
    for name, r in results.items():
        print(f"{name:28}{r['decode_tok_s']:14.1f}{r['prefill_tok_s']:15.1f}")
    ours = results["weightsmith"]
    for name, r in results.items():
        if name != "weightsmith":
            print(
                f"ratio weightsmith / {name}: decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                f"prefill {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x"
            )


if __name__ == "__main__":
    main()
