"""What quantized decoding costs in quality: our int4/int8 kernels vs llama.cpp's Q4_1/Q8_0, same text.

The speed columns of `generate.py` are only fair if neither side buys speed with error. This
benchmark measures the error the way decoding makes it: every token of the bundled text sample
(`weightsmith/eval/suites/text-ppl.jsonl`, one window per paragraph, tokenized once by our
tokenizer) is fed one at a time through the decode step, and the next token's log-probability
is read from that step's logits. On our side that is the step `weightsmith generate` uses (the
fused C step: int8 activations per block of 32 and integer dot products for int4/int8 weights);
on llama.cpp's, single-token `eval` calls through llama-cpp-python (its Q8 activations and
integer kernels) in a child process, so a crash is a missing column.

Both sides quantize the same fp32 weights: the default model's GGUF dequantized ("fp32"). Ours
with `quantize_model` (int8 per channel; int4 in groups of 32 with an int8 LM head, the mix the
Q4_1 file has); llama.cpp's with its own quantizer (`llama_model_quantize`) from an F32 export
of those weights, to Q4_1 and Q8_0. Each side's delta is against its own fp32 run, and the
acceptance reads our int4's delta against llama.cpp Q4_1's (and int8's against Q8_0's).

`--gguf-types q4_k_m,q6_k` adds files llama.cpp quantizes to those types, each decoded by both
engines from the same file (ours keeping its blocks, `--keep-quantized`), and by our fp32 step
from the file dequantized (the same weights with exact inputs): each engine's delta against
that is what its rounding of the inputs costs.

    python benchmarks/perplexity.py [--threads 2] [--max-tokens 256] [--gguf-types q4_k_m,q6_k]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402


def windows(tokenizer, max_tokens: int) -> list[list[int]]:
    """The text sample's paragraphs as token windows (BOS first where the model has one)."""
    from weightsmith.commands.quantize import text_sample

    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for text in text_sample():
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(([bos] if bos is not None else []) + ids[: max_tokens - (bos is not None)])
    return out


def ours(
    path: Path, texts: list[list[int]], bits: int | None, keep_quantized: bool = False
) -> tuple[float, int]:
    """(summed NLL, tokens scored) decoding token by token through our decode step;
    `keep_quantized`: a GGUF file's blocks as they are (`--keep-quantized`)."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.engine import Engine
    from weightsmith.kv_cache import KVCache

    ckpt = load_checkpoint(path, dtype=torch.float32, keep_quantized=keep_quantized)
    model = ckpt.model
    if bits is not None:
        from weightsmith.quant.weight_only import quantize_model

        quantize_model(model, bits, 32 if bits == 4 else None, head_bits=8 if bits == 4 else None)
    engine = Engine(model, ckpt.tokenizer)  # lays the model out for its C step
    step = engine.decode_step()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in texts:
            cache = KVCache.for_model(
                model.config, 1, len(ids), dtype=torch.float32, device=torch.device("cpu")
            )
            for i, token in enumerate(ids[:-1]):
                logits = step(model, cache, [token], torch.device("cpu"))[0].float()
                nll -= float(torch.log_softmax(logits, -1)[ids[i + 1]])
                n += 1
    return nll, n


def _llama_child(path: str, threads: int, n_ctx: int) -> None:
    """In the child: read token windows as JSON lines, answer each with its summed NLL."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=1, logits_all=True, verbose=False)  # fmt: skip
    print("ok", flush=True)
    for line in sys.stdin:
        ids = json.loads(line)
        llm.reset()
        nll = 0.0
        for i, token in enumerate(ids[:-1]):
            llm.eval([token])  # one token a batch: multi-token batches crash on some AMX CPUs
            z = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            z = z - z.max()
            nll -= z[ids[i + 1]] - math.log(np.exp(z).sum())
        print(json.dumps(nll), flush=True)


