"""k-quant GGUF files: `weightsmith export --quant q4_k_m` against llama.cpp's own `llama-quantize`.

Both start from the same F32 GGUF file of the model (our F32 export): we export it again with
`--quant TYPE`, llama.cpp quantizes it with `llama_model_quantize` (llama-cpp-python, the
quantize tool's library call, no importance matrix). For each type this prints:

- time: the export or quantization, file to file, medians of `--runs` after a warm-up;
- types: whether every tensor got the same GGML type in both files ("same");
- weight error: sum over quantized matrices of |W - dequantized W|^2 / |W|^2 (gguf-py's
  dequantizers, the F32 file as truth), ours / theirs;
- against the F32 file, on the bundled text sample, every file decoded by llama.cpp the same
  way (one token a batch, in a child process): the mean KL divergence of the next-token
  distributions from the F32 file's, how often the top token agrees, and the perplexity
  (llama.cpp's own perplexity tool measures quantization the same way, `--kl-divergence`).
  KL is the finer measure: on a sample this size perplexity moves by about 1% either way
  with which weights happen to round which way.

The default model's width (576) is not a multiple of 256, so most of its k-quant matrices fall
back to Q5_0 / Q5_1 / Q8_0 in both files (gguf-py's quantizers on our side, bit for bit ggml's
reference ones). `--wide` adds gguf_types.py's model of width 2048 (random weights, real
vocabulary), whose k-quant files are k-quants throughout.

    python benchmarks/gguf_export.py [--types q4_k_m,q5_k_m,q6_k,q8_0] [--wide] [--runs 3] [--threads 2]
        [--max-tokens 128] [--paragraphs 8] [--skip-quality]

Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf_types import wide_model  # beside this file
from machine import cpu_description
from perplexity import child_answers, llama_quantize, windows

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


def _kl_child(reference: str, path: str, threads: int, n_ctx: int) -> None:
    """In the child: both files in llama.cpp; for each token window (JSON lines in) answers the
    summed KL(reference || file) of the next-token distributions, the positions whose top token
    agrees, and the summed NLL of the text under each."""
    import llama_cpp

    def load(file: str):
        return llama_cpp.Llama(model_path=file, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                               n_batch=1, logits_all=True, verbose=False)  # fmt: skip

    ref, model = load(reference), load(path)
    print("ok", flush=True)
    for line in sys.stdin:
        ids = json.loads(line)
        kl, same, nll_ref, nll = 0.0, 0, 0.0, 0.0
        for llm in (ref, model):
            llm.reset()
        for i, token in enumerate(ids[:-1]):
            rows = []
            for llm in (ref, model):
                llm.eval([token])  # one token a batch: multi-token batches crash on some AMX CPUs
                z = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
                rows.append(z - z.max() - np.log(np.exp(z - z.max()).sum()))
            p, q = rows
            kl += float((np.exp(p) * (p - q)).sum())
            same += int(p.argmax() == q.argmax())
            nll_ref -= p[ids[i + 1]]
            nll -= q[ids[i + 1]]
        print(json.dumps([kl, same, nll_ref, nll]), flush=True)


def divergence(reference: Path, path: Path, texts: list[list[int]], threads: int) -> dict[str, float] | None:
    """Mean KL(reference || path) a token, top-1 agreement, and both perplexities (llama.cpp)."""
    n_ctx = max(map(len, texts)) + 8
    call = f"gguf_export._kl_child({str(reference)!r}, {str(path)!r}, {threads}, {n_ctx})"
    answers = child_answers(call, path, texts)
    if answers is None:
        return None
    totals = np.sum(answers, axis=0)
    n = sum(len(t) - 1 for t in texts)
    return {
        "kl": totals[0] / n,
        "top1": totals[1] / n,
        "ppl_ref": math.exp(totals[2] / n),
        "ppl": math.exp(totals[3] / n),
        "kl_windows": [a[0] / (len(t) - 1) for a, t in zip(answers, texts, strict=True)],
    }


def paired_interval(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """95% t-interval of the mean per-window difference ours - theirs (windows are the units)."""
    from scipy import stats

    diff = np.asarray(ours) - np.asarray(theirs)
    if len(diff) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    return float(diff.mean() - half), float(diff.mean() + half)


def types_of(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--types", default="q4_k_m,q5_k_m,q6_k,q8_0")
    ap.add_argument("--wide", action="store_true", help="also a 4-layer model of width 2048 (random weights)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per paragraph window")
    ap.add_argument("--paragraphs", type=int, default=8)
    ap.add_argument("--skip-quality", action="store_true", help="times and weight errors only")
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
    print(f"{args.threads} threads; times are medians of {args.runs} after a warm-up")
    with tempfile.TemporaryDirectory(prefix="ws-gguf-export-") as tmp:
        work = Path(tmp)
        sources = {args.model: Path(export_gguf(path, work / "default-f32.gguf", "f32")["path"])}
        if args.wide:
            sources["width 2048"] = wide_model(path, work / "wide-f32.gguf")
        print(f"{'model, type':30} {'time ours':>9} {'theirs':>7} {'ratio':>6} {'types':>6} "
              f"{'w-err ours':>10} {'theirs':>9} {'ratio':>6}")  # fmt: skip
        files = []
        for label, f32 in sources.items():
            for quant in types:
                ours, theirs = (
                    work / f"{f32.stem}-ours-{quant}.gguf",
                    work / f"{f32.stem}-theirs-{quant}.gguf",
                )
                t_ours = timed(lambda: export_gguf(f32, ours, quant, overwrite=True), args.runs)  # noqa: B023
                ftype = int(QUANTS[quant][1])
                t_theirs = timed(lambda: llama_quantize(f32, theirs, ftype, args.threads), args.runs)  # noqa: B023
                a, b = types_of(ours), types_of(theirs)
                same = "same" if a == b else f"{sum(a.get(k) != v for k, v in b.items())} diff"
                by_ours, by_theirs = weight_error(f32, ours), weight_error(f32, theirs)
                e_ours, e_theirs = relative(by_ours), relative(by_theirs)
                print(f"{label + ', ' + quant:30} {t_ours:8.2f}s {t_theirs:6.2f}s {t_ours / t_theirs:5.2f}x {same:>6} "
                      f"{e_ours:10.3e} {e_theirs:9.3e} {e_ours / e_theirs:5.3f}x")  # fmt: skip
                for kind, (err, norm) in sorted(by_ours.items()):
                    peer = by_theirs.get(kind)
                    ratio = f"{(err / norm) / (peer[0] / peer[1]):.3f}x" if peer and peer[0] > 0 else "-"
                    print(f"    {kind:6} relative error ours {err / norm:.3e}, ours / theirs {ratio}")
                files.append((f"{label}, {quant}", f32, ours, theirs))
        if args.skip_quality:
            return
        print(f"\nagainst the F32 file, decoded by llama.cpp: {len(texts)} paragraphs of <= {args.max_tokens} "
              "tokens; KL(F32 || file) a token, top-1 agreement, perplexity")  # fmt: skip
        print(f"{'model, type':30} {'KL ours':>9} {'theirs':>9} {'ratio':>6} {'ours - theirs, 95% CI':>23} "
              f"{'top1 ours':>9} {'theirs':>7} {'ppl ours':>9} {'theirs':>9} {'f32':>9}")  # fmt: skip
        for name, f32, ours, theirs in files:
            a, b = divergence(f32, ours, texts, args.threads), divergence(f32, theirs, texts, args.threads)
            if a is None or b is None:
                continue
            ratio = a["kl"] / b["kl"] if b["kl"] > 0 else float("nan")
            lo, hi = paired_interval(a["kl_windows"], b["kl_windows"])
            print(f"{name:30} {a['kl']:9.5f} {b['kl']:9.5f} {ratio:5.3f}x {f'[{lo:+.5f}, {hi:+.5f}]':>23} "
                  f"{a['top1']:9.3f} {b['top1']:7.3f} {a['ppl']:9.3f} {b['ppl']:9.3f} {a['ppl_ref']:9.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
