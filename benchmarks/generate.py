"""Decode and prefill speed of weightsmith vs transformers and llama.cpp on the default model, one run.

weightsmith and transformers load the same GGUF file (dequantized to fp32) and run
greedy decoding on the CPU with the same thread count. Where llama-cpp-python is
installed, llama.cpp runs too, with the same thread count: on the catalog's Q4_1
file as shipped, and on an F32 export of it (`weightsmith export`), the same
numbers our fp32 path computes with. Decode speed is measured as N extra tokens over the
time difference between generating N+1 tokens and generating 1 token, so prefill
is excluded the same way for both. Each contender is warmed up, then the runs are
interleaved (ours, peer, ours, peer, ...) so that a noisy neighbour slows both
alike, and medians are taken. Read the ratio (ours / peer): the machines are
shared and noisy, so a lone absolute figure means little.

Our columns: "weightsmith" is the default fp32 path, which decodes through the fused C
step (weightsmith/quant/cpu_decode.c); ", no C" is the same model with
WEIGHTSMITH_CPU_KERNELS=0 (PyTorch ops only). The int4 column to read against
llama.cpp's Q4_1 file is "int4 g32+int8 head": the same mix the file has (4-bit
projections, 8-bit output matrix). The bf16 columns use PyTorch's packed kernels.

"weightsmith, JSON schema" decodes the same way under a JSON schema's grammar (llguidance,
weightsmith/grammar.py: a list of at least 100 person records, so the answer cannot end
within the run): the per-token cost of structured output, read as the ratio to "weightsmith"
(target: at most 15% slower).

    python benchmarks/generate.py [--threads 2] [--new-tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: Column names. INT4 is the mix llama.cpp's Q4 files have: int4 g32 projections, int8 LM head.
INT4 = "weightsmith int4 g32+int8 head"
INT4_BF16 = "weightsmith int4 g32 (bf16)"
INT4_COMPILED = "weightsmith int4 compiled"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_ours(
    path,
    prompt_ids,
    prefill_ids,
    dtype=torch.float32,
    bits: int | None = None,
    compile=False,
    head_bits: int | None = None,
    kernels: bool = True,
    schema: dict | None = None,
):
    """Our engine; `bits` 8 or 4 (group 32) quantizes the projections weight-only, `head_bits`
    the LM head too; `compile` decodes through torch.compile (the warm-up run pays the
    compile time); `kernels=False` turns the C decode kernels off (the PyTorch path); `schema`
    constrains the answer to that JSON schema."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.engine import Engine
    from weightsmith.generate import TokenGenerator
    from weightsmith.sampling import SamplingParams

    ckpt = load_checkpoint(path, dtype=dtype)
    model = ckpt.model
    if bits is not None:
        from weightsmith.quant.weight_only import quantize_model

        quantize_model(model, bits, 32 if bits == 4 else None, head_bits=head_bits)
    engine = Engine(model, ckpt.tokenizer, compile=compile)  # lays a CPU model out, owns its C step
    grammar = engine.json_schema(schema) if schema is not None else None

    def gen(n: int) -> None:
        os.environ["WEIGHTSMITH_CPU_KERNELS"] = "1" if kernels else "0"
        g = TokenGenerator(
            model,
            [prompt_ids],
            [SamplingParams(max_tokens=n, temperature=0, grammar=grammar)],
            eos_token_ids=set(),
            compile=compile,
            decode=engine.decode_step(),
        )
        for _ in g:
            pass
        assert len(g.generated[0]) == n

    def prefill() -> None:
        os.environ["WEIGHTSMITH_CPU_KERNELS"] = "1" if kernels else "0"
        with torch.inference_mode():
            model(torch.tensor([prefill_ids]), logits_at=torch.tensor([len(prefill_ids) - 1]))

    return gen, prefill


#: A long structured answer: at least 100 records, so the grammar never lets it end within a run.
PEOPLE_SCHEMA = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        },
        "required": ["name", "age", "role", "tags"],
        "additionalProperties": False,
    },
}
SCHEMA_COLUMN = "weightsmith, JSON schema"


def bench_transformers(path, prompt_ids, prefill_ids, cache: str | None):
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

    return gen, prefill


def bench_llama_cpp(path, prompt_ids, prefill_ids, threads: int):
    import llama_cpp

    n_ctx = max(len(prefill_ids), len(prompt_ids) + 512) + 8
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        n_batch=max(512, len(prefill_ids)), verbose=False,
    )  # fmt: skip

    def gen(n: int) -> None:
        out = []
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        assert len(out) == n

    def prefill() -> None:
        llm.reset()
        llm.eval(prefill_ids)

    return gen, prefill


