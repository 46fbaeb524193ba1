"""Decode speed of weightsmith `--keep-quantized` vs llama.cpp on the same GGUF files, type by type.

Published GGUF files come in many quantization types (Q4_0, Q4_K_M, Q6_K, ...). This makes them
from the default model with llama.cpp's own quantizer (llama-cpp-python's
`llama_model_quantize`, from an F32 export of the model), then decodes each file with both
engines on the same threads: weightsmith keeps the file's blocks (`load(...,
keep_quantized=True)`: nothing dequantized or requantized), llama.cpp runs the file as it is. The
runs are interleaved and medians taken as in generate.py; read the ratio (ours / llama.cpp).

The grid-coded types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) need an importance
matrix in llama.cpp's quantizer, which llama-cpp-python cannot pass: for those (`RANDOM_BLOCKS`)
the file is written here, every matrix but the embedding as random valid blocks of the type (a
random model: for speed only), the embedding (the tied LM head) as Q8_0. They and TQ1_0 / TQ2_0 run on the --wide model only.

The default model's width (576) is not a multiple of 256, so its k-quant files fall back to
Q5_0 / Q5_1 / Q8_0 for most matrices (llama.cpp prints which). `--wide` adds a model of
realistic width instead: the default model's tokenizer and vocabulary with 4 layers of width
2048 (32 heads, 4 key/value heads, MLP 5632), random weights; its Q4_K_M file is Q4_K and Q6_K
throughout, as published files of 1B+ models are.

    python benchmarks/gguf_types.py [--types q4_0,q4_k_m,q5_k_m,q6_k] [--wide] [--runs 3] [--threads 2]
        [--isa avx2 --llama-cpp-site /path/to/avx2-build]   # both restricted to AVX2, as generate.py
        [--float]   # also our decode of each file dequantized to fp32 at load (no --keep-quantized)

Needs llama-cpp-python (run in a child process, as in generate.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import tempfile
from pathlib import Path

import torch
from generate import bench_llama_cpp, bench_ours, interleaved_rates  # beside this file
from machine import cpu_description
from perplexity import llama_quantize

#: llama.cpp's file types (llama_ftype) by the names its quantize tool takes.
FTYPES = {
    "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
    "q3_k_l": 13, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "tq1_0": 36,
    "tq2_0": 37,
}  # fmt: skip
#: The grid-coded types, which llama.cpp quantizes only with an importance matrix (IQ1, IQ2, and
#: IQ2_S in its IQ3 mixes) that llama-cpp-python cannot pass: their files are written here, every
#: matrix of the F32 export (not the embedding) as random valid blocks of the type -> (ggml type
#: id, byte offset of the fp16 scale (None: IQ1_M's, in the top nibbles of its last 4 halves),
#: weight per unit of scale: the grid's largest value times the largest sub-scale, as
#: tests/ggml_blocks.py).
RANDOM_BLOCKS = {
    "iq2_xxs": (16, 0, 167), "iq2_xs": (17, 0, 167), "iq2_s": (22, 0, 167), "iq3_xxs": (18, 0, 481),
    "iq3_s": (21, 0, 465), "iq1_s": (19, 0, 17), "iq1_m": (29, None, 17),
}  # fmt: skip
#: The types only the --wide model's matrices are whole blocks of (the default model's width,
#: 576, is not a multiple of 256: llama.cpp would fall back to other types, we would keep F32).
WIDE_ONLY = {*RANDOM_BLOCKS, "tq1_0", "tq2_0"}


def wide_model(path: Path, out: Path) -> Path:
    """The default model's tokenizer with 4 random layers of width 2048, exported as F32 GGUF."""
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.models import CausalLM

    ckpt = load_checkpoint(path, decode_layout=False)
    cfg = dataclasses.replace(
        ckpt.config, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
        num_key_value_heads=4, num_hidden_layers=4, head_dim=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    export_gguf(dataclasses.replace(ckpt, model=model, config=cfg), out, "f32", overwrite=True)
    return out


def quantize_file(f32: Path, out: Path, ftype: int, threads: int) -> dict[str, int]:
    """llama.cpp's quantizer (perplexity.llama_quantize); returns the file's tensor types, counted."""
    import gguf

    llama_quantize(f32, out, ftype, threads)
    return collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(out).tensors)


