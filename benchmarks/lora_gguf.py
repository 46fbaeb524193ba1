"""A LoRA adapter on a quantized GGUF base: weightsmith `--keep-quantized --adapter` against llama.cpp `--lora`.

The base is the default model's Q4_1 file as shipped; the adapter has rank `--rank` on every
projection of every layer (random A and B, saved as a PEFT folder by weightsmith). Each contender
runs in its own process, the processes alternating over `--rounds`:

- ours base: the file's blocks (`keep_quantized=True`), no adapter;
- ours adapter: the same blocks with the adapter kept beside them (what `generate
  --keep-quantized --adapter DIR` and `serve --keep-quantized --adapter` run): the fused C step
  adds s B A x to each adapted projection;
- ours merged fp32: the file dequantized to fp32 with the adapter folded in (what `--adapter`
  without `--keep-quantized` runs);
- llama.cpp base, and llama.cpp adapter: llama-cpp-python (where installed) on the same file, with
  the adapter written by `weightsmith export --adapter` (f16, llama.cpp's `--lora`).

Each prefills a chat prompt, then times `--new-tokens` one-token steps (each computing the
logits), a warm-up then `--runs` times. Printed: decode tokens/s (medians), each ratio against
llama.cpp with the same adapter setting, what the adapter costs each engine, and the largest
difference between the engines' logits after the prompt, with and without the adapter, beside
what the adapter moves them by (the two engines round the layers' inputs differently, so greedy
tokens part at the first near-tie, with or without an adapter).

    python benchmarks/lora_gguf.py [--rank 16] [--new-tokens 64] [--runs 3] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import alternate_children, cpu_description  # noqa: E402

CONTENDERS = ["ours base", "ours adapter", "ours merged fp32", "llama.cpp base", "llama.cpp adapter"]
PROMPT = "Explain in three sentences how a kettle knows when the water boils."
TOKEN = 1234  # every timed step feeds the same token (the work does not depend on which)


def make_adapter(base: Path, out: Path, rank: int) -> None:
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import LoraConfig, apply_lora, save_adapter

    model = load_checkpoint(base, decode_layout=False).model
    cfg = LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear")
    apply_lora(model, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.normal_(0, p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.normal_(0, 0.02)
    save_adapter(model, out, cfg)


def ours(who: str, work: Path, base: str, prompt: list[int], new: int, runs: int) -> dict:
    import weightsmith
    from weightsmith.generate import prefill
    from weightsmith.kv_cache import KVCache

    adapter = None if who == "ours base" else str(work / "adapter")
    llm = weightsmith.load(base, keep_quantized=who != "ours merged fp32", adapter=adapter)
    model, step, cpu = llm.model, llm.engine.decode_step(), torch.device("cpu")
    cache = KVCache.for_model(model.config, 1, len(prompt) + new + 2, dtype=torch.float32, device=cpu)
    times = []
    with torch.inference_mode():
        prefill(model, cache, [prompt], cpu)
        for i in range(runs + 1):  # the first is the warm-up
            cache.set_length(0, len(prompt))
            start = time.perf_counter()
            for _ in range(new):
                step(model, cache, [TOKEN], cpu)
            if i:
                times.append(time.perf_counter() - start)
        out = model(torch.tensor([prompt]))
    np.save(work / f"{who}.npy", getattr(out, "logits", out)[0, -1].float().numpy())
    return {"times": times}


def llama_cpp_run(who: str, work: Path, base: str, prompt: list[int], new: int, runs: int) -> dict:
    import llama_cpp

    lora = {"lora_path": str(work / "adapter.gguf")} if who.endswith("adapter") else {}
    llama = llama_cpp.Llama(base, n_ctx=len(prompt) + new + 8, n_threads=torch.get_num_threads(),
                            n_batch=512, verbose=False, logits_all=True, **lora)  # fmt: skip
    llama.eval(prompt)
    np.save(work / f"{who}.npy", np.array(llama.scores[len(prompt) - 1], dtype=np.float32))
    times = []
    for i in range(runs + 1):
        llama.n_tokens = len(prompt)
        start = time.perf_counter()
        for _ in range(new):
            llama.eval([TOKEN])
        if i:
            times.append(time.perf_counter() - start)
    return {"times": times}


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--new-tokens", type=int, default=64)
    a.add_argument("--runs", type=int, default=3)
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--child", choices=CONTENDERS)
    a.add_argument("--work")
    a.add_argument("--base")
    args = a.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        work = Path(args.work)
        prompt = json.loads((work / "prompt.json").read_text())
        run = ours if args.child.startswith("ours") else llama_cpp_run
        print(json.dumps(run(args.child, work, args.base, prompt, args.new_tokens, args.runs)))
        return
    import weightsmith
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.commands.export import ExportConfig, run_export

    base = str(resolve("smollm2-135m-instruct"))
    print(
        f"cpu: {cpu_description()}, {args.threads} threads; {Path(base).name}, rank {args.rank} on every projection"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_adapter(Path(base), work / "adapter", args.rank)
        run_export(ExportConfig(model=base, adapter=str(work / "adapter"), out=str(work / "adapter.gguf")))
        engine = weightsmith.load(base).engine
        (work / "prompt.json").write_text(
            json.dumps(engine.chat_prompt([{"role": "user", "content": PROMPT}]))
        )
        argv = ["--work", str(work), "--base", base, "--new-tokens", str(args.new_tokens), "--runs", str(args.runs),
                "--threads", str(args.threads)]  # fmt: skip
        results = alternate_children(__file__, CONTENDERS, argv, args.rounds)
        logits = {who: np.load(work / f"{who}.npy") for who in CONTENDERS if (work / f"{who}.npy").is_file()}
    rate = {
        who: args.new_tokens / statistics.median([t for r in got for t in r["times"]])
        for who, got in results.items()
        if got
    }
    print("| contender | decode tok/s | vs llama.cpp (same setting) |")
    print("|---|---|---|")
    for who in rate:
        peer = "llama.cpp base" if who.endswith("base") else "llama.cpp adapter"
        ratio = f"{rate[who] / rate[peer]:.2f}x" if peer in rate and not who.startswith("llama") else "-"
        print(f"| {who} | {rate[who]:.1f} | {ratio} |")
    for engine in ("ours", "llama.cpp"):
        if f"{engine} base" in rate and f"{engine} adapter" in rate:
            print(
                f"{engine}: the adapter costs {1 - rate[f'{engine} adapter'] / rate[f'{engine} base']:.0%} of the base rate"
            )
    if len(logits) == len(CONTENDERS):
        gap = {
            kind: np.abs(logits[f"ours {kind}"] - logits[f"llama.cpp {kind}"]).max()
            for kind in ("base", "adapter")
        }
        moved = np.abs(logits["ours adapter"] - logits["ours base"]).max()
        print(
            f"logits after the prompt, largest |ours - llama.cpp|: {gap['base']:.3f} without the adapter, "
            f"{gap['adapter']:.3f} with it; the adapter moves ours by up to {moved:.2f}"
        )


if __name__ == "__main__":
    main()
