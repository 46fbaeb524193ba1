"""Decode speed of the fused C step against the PyTorch step, per family, on random weights of real shapes.

The C decode step (weightsmith/quant/cpu_decode.c) runs one token per row through every layer
in one call; the PyTorch step (weightsmith.generate.decode_one_token, the same model's modules,
with the C matmul kernels for quantized layers) is what a family decoded on before the C step
took it. Both decode the same model from the same prefill. No checkpoint is needed: the model
is one of the shapes below (a published model's widths, heads, experts and vocabulary) with
`--layers` of its layers and random weights, in fp32 or quantized weight-only (`--bits 4`: int4
g32 projections and an int8 LM head, the mix of llama.cpp's Q4 files; `--bits 8`), with
`--lora R` a LoRA adapter of rank R on every projection of every layer (unmerged, as
`chat --adapter` runs one; `--dora`: a DoRA adapter); `--adapters K --rows B` decodes B rows at once, row i on adapter
i mod K (the server's batches of requests for different adapters). Tokens/s count every row.

Each side is warmed up, then the runs alternate (C, PyTorch, C, ...) so a noisy neighbour slows
both alike; medians are printed with their ratio. Read the ratio: these machines are shared.

    python benchmarks/decode_step.py --shape qwen3-moe-30b-a3b --layers 2 --bits 4
    python benchmarks/decode_step.py --shape gemma3-1b --layers 6
    python benchmarks/decode_step.py --shape smollm2-135m --layers 30 --lora 16
    python benchmarks/decode_step.py --shape smollm2-135m --layers 30 --lora 16 --adapters 4 --rows 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import cpu_description  # beside this file

#: Published models' shapes (config.json fields), all layers; `--layers` keeps the first few.
SHAPES = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, num_hidden_layers=30, tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, num_hidden_layers=28, tie_word_embeddings=True,
    ),
    "qwen3-moe-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, num_hidden_layers=48,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    ),
    "gemma3-1b": dict(
        model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, num_hidden_layers=26, query_pre_attn_scalar=256,
        sliding_window=512, rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=256000, num_hidden_layers=26, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
    ),
    "olmo2-1b": dict(
        model_type="olmo2", hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=100352, num_hidden_layers=16,
    ),
    "smollm3-3b": dict(
        model_type="smollm3", hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=128256, num_hidden_layers=36,
    ),
}  # fmt: skip


def build(
    shape: str,
    layers: int,
    experts: int | None,
    bits: int | None,
    lora: int | None = None,
    adapters: int = 1,
    dora: bool = False,
):
    from weightsmith.models import ModelConfig
    from weightsmith.models.model import CausalLM

    fields = {**SHAPES[shape], "num_hidden_layers": layers}
    if experts is not None:
        fields["num_experts"] = experts
    fields["max_position_embeddings"] = 4096
    cfg = ModelConfig.from_hf(fields, source=shape)
    torch.manual_seed(0)
    with torch.no_grad():
        model = CausalLM(cfg).eval()
        for name, p in model.named_parameters():
            if "norm" in name:  # ones, or Gemma's (1 + w) zeros, moved a little
                p.add_(torch.randn_like(p) * 0.05)
            else:
                p.normal_(0, 0.02)
    if bits is not None:
        from weightsmith.quant.weight_only import quantize_model

        quantize_model(model, bits, 32 if bits == 4 else None, head_bits=8 if bits == 4 else None)
    if lora:
        from weightsmith.lora import LoraConfig, apply_lora, lora_layers

        for i in range(adapters):
            name = "default" if i == 0 else f"adapter{i}"
            cfg = LoraConfig(r=lora, alpha=2 * lora, target_modules="all-linear", use_dora=dora)
            apply_lora(model, cfg, name)
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    layer.lora_B[name].weight.normal_(0, 0.02)  # a trained adapter's B is not 0
                    if dora:  # nor are its magnitudes ||W||
                        layer.lora_magnitude_vector[name].weight.mul_(1.1)
    return model


def decode_rate(model, step, prompt: list[int], new: int, rows: int = 1, names=None) -> float:
    """Tokens/s (all rows together) of `new` greedy decode steps of `rows` rows after prefilling
    `prompt` in each (prefill not timed); `names`: each row's adapter (`row_adapters`, as the
    server's batches), else the active one on every row."""
    import contextlib

    from weightsmith.generate import prefill
    from weightsmith.kv_cache import KVCache
    from weightsmith.lora import row_adapters

    cpu = torch.device("cpu")
    cache = KVCache.for_model(model.config, rows, len(prompt) + new + 1, dtype=torch.float32, device=cpu)
    with torch.no_grad(), row_adapters(model, names) if names else contextlib.nullcontext():
        tokens = prefill(model, cache, [prompt] * rows, cpu).argmax(-1).tolist()
        start = time.perf_counter()
        for _ in range(new):
            tokens = step(model, cache, tokens, cpu).argmax(-1).tolist()
    return rows * new / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-moe-30b-a3b")
    ap.add_argument("--layers", type=int, default=2, help="how many of the shape's layers to build")
    ap.add_argument("--experts", type=int, help="fewer experts than the shape has (the same work a token)")
    ap.add_argument("--bits", type=int, choices=(4, 8), help="quantize weight-only (4: int4 g32 + int8 head)")
    ap.add_argument(
        "--lora", type=int, metavar="R", help="an unmerged LoRA adapter of rank R on every projection"
    )
    ap.add_argument(
        "--adapters", type=int, default=1, help="with --lora: this many adapters, one per row in turn"
    )
    ap.add_argument("--dora", action="store_true", help="with --lora: DoRA adapters (a magnitude per output)")
    ap.add_argument("--rows", type=int, default=1, help="rows decoded together (a server's batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from weightsmith.cpu_decode import prepare_cpu_decode
    from weightsmith.generate import decode_one_token

    print(f"CPU: {cpu_description()}")
    model = build(args.shape, args.layers, args.experts, args.bits, args.lora, args.adapters, args.dora)
    names = None
    if args.lora and args.adapters > 1:
        names = [
            "default" if i % args.adapters == 0 else f"adapter{i % args.adapters}" for i in range(args.rows)
        ]
    plan = prepare_cpu_decode(model)
    fused = plan.decode_step(decode_one_token)
    if fused is decode_one_token:
        raise SystemExit(f"the C step does not take {args.shape}: nothing to compare")
    prompt = [(7 * i + 3) % model.config.vocab_size for i in range(args.prompt_tokens)]
    sides = {"C step": fused, "PyTorch step": decode_one_token}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for step in sides.values():  # warm-up
        decode_rate(model, step, prompt, 4, args.rows, names)
    for _ in range(args.runs):
        for name, step in sides.items():
            rates[name].append(decode_rate(model, step, prompt, args.new_tokens, args.rows, names))
    what = "fp32" if args.bits is None else f"int{args.bits}" + (" g32 + int8 head" if args.bits == 4 else "")
    experts = f", {model.config.num_local_experts} experts" if model.config.num_local_experts else ""
    kind = "DoRA" if args.dora else "LoRA"
    experts += f", a rank-{args.lora} {kind} adapter on every projection" if args.lora else ""
    experts += f" ({args.adapters} adapters, row i on adapter i mod {args.adapters})" if names else ""
    print(
        f"{args.shape}: {args.layers} of its layers{experts}, {what}, {args.threads} threads, batch {args.rows}, "
        f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, medians of {args.runs} alternating runs"
    )
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, m in medians.items():
        print(f"  {name:14s} {m:8.1f} tok/s")
    print(f"  ratio C step / PyTorch step: {medians['C step'] / medians['PyTorch step']:.2f}x")


if __name__ == "__main__":
    main()
