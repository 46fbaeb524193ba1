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
projections, 8-bit output matrix). "weightsmith bf16" is the checkpoint in bf16: prefill on
PyTorch's bf16 matmuls (oneDNN, AMX where the CPU has it), decoding through the same fused C
step reading the bf16 weights (weightsmith/quant/cpu_bf16.c; `--isa avx2` forces its AVX2
converted-load path). "int4 g32 (bf16)" is the bf16 checkpoint quantized: its prefill runs
bf16 activations on PyTorch's packed kernels, its decoding the C step (int4 projections, bf16
LM head).

"weightsmith, JSON schema" decodes the same way under a JSON schema's grammar (llguidance,
weightsmith/grammar.py: a list of at least 100 person records, so the answer cannot end
within the run): the per-token cost of structured output, read as the ratio to "weightsmith"
(target: at most 15% slower).

"read bound, fp32" and "read bound, int4 g32+int8 head" are no model: each reads a buffer as
large as the weights one decode step of that model reads (machine.ReadSweep: plain vector
loads on the same threads, huge pages), timed like the contenders. It is the most any decoder
of those weights can reach on this machine as it is now; the ratios print every same-sized
contender's share of it, and what share doubling transformers eager would take.

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
from machine import ReadSweep, cpu_description  # beside this file

