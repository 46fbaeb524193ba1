"""Decode speed of gpt-oss on the CPU: weightsmith against llama.cpp on the same MXFP4_MOE file.

gpt-oss-20b's layer shape (width 2880, 64 query heads and 8 key/value heads of 64, 32 experts of
width 2880, 4 a token, sinks, every other layer sliding over 128 positions), random weights, the
default model's tokenizer and vocabulary, `--layers` layers (2: the per-layer cost, which is what
the 24 layers of the real model multiply). The model is exported with `export --quant mxfp4_moe`
(llama.cpp's MXFP4_MOE: experts in MXFP4, other matrices Q8_0, as gpt-oss ships), then decoded by

- weightsmith with the file's blocks kept (`--keep-quantized`): the fused C step;
- weightsmith's PyTorch step on the same blocks, the C matmul kernels on but the fused step
  declined (what gpt-oss ran on before the C step took its sinks and clamped SwiGLU);
- llama.cpp (llama-cpp-python, in a child process).

Runs are interleaved, medians of `--runs` after a warm-up (generate.py's harness); read the ratios.

    python benchmarks/gpt_oss_decode.py [--layers 2] [--experts 32] [--runs 3] [--threads 2]

Exporting takes about 50 s a layer here (gguf-py's MXFP4 quantizer); the file is kept in a
temporary folder only.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from generate import bench_llama_cpp, bench_ours, interleaved_rates  # beside this file
from machine import cpu_description


def gpt_oss_file(path: Path, out: Path, layers: int, experts: int) -> Path:
    """The default model's tokenizer on gpt-oss-20b's layer shape, random weights, MXFP4_MOE."""
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.models import CausalLM, ModelConfig

    ckpt = load_checkpoint(path, decode_layout=False)
    cfg = ModelConfig.from_hf(
        {
            "model_type": "gpt_oss", "vocab_size": ckpt.config.vocab_size, "hidden_size": 2880,
            "intermediate_size": 2880, "num_hidden_layers": layers, "num_attention_heads": 64,
            "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": experts, "num_experts_per_tok": 4,
            "sliding_window": 128, "max_position_embeddings": 4096,
            "layer_types": ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)],
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
            "eos_token_id": ckpt.config.eos_token_id, "bos_token_id": ckpt.config.bos_token_id,
        },
        source="gpt_oss_decode.py",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = torch.empty(p.shape).normal_(0, 0.02) if p.dim() == 2 else torch.zeros(p.shape)
            if name.endswith("norm.weight"):
                value.fill_(1.0)
            module, _, attr = name.rpartition(".")
            model.get_submodule(module)._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    model.reset_rope()
    export_gguf(dataclasses.replace(ckpt, model=model.eval(), config=cfg), out, "mxfp4_moe", overwrite=True)
    return out


def _without_the_c_step(gen):
    """`gen` with the fused C step declining every model (its matmul kernels still run)."""
    from unittest import mock

    from weightsmith.cpu_decode import plan

    def run(n: int):
        with mock.patch.object(plan, "supports", lambda model: False):
            return gen(n)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and vocabulary")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp  # noqa: F401  (here only to say it is missing; it runs in child processes)
    except ImportError:
        raise SystemExit("gpt_oss_decode.py: needs llama-cpp-python (pip install llama-cpp-python)") from None
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve

    path = resolve(args.model)
    prompt_ids = load_checkpoint(path).tokenizer.encode(
        "The history of open-weight language models began when"
    )
    print(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory(prefix="ws-gpt-oss-") as tmp:
        f = gpt_oss_file(path, Path(tmp) / "gpt-oss.gguf", args.layers, args.experts)
        print(f"{f.name}: {f.stat().st_size / 2**20:.0f} MiB, {args.layers} layers, {args.experts} experts")
        contenders = {}
        gen, _ = bench_ours(f, prompt_ids, prompt_ids, keep_quantized=True)
        contenders["weightsmith (C step)"] = (gen, lambda: None)
        gen, _ = bench_ours(f, prompt_ids, prompt_ids, keep_quantized=True)
        contenders["weightsmith (PyTorch step)"] = (_without_the_c_step(gen), lambda: None)
        gen, _ = bench_llama_cpp(f, prompt_ids, prompt_ids, args.threads, one_by_one=True)
        contenders["llama.cpp"] = (gen, lambda: None)
        results = interleaved_rates(contenders, args.new_tokens, len(prompt_ids), args.runs)
    peer = results.get("llama.cpp", {}).get("decode_tok_s", float("nan"))
    print(f"{args.threads} threads, batch 1, greedy, decode tok/s, medians of {args.runs} interleaved runs")
    for name, r in results.items():
        print(f"{name:30}{r['decode_tok_s']:9.1f}{r['decode_tok_s'] / peer:8.2f}x llama.cpp")


if __name__ == "__main__":
    main()
