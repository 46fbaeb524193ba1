"""k-quant GGUF files: `weightsmith export --quant q4_k_m` against llama.cpp's own `llama-quantize`.

Both start from the same F32 GGUF file of the model (our F32 export): we export it again with
`--quant TYPE`, llama.cpp quantizes it with `llama_model_quantize` (llama-cpp-python, the
quantize tool's library call, no importance matrix). For each type this prints:

- time: the export or quantization, file to file, medians of `--runs` after a warm-up;
- types: whether every tensor got the same GGML type in both files;
- weight error: sum over quantized matrices of |W - dequantized W|^2 / |W|^2 (gguf-py's
  dequantizers, the F32 file as truth), ours / theirs;
- perplexity of the bundled text sample, every file decoded by llama.cpp the same way
  (perplexity.py's child, one token a batch), and its rise over the F32 file.

The default model's width (576) is not a multiple of 256, so most of its k-quant matrices fall
back to Q5_0 / Q5_1 / Q8_0 in both files (gguf-py's quantizers on our side, bit for bit ggml's
reference ones). `--wide` adds gguf_types.py's model of width 2048 (random weights, real
vocabulary), whose k-quant files are k-quants throughout.

    python benchmarks/gguf_export.py [--types q4_k_m,q5_k_m,q6_k] [--wide] [--runs 3] [--threads 2]
        [--max-tokens 128] [--paragraphs 8]

Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf_types import wide_model  # beside this file
from machine import cpu_description
from perplexity import llama, llama_quantize, windows

from weightsmith.checkpoint.gguf_mix import QUANTS


def timed(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weight_error(f32: Path, quantized: Path) -> dict[str, tuple[float, float]]:
    """Per stored type: (sum |W - W'|^2, sum |W|^2) over the matrices stored in it."""
    import gguf
    from gguf.quants import dequantize

    truth = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(f32).tensors}
    out: dict[str, tuple[float, float]] = {}
    for t in gguf.GGUFReader(quantized).tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        w = truth[t.name].reshape(-1)
        back = dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
        err, norm = out.get(t.tensor_type.name, (0.0, 0.0))
        out[t.tensor_type.name] = (err + float(((back - w) ** 2).sum()), norm + float((w**2).sum()))
    return out


def relative(errors: dict[str, tuple[float, float]]) -> float:
    return sum(e for e, _ in errors.values()) / sum(n for _, n in errors.values())


def types_of(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--types", default="q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--wide", action="store_true", help="also a 4-layer model of width 2048 (random weights)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per paragraph window")
    ap.add_argument("--paragraphs", type=int, default=8)
    args = ap.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in QUANTS or t in ("f32", "f16")]
    if unknown:
        raise SystemExit(f"gguf_export.py: --types: unknown {', '.join(unknown)}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("gguf_export.py: needs llama-cpp-python (pip install llama-cpp-python)") from None
    torch.set_num_threads(args.threads)
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve

    path = resolve(args.model)
    texts = windows(load_checkpoint(path).tokenizer, args.max_tokens)[: args.paragraphs]
    print(f"CPU: {cpu_description()}")
    print(f"{args.threads} threads; times are medians of {args.runs} after a warm-up; perplexity: "
          f"{len(texts)} paragraphs of <= {args.max_tokens} tokens, decoded by llama.cpp")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ws-gguf-export-") as tmp:
        work = Path(tmp)
        sources = {args.model: Path(export_gguf(path, work / "default-f32.gguf", "f32")["path"])}
        if args.wide:
            sources["width 2048"] = wide_model(path, work / "wide-f32.gguf")
        header = (f"{'model, type':34}{'time ours':>10}{'theirs':>8}{'ratio':>7}{'same types':>11}"
                  f"{'weight err ours':>16}{'theirs':>9}{'ratio':>7}{'ppl ours':>10}{'theirs':>9}{'f32':>9}")  # fmt: skip
        print(header)
        for label, f32 in sources.items():
            base = llama(f32, texts, args.threads)
            ppl_f32 = float(np.exp(base[0] / base[1])) if base else float("nan")
            for quant in types:
                ours, theirs = work / f"ours-{quant}.gguf", work / f"theirs-{quant}.gguf"
                t_ours = timed(lambda: export_gguf(f32, ours, quant, overwrite=True), args.runs)  # noqa: B023
                ftype = int(QUANTS[quant][1])
                t_theirs = timed(lambda: llama_quantize(f32, theirs, ftype, args.threads), args.runs)  # noqa: B023
                a, b = types_of(ours), types_of(theirs)
                same = "yes" if a == b else f"{sum(a.get(k) != v for k, v in b.items())} differ"
                by_ours, by_theirs = weight_error(f32, ours), weight_error(f32, theirs)
                e_ours, e_theirs = relative(by_ours), relative(by_theirs)
                ppl = []
                for file in (ours, theirs):
                    nll = llama(file, texts, args.threads)
                    ppl.append(float(np.exp(nll[0] / nll[1])) if nll else float("nan"))
                print(f"{label + ', ' + quant:34}{t_ours:9.2f}s{t_theirs:7.2f}s{t_ours / t_theirs:6.2f}x{same:>11}"
                      f"{e_ours:16.3e}{e_theirs:9.3e}{e_ours / e_theirs:6.3f}x"
                      f"{ppl[0]:10.3f}{ppl[1]:9.3f}{ppl_f32:9.3f}")  # fmt: skip
                for kind, (err, norm) in sorted(by_ours.items()):
                    peer = by_theirs.get(kind)
                    ratio = f"{(err / norm) / (peer[0] / peer[1]):.3f}x" if peer else "-"
                    print(f"    {kind:6} relative error ours {err / norm:.3e}, ours / theirs {ratio}")


if __name__ == "__main__":
    main()