#: Column names. INT4 is the mix llama.cpp's Q4 files have: int4 g32 projections, int8 LM head.
INT4 = "weightsmith int4 g32+int8 head"
INT4_BF16 = "weightsmith int4 g32 (bf16)"
INT4_COMPILED = "weightsmith int4 compiled"
INT8 = "weightsmith int8"
#: The read-bandwidth bound columns: (column, the contenders that read those same weight bytes).
BOUNDS = {
    "read bound, fp32": (
        "weightsmith",
        "transformers eager",
        "transformers static cache",
        "llama.cpp F32 export",
    ),
    f"read bound, {INT4.removeprefix('weightsmith ')}": (INT4,),
}


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
    keep_quantized: bool = False,
):
    """Our engine; `bits` 8 or 4 (group 32) quantizes the projections weight-only, `head_bits`
    the LM head too; `compile` decodes through torch.compile (the warm-up run pays the
    compile time); `kernels=False` turns the C decode kernels off (the PyTorch path); `schema`
    constrains the answer to that JSON schema; `keep_quantized` keeps a GGUF file's quantized
    blocks (`--keep-quantized`)."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.engine import Engine
    from weightsmith.generate import TokenGenerator
    from weightsmith.sampling import SamplingParams

    ckpt = load_checkpoint(path, dtype=dtype, keep_quantized=keep_quantized)
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


def step_bytes(path, bits: int | None = None, head_bits: int | None = None) -> int:
    """Bytes one decode step of our model reads: every tensor of the decoder layers, the final
    norm and the LM head (a tied embedding once, as the head; the embedding itself gives one
    row a token)."""
    from weightsmith.checkpoint.load import load_checkpoint

    model = load_checkpoint(path, dtype=torch.float32).model
    if bits is not None:
        from weightsmith.quant.weight_only import quantize_model

        quantize_model(model, bits, 32 if bits == 4 else None, head_bits=head_bits)
    seen, total = set(), 0
    for part in (model.lm_head, model.model.norm, model.model.layers):
        for t in (*part.parameters(), *part.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def bench_read_bound(nbytes: int, threads: int):
    """Tokens/s if a step did nothing but read `nbytes` of weights (machine.ReadSweep): gen(n)
    reads them n times. No prefill figure."""
    sweep = ReadSweep(nbytes, threads)
    return (lambda n: sweep(n)), (lambda: None)


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


def _llama_child(path: str, threads: int, n_ctx: int, n_batch: int, one_by_one: bool = False) -> None:
    """In the child process: load llama.cpp, print its build line, then run the parent's
    commands ("gen N PROMPT_IDS" / "prefill IDS"), answering "ok" after each."""
    import json
    import sys

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=n_batch,
        verbose=False,
    )
    print(f"llama-cpp-python {llama_cpp.__version__} ({Path(llama_cpp.__file__).parent.parent}): "
          f"{llama_cpp.llama_print_system_info().decode().strip()}", flush=True)  # fmt: skip
    for line in sys.stdin:
        cmd, n, ids = line.split(" ", 2)
        ids = json.loads(ids)
        if one_by_one:  # the prompt in single-token batches; generate() then reuses that prefix
            llm.reset()
            for t in ids[:-1] if cmd == "gen" else ids:
                llm.eval([t])
        if cmd == "gen":
            out = []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                out.append(token)
                if len(out) == int(n):
                    break
        elif not one_by_one:
            llm.reset()
            llm.eval(ids)
        print("ok", flush=True)


class PeerCrashed(RuntimeError):
    pass


def bench_llama_cpp(path, prompt_ids, prefill_ids, threads: int, site: str | None = None, one_by_one=False):
    """llama.cpp in a child process (a crash is a missing column, not a lost run); `site` is a
    folder holding another build of llama-cpp-python (e.g. one built with AVX-512 off);
    `one_by_one` feeds prompts in single-token batches (0.3.36 built natively segfaults on
    multi-token batches of quantized files on an AMX CPU; its prefill figure is then not
    comparable, its decode figure is)."""
    import json
    import subprocess
    import sys

    n_ctx = max(len(prefill_ids), len(prompt_ids) + 512) + 8
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    args = [str(path), str(threads), str(n_ctx), str(max(512, len(prefill_ids)))]
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import generate; generate._llama_child("
    code += f"{args[0]!r}, {threads}, {n_ctx}, {args[3]}, {one_by_one})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    build = proc.stdout.readline().strip()
    if not build:
        raise PeerCrashed(f"llama.cpp child exited with {proc.wait()} while loading {path}")
    print(f"{Path(path).name}: {build}")

    def ask(cmd: str, n: int, ids: list[int]) -> None:
        try:
            proc.stdin.write(f"{cmd} {n} {json.dumps(ids)}\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() == "ok":
                return
        except BrokenPipeError:
            pass
        raise PeerCrashed(f"llama.cpp child died (exit {proc.wait()}) on {cmd} {n}")

    def gen(n: int) -> None:
        ask("gen", n, prompt_ids)

    def prefill() -> None:
        ask("prefill", 0, prefill_ids)

    return gen, prefill


def interleaved_rates(contenders: dict, new_tokens: int, prefill_len: int, runs: int) -> dict[str, dict]:
    """Warm every contender up, then alternate between them for `runs` rounds."""
    samples: dict[str, dict[str, list[float]]] = {}
    for name, (gen, prefill) in list(contenders.items()):
        try:
            gen(new_tokens + 1), prefill()  # warm-up
        except PeerCrashed as exc:
            print(f"{name}: not measured ({exc})")
            del contenders[name]
            continue
        samples[name] = {"t1": [], "tn": [], "tp": []}
    for _ in range(runs):
        for name, (gen, prefill) in list(contenders.items()):
            s = samples[name]
            try:
                s["t1"].append(timed(lambda g=gen: g(1)))
                s["tn"].append(timed(lambda g=gen: g(new_tokens + 1)))
                s["tp"].append(timed(prefill))
            except PeerCrashed as exc:
                print(f"{name}: dropped ({exc})")
                del contenders[name], samples[name]
    results = {}
    for name, s in samples.items():
        t1, tn, tp = (statistics.median(s[k]) for k in ("t1", "tn", "tp"))
        prefill = prefill_len / tp if not name.startswith("read bound") else float("nan")
        results[name] = {"decode_tok_s": new_tokens / (tn - t1), "prefill_tok_s": prefill}
    return results


def llama_contenders(args, path: Path, prompt_ids, prefill_ids) -> dict:
    """llama.cpp on the catalog's file as shipped (Q4_1), and on Q8_0 and F32 exports of it."""
    import importlib.util
    import sys

    if args.llama_cpp_site:
        sys.path.insert(0, args.llama_cpp_site)  # only to find it: it runs in a child process
    found = importlib.util.find_spec("llama_cpp") is not None
    if args.llama_cpp_site:
        sys.path.remove(args.llama_cpp_site)
    if not found or args.skip_llama_cpp or path.suffix != ".gguf":
        print("llama.cpp: not measured" + ("" if found else " (pip install llama-cpp-python to add it)"))
        return {}
    import tempfile

    from weightsmith.checkpoint.gguf_write import export_gguf

    out = {}
    files = {f"llama.cpp {path.stem.rsplit('.', 1)[-1]}": path}
    for quant in ("q8_0", "f32"):
        files[f"llama.cpp {quant.upper()} export"] = Path(tempfile.mkdtemp()) / f"model-{quant}.gguf"
        export_gguf(path, files[f"llama.cpp {quant.upper()} export"], quant)
    for name, file in files.items():
        try:
            out[name] = bench_llama_cpp(
                file,
                prompt_ids,
                prefill_ids,
                args.threads,
                args.llama_cpp_site,
                args.llama_cpp_one_token_batches,
            )
        except PeerCrashed as exc:
            print(f"{name}: not measured ({exc})")
    return out


