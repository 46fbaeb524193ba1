"""Long-context decoding and the key/value cache's dtype: `--kv-cache-dtype bf16` and `int8` against fp32, and llama.cpp.

A decode step reads every cached key and value once per layer, so at long contexts the cache's
bytes weigh as much as the weights'. Each contender prefills a `--context`-token prompt of the
default model (its Q4_1 file as shipped: weightsmith with `keep_quantized=True`, the fused C step)
and then times `--new-tokens` one-token steps (each computing the logits), in its own process, after a warm-up, the
processes alternating over `--rounds`:

- weightsmith with an fp32 cache (the model's dtype), a bf16 cache (`--kv-cache-dtype bf16`) and an
  int8 one (`--kv-cache-dtype int8`: codes and a scale per head and position);
- llama.cpp (llama-cpp-python, where installed) with its default f16 cache and an f32 one, and with
  flash attention (which its quantized caches need) an f16 and a q8_0 cache.

Printed per context: decode tokens/s (medians), the cache's bytes per token, and ratios against
weightsmith's fp32 cache.

`--quality` instead measures what the rounding changes: the bundled Kettlebird text (its README and
training conversations) is fed one token at a time through the C step after a 1,024-token prefill,
with an fp32, a bf16 and an int8 cache; printed are each run's perplexity on the next `--quality`
tokens, the mean and largest KL divergence of the bf16 and int8 runs' next-token distributions from
the fp32 run's, and how often their top tokens agree.

    python benchmarks/kv_cache.py [--context 1024,4096] [--new-tokens 32] [--rounds 3] [--threads 2]
    python benchmarks/kv_cache.py --quality 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import alternate_children, cpu_description  # noqa: E402

TOKEN = 1234  # every step feeds the same token (the work does not depend on which)
CONTENDERS = [
    "ours fp32 cache", "ours bf16 cache", "ours int8 cache", "llama.cpp f16 cache", "llama.cpp f32 cache",
    "llama.cpp f16 cache, flash attn", "llama.cpp q8_0 cache, flash attn",
]  # fmt: skip
OUR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def run(who: str, path: str, context: int, new: int) -> tuple[float, float]:
    """(decode seconds for `new` tokens after a `context`-token prompt, cache bytes per token)."""
    prompt = [(7 * i + 3) % 49000 + 100 for i in range(context)]
    if who.startswith("ours"):
        import weightsmith
        from weightsmith.generate import prefill
        from weightsmith.kv_cache import KVCache

        llm = weightsmith.load(path, keep_quantized=True)
        model, step, cpu = llm.model, llm.engine.decode_step(), torch.device("cpu")
        dtype = OUR_DTYPES[who.split()[1]]
        cache = KVCache.for_model(model.config, 1, context + new + 1, dtype=dtype, device=cpu)
        per_token = cache.bytes_per_token
        with torch.inference_mode():
            prefill(model, cache, [prompt], cpu)
            step(model, cache, [TOKEN], cpu)  # warm-up
            cache.set_length(0, context)
            start = time.perf_counter()
            for _ in range(new):
                step(model, cache, [TOKEN], cpu)
            return time.perf_counter() - start, per_token
    import llama_cpp

    name = who.split()[1]
    kind = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[
        name
    ]
    llama = llama_cpp.Llama(path, n_ctx=context + new + 8, n_threads=torch.get_num_threads(), n_batch=512,
                            type_k=kind, type_v=kind, flash_attn="flash" in who, verbose=False)  # fmt: skip
    llama.eval(prompt)
    llama.eval([TOKEN])  # warm-up
    llama.n_tokens = context
    start = time.perf_counter()
    for _ in range(new):
        llama.eval([TOKEN])
    elapsed = time.perf_counter() - start
    n_layer, n_embd = llama.metadata.get("llama.block_count"), None
    head_kv = int(llama.metadata["llama.attention.head_count_kv"])
    head_dim = int(llama.metadata["llama.embedding_length"]) // int(
        llama.metadata["llama.attention.head_count"]
    )
    n_embd = head_kv * head_dim
    return elapsed, 2 * int(n_layer) * n_embd * {"f16": 2, "f32": 4, "q8_0": 34 / 32}[name]


def quality(n: int) -> None:
    """Teacher-forced next-token distributions with an fp32 and a bf16 cache (see the module doc)."""
    import weightsmith
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.datasets import sample_path
    from weightsmith.generate import prefill
    from weightsmith.kv_cache import KVCache

    llm = weightsmith.load(resolve("smollm2-135m-instruct"))
    text = sample_path("kettlebird/README.md").read_text() + sample_path("kettlebird/train.jsonl").read_text()
    ids = llm.tokenizer.encode(text)[: 1024 + n + 1]
    model, step, cpu = llm.model, llm.engine.decode_step(), torch.device("cpu")
    logps = {}
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        cache = KVCache.for_model(model.config, 1, len(ids), dtype=dtype, device=cpu)
        rows = []
        with torch.inference_mode():
            rows.append(prefill(model, cache, [ids[:1024]], cpu)[0])
            for t in ids[1024 : 1024 + n - 1]:
                rows.append(step(model, cache, [t], cpu)[0])
        logps[dtype] = torch.log_softmax(torch.stack(rows).double(), -1)  # (n, V)
    target = torch.tensor(ids[1024 : 1024 + n])
    full = logps[torch.float32]
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        lp = logps[dtype]
        ppl = torch.exp(-lp.gather(1, target[:, None]).mean()).item()
        print(f"{name} cache: perplexity {ppl:.4f} over {n} tokens after a 1,024-token prompt")
        if dtype != torch.float32:
            kl = (full.exp() * (full - lp)).sum(-1)
            agree = (full.argmax(-1) == lp.argmax(-1)).float().mean().item()
            print(
                f"  KL(fp32 || {name}) mean {kl.mean().item():.2e}, max {kl.max().item():.2e}; "
                f"top-1 agreement {agree:.1%}"
            )


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--context", default="1024,4096")
    a.add_argument("--new-tokens", type=int, default=32)
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument(
        "--quality", type=int, metavar="N", help="measure the rounding's effect over N tokens instead"
    )
    a.add_argument("--child", choices=CONTENDERS)
    a.add_argument("--path")
    args = a.parse_args()
    if args.quality:
        torch.set_num_threads(args.threads)
        return quality(args.quality)
    if args.child:
        torch.set_num_threads(args.threads)
        seconds, per_token = run(args.child, args.path, int(args.context), args.new_tokens)
        print(json.dumps({"seconds": seconds, "per_token": per_token}))
        return
    from weightsmith.checkpoint.pull import resolve

    path = str(resolve("smollm2-135m-instruct"))
    print(
        f"cpu: {cpu_description()}, {args.threads} threads; {Path(path).name}, {args.new_tokens} new tokens"
    )
    print("| context | contender | decode tok/s | cache KiB a token | vs ours fp32 cache |")
    print("|---|---|---|---|---|")
    for context in [int(c) for c in args.context.split(",")]:
        argv = ["--path", path, "--context", str(context), "--new-tokens", str(args.new_tokens), "--threads",
                str(args.threads)]  # fmt: skip
        results = alternate_children(__file__, CONTENDERS, argv, args.rounds)
        seconds = {who: [r["seconds"] for r in got] for who, got in results.items()}
        size = {who: got[-1]["per_token"] for who, got in results.items() if got}
        rate = {w: args.new_tokens / statistics.median(s) for w, s in seconds.items() if s}
        for who in rate:
            ratio = rate[who] / rate["ours fp32 cache"]
            print(f"| {context} | {who} | {rate[who]:.1f} | {size[who] / 1024:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
