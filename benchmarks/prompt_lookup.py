"""Prompt lookup decoding: `generate --prompt-lookup` against plain greedy decoding, ours and peers'.

Answers that repeat their prompt (fix the spelling of a paragraph, turn it into a list, rename a
variable in code) are where drafting from the text itself pays: the proposals cost nothing and
the target checks several in one forward. Each contender greedily answers the same three such
chat prompts (the default model's chat template, token ids shared by all), `--max-tokens` new
tokens each, and is timed end to end (prefill included), in its own process, a warm-up then
`--runs` timed passes over the three prompts:

- ours: `llm.engine.generate` (the fused C decode step), and `generate --prompt-lookup 3`'s
  `speculative_generate` with `LookupDrafter(3, 3)` proposing `--k` tokens (steps with nothing
  found use the same C step);
- transformers (its own conversion of the GGUF file, fp32): `generate(do_sample=False)`, and
  with `prompt_lookup_num_tokens=k, max_matching_ngram_size=3` (n-grams of 3 down to 1);
- llama.cpp (llama-cpp-python, F32 export), where installed: plain, and with its
  `LlamaPromptLookupDecoding(num_pred_tokens=k, max_ngram_size=3)` draft (3 down to 1).

Printed: generated tokens per second (median pass), each lookup over its own plain decoding,
and each peer over ours; ours with lookup is checked to give ours' plain tokens.

    python benchmarks/prompt_lookup.py [--k 8] [--max-tokens 96] [--runs 3] [--threads 2]
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

PARAGRAPH = (
    "The Kettlebird kettle boils watter in under three minuts. Its temperture can be set from 40 to 100 "
    "degrees, and it keeps the water warm for up to an hour. To descale it, fill it with equal parts of "
    "water and white vinegar, let it stand for an hour, then rinse it twice."
)
CODE = (
    "def total(items):\n    s = 0\n    for it in items:\n        s = s + it.price * it.count\n    return s\n\n"
    "def average(items):\n    s = total(items)\n    return s / len(items)\n"
)
ASKS = [
    f"Rewrite this paragraph exactly, fixing only the spelling:\n\n{PARAGRAPH}",
    f"Turn this paragraph into a bulleted list, one sentence per bullet:\n\n{PARAGRAPH}",
    f"Rename the variable s to subtotal in this code and show the whole code:\n\n{CODE}",
]
CONTENDERS = ["ours", "ours+lookup", "transformers", "transformers+lookup", "llama.cpp", "llama.cpp+lookup"]


def run(
    who: str, work: Path, prompts: list[list[int]], n: int, k: int, runs: int
) -> tuple[list[float], list]:
    """(seconds per pass, the tokens of each prompt)."""
    if who.startswith("ours"):
        import weightsmith
        from weightsmith.sampling import SamplingParams
        from weightsmith.speculative import LookupDrafter, speculative_generate

        llm = weightsmith.load(str(work / "f32.gguf"))
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        step = llm.engine.decode_step()

        def answer(p: list[int]) -> list[int]:
            if who == "ours":
                return llm.engine.generate([p], params)[0].token_ids
            draft = LookupDrafter(max_n=3, min_n=3)
            return speculative_generate(llm.model, draft, p, max_tokens=n, k=k, target_step=step).tokens
    elif who.startswith("transformers"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
        lookup = {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": 3}
        extra = lookup if who.endswith("lookup") else {}

        def answer(p: list[int]) -> list[int]:
            ids = torch.tensor([p])
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
            return out[0, len(p) :].tolist()
    else:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = (
            LlamaPromptLookupDecoding(num_pred_tokens=k, max_ngram_size=3) if who.endswith("lookup") else None
        )
        llama = llama_cpp.Llama(str(work / "f32.gguf"), n_ctx=1024, n_threads=torch.get_num_threads(),
                                draft_model=draft, verbose=False)  # fmt: skip

        def answer(p: list[int]) -> list[int]:
            llama.reset()
            tokens = []
            for t in llama.generate(p, temp=0.0, top_k=1, reset=True):
                tokens.append(t)
                if len(tokens) == n:
                    break
            return tokens

    return timed_runs(lambda: [answer(p) for p in prompts], runs)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--k", type=int, default=8)
    a.add_argument("--max-tokens", type=int, default=96)
    a.add_argument("--runs", type=int, default=3)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--child", choices=CONTENDERS)
    a.add_argument("--work")
    args = a.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        work = Path(args.work)
        prompts = json.loads((work / "prompts.json").read_text())
        times, outs = run(args.child, work, prompts, args.max_tokens, args.k, args.runs)
        print(json.dumps({"times": times, "outs": outs}))
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
        engine = weightsmith.load(work / "f32.gguf").engine
        prompts = [engine.chat_prompt([{"role": "user", "content": ask}]) for ask in ASKS]
        (work / "prompts.json").write_text(json.dumps(prompts))
        argv = ["--work", str(work), "--k", str(args.k), "--max-tokens", str(args.max_tokens), "--runs",
                str(args.runs), "--threads", str(args.threads)]  # fmt: skip
        results = alternate_children(__file__, CONTENDERS, argv, 1)
    rate = {
        w: args.max_tokens * len(prompts) / statistics.median(r[0]["times"]) for w, r in results.items() if r
    }
    outs = {w: r[0]["outs"] for w, r in results.items() if r}
    if outs.get("ours+lookup") != outs.get("ours"):
        raise SystemExit("prompt lookup changed our greedy tokens")
    print("| contender | tokens/s | lookup / plain | vs ours (same kind) |")
    print("|---|---|---|---|")
    for who in CONTENDERS:
        if who not in rate:
            continue
        plain = who.removesuffix("+lookup")
        gain = f"{rate[who] / rate[plain]:.2f}x" if who.endswith("lookup") and plain in rate else ""
        mine = "ours+lookup" if who.endswith("lookup") else "ours"
        print(f"| {who} | {rate[who]:.1f} | {gain} | {rate[who] / rate[mine]:.2f}x |")


if __name__ == "__main__":
    main()