def print_ratios(results: dict, bound_bytes: dict[str, int]) -> None:
    ours = results.get("weightsmith")  # absent when --only leaves it out
    for name, r in results.items():
        if ours and not name.startswith(("weightsmith", "read bound")):
            print(
                f"ratio weightsmith / {name}: decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                f"prefill {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x"
            )
    for key, peer in ((INT4, "llama.cpp Q4"), (INT4_BF16, "llama.cpp Q4"), (INT4_COMPILED, "llama.cpp Q4"),
                      (INT8, "llama.cpp Q8"), ("weightsmith bf16", "weightsmith")):  # fmt: skip
        mine = results.get(key)
        for name, r in results.items():
            if mine and (name == peer or (peer.startswith("llama.cpp") and name.startswith(peer))):
                print(f"ratio {key} / {name}: decode {mine['decode_tok_s'] / r['decode_tok_s']:.2f}x")
    for eager, comp in (
        ("weightsmith", "weightsmith compiled"),
        (INT4_BF16, INT4_COMPILED),
        ("weightsmith", SCHEMA_COLUMN),
    ):
        if comp in results and eager in results:
            ratio = results[comp]["decode_tok_s"] / results[eager]["decode_tok_s"]
            print(f"ratio {comp} / {eager}: decode {ratio:.2f}x")
    for bound, readers in BOUNDS.items():
        if bound not in results:
            continue
        limit = results[bound]["decode_tok_s"]
        shares = ", ".join(
            f"{name} {results[name]['decode_tok_s'] / limit:.0%}" for name in readers if name in results
        )
        print(
            f"{bound} ({bound_bytes[bound] / 1e6:.1f} MB a token at {limit * bound_bytes[bound] / 1e9:.1f} GB/s): "
            f"{limit:.1f} tok/s; share of it: {shares}"
        )
    if "read bound, fp32" in results and "transformers eager" in results:
        need = 2 * results["transformers eager"]["decode_tok_s"] / results["read bound, fp32"]["decode_tok_s"]
        print(f"2x transformers eager (fp32) would need {need:.0%} of the fp32 read bound")


def our_contenders(args, path: Path, prompt_ids, prefill_ids) -> dict:
    c = {
        "weightsmith": bench_ours(path, prompt_ids, prefill_ids),
        "transformers eager": bench_transformers(path, prompt_ids, prefill_ids, cache=None),
    }
    if not args.skip_extra:
        c["weightsmith, no C"] = bench_ours(path, prompt_ids, prefill_ids, kernels=False)
    if not args.skip_schema:
        c[SCHEMA_COLUMN] = bench_ours(path, prompt_ids, prefill_ids, schema=PEOPLE_SCHEMA)
    if not args.skip_quantized:
        # Decoding: the C step for all of these; prefill with bf16 activations: PyTorch's
        # bf16 matmuls and packed int4 kernels.
        c[INT4] = bench_ours(path, prompt_ids, prefill_ids, torch.float32, 4, head_bits=8)
        c[INT8] = bench_ours(path, prompt_ids, prefill_ids, torch.float32, 8, head_bits=8)
        c["weightsmith bf16"] = bench_ours(path, prompt_ids, prefill_ids, torch.bfloat16)
        if not args.skip_extra:
            c[INT4 + ", no C"] = bench_ours(
                path, prompt_ids, prefill_ids, torch.float32, 4, head_bits=8, kernels=False
            )
            c[INT4_BF16] = bench_ours(path, prompt_ids, prefill_ids, torch.bfloat16, 4)
    if not args.skip_compiled and not args.skip_extra:
        c["weightsmith compiled"] = bench_ours(path, prompt_ids, prefill_ids, compile=True)
        if not args.skip_quantized:
            c[INT4_COMPILED] = bench_ours(path, prompt_ids, prefill_ids, torch.bfloat16, 4, compile=True)
    if not args.skip_static and not args.skip_extra:
        c["transformers static cache"] = bench_transformers(path, prompt_ids, prefill_ids, cache="static")
    return c


def bound_contenders(args, path: Path) -> tuple[dict, dict[str, int]]:
    """The read-bandwidth bounds (BOUNDS) of the fp32 and int4 models: {} where no C compiler."""
    sizes = {"read bound, fp32": step_bytes(path)}
    if not args.skip_quantized:
        sizes[f"read bound, {INT4.removeprefix('weightsmith ')}"] = step_bytes(path, 4, 8)
    try:
        return {name: bench_read_bound(n, args.threads) for name, n in sizes.items()}, sizes
    except RuntimeError as exc:
        print(f"read bound: not measured ({exc})")
        return {}, sizes


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
    ap.add_argument("--skip-extra", action="store_true", help="only the columns the ratios to peers need")
    ap.add_argument(
        "--skip-bound", action="store_true", help="skip the read-bandwidth bound columns (machine.ReadSweep)"
    )
    ap.add_argument("--isa", help="force our int4/int8 kernels' instruction set (e.g. avx2)")
    ap.add_argument("--llama-cpp-site", help="a folder with another llama-cpp-python build (pip --target)")
    ap.add_argument(
        "--llama-cpp-one-token-batches", action="store_true",
        help="feed llama.cpp prompts one token at a time (works around its multi-token crash on AMX CPUs)",
    )  # fmt: skip
    ap.add_argument(
        "--skip-schema", action="store_true", help="skip the JSON-schema (structured output) column"
    )
    ap.add_argument(
        "--only", help="measure only these columns (comma-separated names as printed, e.g. "
        "'weightsmith,weightsmith bf16'); the others are still built, so combine with the --skip flags",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.quant import cpu_kernels

    path = resolve(args.model)
    tok = load_checkpoint(path).tokenizer
    prompt_ids = tok.encode("The history of open-weight language models began when")
    text = "Open models let people run, study and adapt language technology on their own machines. " * 40
    prefill_ids = tok.encode(text)[: args.prefill_tokens]
    if args.isa and cpu_kernels.library() is not None:
        cpu_kernels.select_isa(cpu_kernels.library(), args.isa)
    print(f"C decode kernels: {cpu_kernels.info()}")
    print(f"CPU: {cpu_description()} at start")
    contenders = our_contenders(args, path, prompt_ids, prefill_ids)
    contenders.update(llama_contenders(args, path, prompt_ids, prefill_ids))
    bounds, bound_bytes = bound_contenders(args, path) if not args.skip_bound else ({}, {})
    contenders.update(bounds)
    if args.only:
        keep = {name.strip() for name in args.only.split(",")}
        contenders = {name: c for name, c in contenders.items() if name in keep}
    results = interleaved_rates(contenders, args.new_tokens, len(prefill_ids), args.runs)
    print(
        f"model {args.model}, {args.threads} threads, batch 1, greedy, medians of {args.runs} interleaved runs"
        f"; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"{'':32}{'decode tok/s':>14}{'prefill tok/s':>15}")
    for name, r in results.items():
        print(f"{name:32}{r['decode_tok_s']:14.1f}{r['prefill_tok_s']:15.1f}".replace("nan", "  -"))
    print_ratios(results, bound_bytes)


if __name__ == "__main__":
    main()