def interleaved_rates(contenders: dict, new_tokens: int, prefill_len: int, runs: int) -> dict[str, dict]:
    """Warm every contender up, then alternate between them for `runs` rounds."""
    samples: dict[str, dict[str, list[float]]] = {}
    for name, (gen, prefill) in contenders.items():
        gen(new_tokens + 1), prefill()  # warm-up
        samples[name] = {"t1": [], "tn": [], "tp": []}
    for _ in range(runs):
        for name, (gen, prefill) in contenders.items():
            s = samples[name]
            s["t1"].append(timed(lambda g=gen: g(1)))
            s["tn"].append(timed(lambda g=gen: g(new_tokens + 1)))
            s["tp"].append(timed(prefill))
    results = {}
    for name, s in samples.items():
        t1, tn, tp = (statistics.median(s[k]) for k in ("t1", "tn", "tp"))
        results[name] = {"decode_tok_s": new_tokens / (tn - t1), "prefill_tok_s": prefill_len / tp}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-static", action="store_true", help="skip transformers' static-cache variant")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="skip llama.cpp even if it is installed")
    ap.add_argument("--skip-quantized", action="store_true", help="skip weightsmith bf16/int8/int4 columns")
    ap.add_argument("--skip-compiled", action="store_true", help="skip the torch.compile (--compile) columns")
    ap.add_argument(
        "--skip-schema", action="store_true", help="skip the JSON-schema (structured output) column"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve

    path = resolve(args.model)
    tok = load_checkpoint(path).tokenizer
    prompt_ids = tok.encode("The history of open-weight language models began when")
    text = "Open models let people run, study and adapt language technology on their own machines. " * 40
    prefill_ids = tok.encode(text)[: args.prefill_tokens]

    from weightsmith.quant import cpu_kernels

    print(f"C decode kernels: {cpu_kernels.info()}")
    contenders = {
        "weightsmith": bench_ours(path, prompt_ids, prefill_ids),
        "weightsmith, no C": bench_ours(path, prompt_ids, prefill_ids, kernels=False),
        "transformers eager": bench_transformers(path, prompt_ids, prefill_ids, cache=None),
    }
    if not args.skip_schema:
        contenders[SCHEMA_COLUMN] = bench_ours(path, prompt_ids, prefill_ids, schema=PEOPLE_SCHEMA)
    if not args.skip_quantized:
        # fp32 activations: the C kernels; bf16 activations: PyTorch's packed kernels.
        contenders[INT4] = bench_ours(path, prompt_ids, prefill_ids, torch.float32, 4, head_bits=8)
        contenders[INT4 + ", no C"] = bench_ours(
            path, prompt_ids, prefill_ids, torch.float32, 4, head_bits=8, kernels=False
        )
        contenders["weightsmith int8"] = bench_ours(
            path, prompt_ids, prefill_ids, torch.float32, 8, head_bits=8
        )
        contenders["weightsmith bf16"] = bench_ours(path, prompt_ids, prefill_ids, torch.bfloat16)
        contenders[INT4_BF16] = bench_ours(path, prompt_ids, prefill_ids, torch.bfloat16, 4)
    if not args.skip_compiled:
        contenders["weightsmith compiled"] = bench_ours(path, prompt_ids, prefill_ids, compile=True)
        if not args.skip_quantized:
            contenders[INT4_COMPILED] = bench_ours(
                path, prompt_ids, prefill_ids, torch.bfloat16, 4, compile=True
            )
    if not args.skip_static:
        contenders["transformers static cache"] = bench_transformers(
            path, prompt_ids, prefill_ids, cache="static"
        )
    try:
        import llama_cpp  # noqa: F401

        have_llama_cpp = not args.skip_llama_cpp
    except ImportError:
        have_llama_cpp = False
        print("llama.cpp: not measured (pip install llama-cpp-python to add it)")
    if have_llama_cpp and path.suffix == ".gguf":
        import tempfile

        from weightsmith.checkpoint.gguf_write import export_gguf

        f32 = Path(tempfile.mkdtemp()) / "model-f32.gguf"
        export_gguf(path, f32, "f32")
        contenders[f"llama.cpp {path.stem.rsplit('.', 1)[-1]}"] = bench_llama_cpp(
            path, prompt_ids, prefill_ids, args.threads
        )
        contenders["llama.cpp F32 export"] = bench_llama_cpp(f32, prompt_ids, prefill_ids, args.threads)
    results = interleaved_rates(contenders, args.new_tokens, len(prefill_ids), args.runs)

    print(
        f"model {args.model}, {args.threads} threads, batch 1, greedy, medians of {args.runs} interleaved runs"
    )
    print(f"{'':32}{'decode tok/s':>14}{'prefill tok/s':>15}")
    for name, r in results.items():
        print(f"{name:32}{r['decode_tok_s']:14.1f}{r['prefill_tok_s']:15.1f}")
    ours = results["weightsmith"]
    for name, r in results.items():
        if not name.startswith("weightsmith"):
            print(
                f"ratio weightsmith / {name}: decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                f"prefill {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x"
            )
    for key in (INT4, INT4_BF16, INT4_COMPILED):
        int4 = results.get(key)
        for name, r in results.items():
            if int4 and name.startswith("llama.cpp Q4"):
                print(f"ratio {key} / {name}: decode {int4['decode_tok_s'] / r['decode_tok_s']:.2f}x")
    for eager, comp in (
        ("weightsmith", "weightsmith compiled"),
        (INT4_BF16, INT4_COMPILED),
        ("weightsmith", SCHEMA_COLUMN),
    ):
        if comp in results:
            ratio = results[comp]["decode_tok_s"] / results[eager]["decode_tok_s"]
            print(f"ratio {comp} / {eager}: decode {ratio:.2f}x")


if __name__ == "__main__":
    main()