def random_block_file(f32: Path, out: Path, name: str) -> dict[str, int]:
    """A copy of the F32 file with every 2-D weight but the embedding as random valid blocks of
    RANDOM_BLOCKS[name] (weights about 0.02 in size: a random model, for speed only), and the
    embedding, which is also the LM head, as Q8_0."""
    import gguf
    import numpy as np

    qtype, at, unit = RANDOM_BLOCKS[name]
    per, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    reader = gguf.GGUFReader(f32)
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(out, bytes(arch.parts[arch.data[0]]).decode())
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            sub = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if len(shape) == 2 and t.name != "token_embd.weight" and shape[1] % per == 0:
            raw = rng.integers(0, 256, (shape[0], shape[1] // per, size), dtype=np.uint8)
            d = (0.02 / unit * rng.uniform(0.5, 1.0, raw.shape[:2])).astype(np.float16).view(np.uint16)
            if at is None:  # IQ1_M: d's nibbles in the top of the halves at 48, 50, 52, 54
                words = raw[..., 48:56].copy().view(np.uint16)
                for j in range(4):
                    words[..., j] = (words[..., j] & 0x0FFF) | (d >> 4 * j & 15) << 12
                raw[..., 48:56] = words.view(np.uint8)
            else:
                raw[..., at : at + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
            writer.add_tensor(t.name, raw.reshape(shape[0], -1), raw_dtype=qtype)
        elif t.name == "token_embd.weight":  # the (tied) LM head too: Q8_0, as both engines read it
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(
                t.name, gguf.quants.quantize(np.asarray(t.data).reshape(shape), q8), raw_dtype=q8
            )
        else:
            writer.add_tensor(t.name, np.asarray(t.data).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(out).tensors)


def parse_types(text: str, option: str, random_blocks: bool = True) -> list[str]:
    """A comma-separated list of FTYPES (and, with `random_blocks`, RANDOM_BLOCKS) names (an
    empty one for ""); an unknown name exits."""
    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    known = [*FTYPES, *(RANDOM_BLOCKS if random_blocks else ())]
    unknown = [t for t in types if t not in known]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return types


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument(
        "--types",
        default="q4_0,q4_k_m,q5_k_m,q6_k",
        help=f"comma-separated, of {', '.join([*FTYPES, *RANDOM_BLOCKS])}",
    )
    ap.add_argument("--wide", action="store_true", help="also a 4-layer model of width 2048 (random weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--isa", help="force our kernels' instruction set (e.g. avx2)")
    ap.add_argument("--float", action="store_true", help="also each file dequantized to fp32 at load")
    ap.add_argument("--llama-cpp-site", help="a folder with another llama-cpp-python build (pip --target)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.isa:
        from weightsmith.quant import cpu_kernels

        if cpu_kernels.library() is None:
            raise SystemExit("gguf_types.py: --isa: the C kernels are not built here (no C compiler)")
        cpu_kernels.select_isa(cpu_kernels.library(), args.isa)
        print(f"C decode kernels: {cpu_kernels.info()}")
    try:
        import llama_cpp  # noqa: F401  (here only to say it is missing; it runs in child processes)
    except ImportError:
        raise SystemExit("gguf_types.py: needs llama-cpp-python (pip install llama-cpp-python)") from None
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve

    types = parse_types(args.types, "gguf_types.py: --types")
    path = resolve(args.model)
    tok = load_checkpoint(path).tokenizer
    prompt_ids = tok.encode("The history of open-weight language models began when")
    with tempfile.TemporaryDirectory(prefix="ws-gguf-types-") as tmp:
        run(args, types, path, prompt_ids, Path(tmp))


def run(args, types: list[str], path: Path, prompt_ids: list[int], work: Path) -> None:
    from weightsmith.checkpoint.gguf_write import export_gguf

    sources = {args.model: export_gguf(path, work / "default-f32.gguf", "f32")["path"]}
    if args.wide:
        sources["width 2048"] = wide_model(path, work / "wide-f32.gguf")
    print(f"CPU: {cpu_description()}")
    contenders = {}
    for label, f32 in sources.items():
        for name in types:
            out = work / f"{Path(f32).stem}-{name}.gguf"
            if name in WIDE_ONLY and label == args.model:
                continue
            if name in RANDOM_BLOCKS:
                mix = random_block_file(Path(f32), out, name)
            else:
                mix = quantize_file(Path(f32), out, FTYPES[name], args.threads)
            print(f"{label} {name.upper()}: {dict(mix.most_common())}")
            key = f"{label} {name.upper()}"
            gen, _ = bench_ours(out, prompt_ids, prompt_ids, keep_quantized=True)
            contenders[f"weightsmith, {key}"] = (gen, lambda: None)
            if args.float:
                gen, _ = bench_ours(out, prompt_ids, prompt_ids, keep_quantized=False)
                contenders[f"weightsmith fp32, {key}"] = (gen, lambda: None)
            gen, _ = bench_llama_cpp(
                out, prompt_ids, prompt_ids, args.threads, args.llama_cpp_site, one_by_one=True
            )
            contenders[f"llama.cpp, {key}"] = (gen, lambda: None)
    results = interleaved_rates(contenders, args.new_tokens, len(prompt_ids), args.runs)
    print(f"{args.threads} threads, batch 1, greedy, decode tok/s, medians of {args.runs} interleaved runs")
    head = f"{'file':32}{'weightsmith':>13}{'llama.cpp':>11}{'ratio':>8}"
    print(head + (f"{'ours, fp32 load':>17}{'kept / fp32':>13}" if args.float else ""))
    for name in contenders:
        if name.startswith("weightsmith, "):
            key = name.removeprefix("weightsmith, ")
            peer = results.get(f"llama.cpp, {key}", {}).get("decode_tok_s", float("nan"))
            ours = results[name]["decode_tok_s"]
            line = f"{key:32}{ours:13.1f}{peer:11.1f}{ours / peer:7.2f}x"
            if args.float:
                flt = results[f"weightsmith fp32, {key}"]["decode_tok_s"]
                line += f"{flt:17.1f}{ours / flt:12.2f}x"
            print(line.replace("nan", "  -"))


if __name__ == "__main__":
    main()
