"""Importance matrices: what `export --imatrix` buys, and against llama.cpp's own tools.

From the default model's F32 GGUF file (our F32 export), for each `--types` type:

- ours: `export --quant TYPE`, and again with `--imatrix` from `weightsmith imatrix` over the
  calibration text (`--text`, default this repository's README: prose and commands, not the
  evaluation sample);
- theirs, where `--llama-bin DIR` holds llama.cpp's `llama-imatrix` and `llama-quantize`: the
  same without and with the imatrix `llama-imatrix` computes from the same text and chunks.

Every file is decoded by llama.cpp the same way (gguf_export.py's child process) on the bundled
text sample; printed: the mean KL divergence a token from the F32 file, with the paired 95%
interval over paragraphs of (with imatrix - without) for each side, and of (ours - theirs) with
an imatrix. Also the time to compute the imatrix, ours (2 threads, PyTorch) against
llama-imatrix's (`-t` threads), medians of `--runs` after a warm-up.

    python benchmarks/imatrix.py [--types q4_k_m,q3_k_m,q2_k] [--text FILE] [--chunks 16]
        [--chunk-size 512] [--llama-bin DIR] [--runs 3] [--threads 2] [--paragraphs 8]

Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch
from gguf_export import divergence, paired_interval, timed  # beside this file
from machine import cpu_description
from perplexity import windows

from weightsmith.checkpoint.gguf_mix import QUANTS


def llama_tools(directory: str | None) -> dict[str, Path] | None:
    if directory is None:
        return None
    tools = {name: Path(directory) / name for name in ("llama-imatrix", "llama-quantize")}
    missing = [str(p) for p in tools.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"imatrix.py: --llama-bin: missing {', '.join(missing)}")
    return tools


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{done.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--types", default="q4_k_m,q3_k_m,q2_k")
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--llama-bin", help="a directory with llama.cpp's llama-imatrix and llama-quantize")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per paragraph window")
    ap.add_argument("--paragraphs", type=int, default=8)
    args = ap.parse_args()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if unknown := [t for t in types if t not in QUANTS or t in ("f32", "f16", "q8_0")]:
        raise SystemExit(f"imatrix.py: --types: not an imatrix type: {', '.join(unknown)}")
    tools = llama_tools(args.llama_bin)
    torch.set_num_threads(args.threads)
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.checkpoint.imatrix import read_imatrix
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.commands.imatrix import ImatrixConfig, run_imatrix

    path = resolve(args.model)
    texts = windows(load_checkpoint(path).tokenizer, args.max_tokens)[: args.paragraphs]
    print(f"CPU: {cpu_description()}")
    print(f"calibration: {args.text}, {args.chunks} chunks of {args.chunk_size} tokens; "
          f"KL on {len(texts)} paragraphs of <= {args.max_tokens} tokens of the bundled sample")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ws-imatrix-") as tmp:
        work = Path(tmp)
        f32 = Path(export_gguf(path, work / "f32.gguf", "f32")["path"])
        ours_im = work / "ours.imatrix.gguf"
        cfg = ImatrixConfig(model=str(f32), text=args.text, out=str(ours_im), chunk_size=args.chunk_size,
                            chunks=args.chunks, overwrite=True)  # fmt: skip
        t_ours = timed(lambda: run_imatrix(cfg), args.runs)
        theirs_im = work / "theirs.imatrix.gguf"
        line = f"imatrix time ({args.threads} threads): ours {t_ours:.1f}s"
        if tools:
            cmd = [str(tools["llama-imatrix"]), "-m", str(f32), "-f", args.text, "-o", str(theirs_im),
                   "-c", str(args.chunk_size), "--chunks", str(args.chunks), "-t", str(args.threads), "--no-ppl"]  # fmt: skip
            t_theirs = timed(lambda: run(cmd), args.runs)
            line += f", llama-imatrix {t_theirs:.1f}s, {t_ours / t_theirs:.2f}x"
        print(line)
        ours_matrix = read_imatrix(ours_im)
        print(f"\n{'type':8} {'file':18} {'KL':>9} {'top1':>6}   paired 95% CI of the difference")
        for quant in types:
            files = {"ours": work / f"ours-{quant}.gguf", "ours + imatrix": work / f"ours-im-{quant}.gguf"}
            export_gguf(f32, files["ours"], quant, overwrite=True)
            export_gguf(f32, files["ours + imatrix"], quant, overwrite=True, imatrix=ours_matrix)
            if tools:
                files["theirs"], files["theirs + imatrix"] = (
                    work / f"th-{quant}.gguf",
                    work / f"th-im-{quant}.gguf",
                )
                name = quant.upper()
                run([str(tools["llama-quantize"]), str(f32), str(files["theirs"]), name, str(args.threads)])
                run([str(tools["llama-quantize"]), "--imatrix", str(theirs_im), str(f32),
                     str(files["theirs + imatrix"]), name, str(args.threads)])  # fmt: skip
            kl = {label: divergence(f32, file, texts, args.threads) for label, file in files.items()}
            if any(v is None for v in kl.values()):
                print(f"{quant:8} llama.cpp failed on a file; skipped")
                continue
            for label, found in kl.items():
                note = ""
                if label.endswith("imatrix"):
                    base = kl[label.replace(" + imatrix", "")]
                    lo, hi = paired_interval(found["kl_windows"], base["kl_windows"])
                    note = f"vs without: {found['kl'] / base['kl']:.3f}x [{lo:+.5f}, {hi:+.5f}]"
                    if label.startswith("theirs"):
                        mine = kl["ours + imatrix"]
                        lo, hi = paired_interval(mine["kl_windows"], found["kl_windows"])
                        note += f"; ours/theirs {mine['kl'] / found['kl']:.3f}x [{lo:+.5f}, {hi:+.5f}]"
                print(f"{quant:8} {label:18} {found['kl']:9.5f} {found['top1']:6.3f}   {note}")


if __name__ == "__main__":
    main()
