"""Decoding with an unmerged adapter, LoRA and DoRA: weightsmith against transformers + peft.

A rank-16 adapter on every projection of the default model (random A and B, DoRA magnitudes moved
10% off their start), made and saved by PEFT, is loaded by both sides: weightsmith, kept apart
from the base as `serve --adapter` keeps it (`load_adapter` onto the loaded model; fp32, the fused
C decode step adding each adapted projection's delta), and folded into the weights as
`chat --adapter` and `weightsmith.load(..., adapter=DIR)` do ("merged"); transformers + peft
(`PeftModel.from_pretrained`, unmerged, fp32, `generate`). PEFT recomputes each DoRA layer's weight norm in
every forward unless `peft.tuners.lora.dora.ENABLE_DORA_CACHING` is set; the peer is measured both
ways. Each contender greedily answers one prompt with `--max-tokens` new tokens (prefill included),
in its own process, a warm-up then `--runs` timed answers; the processes alternate over
`--rounds`. Printed: tokens/s (medians), each peer over ours for the same adapter kind, and
whether the greedy tokens agree.

    python benchmarks/adapter_decode.py [--max-tokens 64] [--runs 3] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import alternate_children, cpu_description, timed_runs  # noqa: E402

CONTENDERS = ["ours lora", "peer lora", "ours dora", "ours dora merged", "peer dora", "peer dora cached"]
PROMPT = "Explain in three sentences how a kettle knows when the water boils."


def make_adapters(hf_dir: Path, work: Path) -> None:
    import peft
    import transformers

    for kind in ("lora", "dora"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=kind == "dora")
        model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.rand_like(p))
        model.save_pretrained(work / kind)


def run(who: str, work: Path, prompt: list[int], n: int, runs: int) -> tuple[list[float], list[int]]:
    kind = "dora" if "dora" in who else "lora"
    if who.startswith("ours"):
        import weightsmith
        from weightsmith.lora import load_adapter
        from weightsmith.sampling import SamplingParams

        if who.endswith("merged"):
            engine = weightsmith.load(str(work / "hf"), adapter=str(work / kind)).engine
        else:
            engine = weightsmith.load(str(work / "hf")).engine
            load_adapter(engine.model, work / kind)
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

        def answer() -> list[int]:
            return engine.generate([prompt], params)[0].token_ids
    else:
        import peft
        import transformers
        from peft.tuners.lora import dora

        dora.ENABLE_DORA_CACHING = who.endswith("cached")
        base = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, work / kind).eval()
        ids = torch.tensor([prompt])

        def answer() -> list[int]:
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, len(prompt) :].tolist()

    return timed_runs(answer, runs)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--max-tokens", type=int, default=64)
    a.add_argument("--runs", type=int, default=3)
    a.add_argument("--rounds", type=int, default=2)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--child", choices=CONTENDERS)
    a.add_argument("--work")
    args = a.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        work = Path(args.work)
        prompt = json.loads((work / "prompt.json").read_text())
        times, tokens = run(args.child, work, prompt, args.max_tokens, args.runs)
        print(json.dumps({"times": times, "tokens": tokens}))
        return
    from embed import convert_for_transformers

    import weightsmith
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.checkpoint.pull import resolve

    print(f"cpu: {cpu_description()}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_gguf(resolve("smollm2-135m-instruct"), work / "f32.gguf", "f32")
        convert_for_transformers(work / "f32.gguf", work / "hf")
        make_adapters(work / "hf", work)
        engine = weightsmith.load(work / "hf").engine
        (work / "prompt.json").write_text(
            json.dumps(engine.chat_prompt([{"role": "user", "content": PROMPT}]))
        )
        argv = ["--work", str(work), "--runs", str(args.runs), "--max-tokens", str(args.max_tokens), "--threads",
                str(args.threads)]  # fmt: skip
        results = alternate_children(__file__, CONTENDERS, argv, args.rounds)
    missing = [who for who, got in results.items() if len(got) < args.rounds]
    if missing:
        raise SystemExit(f"{', '.join(missing)} failed")
    times = {who: [t for r in got for t in r["times"]] for who, got in results.items()}
    tokens = {who: got[-1]["tokens"] for who, got in results.items()}
    rate = {who: args.max_tokens / statistics.median(t) for who, t in times.items()}
    print(
        f"rank-16 adapters on every projection of smollm2-135m-instruct (fp32), {args.max_tokens} new tokens"
    )
    print("| contender | tokens/s | vs ours (same kind) | same greedy tokens as ours |")
    print("|---|---|---|---|")
    for who in CONTENDERS:
        mine = "ours dora" if "dora" in who else "ours lora"
        same = sum(x == y for x, y in zip(tokens[who], tokens[mine], strict=True))
        print(f"| {who} | {rate[who]:.1f} | {rate[who] / rate[mine]:.2f}x | {same}/{args.max_tokens} |")


if __name__ == "__main__":
    main()