def child_answers(call: str, path: Path, texts: list[list[int]]) -> list | None:
    """Runs `call` (a function of this folder's modules, e.g. "perplexity._llama_child(...)") in a
    child Python, so that a crash of llama.cpp is reported, not fatal; sends it each token window
    as a JSON line and returns its JSON answers (None, with a message, if it did not load or died)."""
    module = call.split(".", 1)[0]
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {module}; {call}"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    if proc.stdout.readline().strip() != "ok":
        print(f"{path.name}: llama.cpp could not load it (exit {proc.wait()})")
        return None
    answers = []
    for ids in texts:
        proc.stdin.write(json.dumps(ids) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        if not answer:
            print(f"{path.name}: llama.cpp died (exit {proc.wait()})")
            return None
        answers.append(json.loads(answer))
    proc.stdin.close()
    proc.wait()
    return answers


def llama(path: Path, texts: list[list[int]], threads: int) -> tuple[float, int] | None:
    n_ctx = max(map(len, texts)) + 8
    answers = child_answers(f"perplexity._llama_child({str(path)!r}, {threads}, {n_ctx})", path, texts)
    return None if answers is None else (sum(answers), sum(len(t) - 1 for t in texts))


def llama_quantize(f32: Path, out: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f32} to ftype {ftype}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per paragraph window")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument(
        "--gguf-types", default="",
        help="also these llama.cpp file types (e.g. q4_k_m,q5_k_m,q6_k; gguf_types.FTYPES), each file "
        "decoded by both engines: weightsmith keeping its blocks (--keep-quantized), and llama.cpp",
    )  # fmt: skip
    args = ap.parse_args()
    from gguf_types import FTYPES, parse_types  # beside this file (it imports this one: not at the top)

    # before any long run
    gguf_types = parse_types(args.gguf_types, "perplexity.py: --gguf-types", random_blocks=False)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.quant import cpu_kernels

    path = Path(resolve(args.model))
    print(f"CPU: {cpu_description()}; C kernels: {cpu_kernels.info()}")
    texts = windows(load_checkpoint(path).tokenizer, args.max_tokens)
    print(f"text: {len(texts)} paragraphs, {sum(len(t) - 1 for t in texts)} scored tokens, one at a time")
    rows: dict[str, tuple[float, int] | None] = {}
    for name, bits in (
        ("weightsmith fp32", None),
        ("weightsmith int8", 8),
        ("weightsmith int4 g32+int8 head", 4),
    ):
        rows[name] = ours(path, texts, bits)
        print(f"{name}: ppl {math.exp(rows[name][0] / rows[name][1]):.4f}", flush=True)
    if not args.skip_llama_cpp and path.suffix == ".gguf":
        import llama_cpp

        from weightsmith.checkpoint.gguf_write import export_gguf

        tmp = Path(tempfile.mkdtemp())
        f32 = tmp / "model-f32.gguf"
        export_gguf(path, f32, "f32")
        files = {"llama.cpp F32": f32}
        for label, ftype in (
            ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
            ("Q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1),
        ):
            files[f"llama.cpp {label}"] = tmp / f"model-{label}.gguf"
            llama_quantize(f32, files[f"llama.cpp {label}"], ftype, args.threads)
        for name, file in files.items():
            rows[name] = llama(file, texts, args.threads)
            if rows[name]:
                print(f"{name}: ppl {math.exp(rows[name][0] / rows[name][1]):.4f}", flush=True)
        for kind in gguf_types:
            file = tmp / f"model-{kind}.gguf"
            llama_quantize(f32, file, FTYPES[kind], args.threads)
            label = kind.upper()
            rows[f"{label} file dequantized, fp32"] = ours(file, texts, None)  # the weights, exact inputs
            rows[f"weightsmith {label} file"] = ours(file, texts, None, keep_quantized=True)
            rows[f"llama.cpp {label} file"] = llama(file, texts, args.threads)
            for name in (
                f"{label} file dequantized, fp32",
                f"weightsmith {label} file",
                f"llama.cpp {label} file",
            ):
                if rows[name]:
                    print(f"{name}: ppl {math.exp(rows[name][0] / rows[name][1]):.4f}", flush=True)
    report(rows)


def report(rows: dict[str, tuple[float, int] | None]) -> None:
    ppl = {k: math.exp(v[0] / v[1]) for k, v in rows.items() if v}
    base = {"weightsmith": ppl.get("weightsmith fp32"), "llama.cpp": ppl.get("llama.cpp F32")}
    print(f"\n{'':34} {'token ppl':>10} {'vs own fp32':>12}")
    for name, value in ppl.items():
        ref = base.get(name.split(" ", 1)[0], base["weightsmith"])
        delta = f"{100 * (value / ref - 1):+.3f}%" if ref else "-"
        print(f"{name:34} {value:10.4f} {delta:>12}")
    pairs = (("weightsmith int4 g32+int8 head", "llama.cpp Q4_1"), ("weightsmith int8", "llama.cpp Q8_0"))
    for mine, theirs in pairs:
        if mine in ppl and theirs in ppl and base["weightsmith"] and base["llama.cpp"]:
            d_ours = ppl[mine] / base["weightsmith"] - 1
            d_peer = ppl[theirs] / base["llama.cpp"] - 1
            verdict = "within" if d_ours <= d_peer else "above"
            print(f"{mine} delta {100 * d_ours:+.3f}% vs {theirs} {100 * d_peer:+.3f}%: {verdict} the peer's")
    for mine in ppl:  # the same GGUF file: each engine's rounding of the inputs against exact ones
        if mine.startswith("weightsmith ") and mine.endswith(" file"):
            label = mine.removeprefix("weightsmith ")
            theirs, exact = f"llama.cpp {label}", ppl.get(f"{label} dequantized, fp32")
            if theirs in ppl and exact:
                print(f"{label}: its weights with exact inputs {exact:.4f}; weightsmith "
                      f"{100 * (ppl[mine] / exact - 1):+.3f}%, llama.cpp {100 * (ppl[theirs] / exact - 1):+.3f}%")  # fmt: skip


if __name__ == "__main__":
    main()
