"""Embedding throughput: `LLM.embed` against transformers and llama.cpp, same texts, same model.

Each contender embeds the same `--texts` passages (the bundled Kettlebird answers, cut to at
most `--max-tokens` tokens: a retrieval corpus's chunks) with the default model
(SmolLM2-135M-Instruct) in fp32 on `--threads` threads, last-token pooling, unit vectors:

- ours: `weightsmith.load(F32 GGUF).embed(texts, pooling="last")` (texts sorted by length,
  right-padded batches of up to 1024 token positions, no attention mask);
- transformers: what sentence-transformers does with a decoder (Qwen3-Embedding's recipe),
  `AutoModel` on transformers' own conversion of the GGUF file, batches of `--batch` texts
  sorted by length, right padding with an attention mask, the last real token's state;
- llama.cpp (llama-cpp-python, where installed): `Llama(embedding=True).embed(texts,
  normalize=True)` on the same F32 file with `pooling_type` last, its own batching of
  several sequences in one unified KV cache (`--llama-batch`: n_ctx = n_batch = n_ubatch,
  1024 as our batches; each token's attention spans the whole batch, masked, so a larger
  one costs it more: 4096 took 4.0x our time, 2026-12-07).

Each runs in its own process (one warm-up, then `--runs` timed passes; processes alternate so
a noisy neighbour slows all alike); the vectors are checked to agree (cosine > 0.999) before
any time counts. Printed: median seconds, tokens per second, and each peer's time / ours.

    python benchmarks/embed.py [--threads 2] [--texts 128] [--max-tokens 96] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

NAMES = {
    "ours": "weightsmith LLM.embed",
    "transformers": "transformers AutoModel",
    "llama.cpp": "llama.cpp embed",
}


def corpus(tokenizer, n: int, max_tokens: int) -> list[list[int]]:
    """The first `n` Kettlebird answers as token ids (with the tokenizer's specials), cut."""
    from weightsmith.datasets import sample_path

    answers = [
        json.loads(line)["messages"][-1]["content"] for line in sample_path("kettlebird/train.jsonl").open()
    ]
    texts = (answers * (n // len(answers) + 1))[:n]
    return [tokenizer.encode(t)[:max_tokens] for t in texts]


def run_ours(f32: str, ids: list[list[int]], runs: int) -> tuple[list[float], torch.Tensor]:
    import weightsmith

    llm = weightsmith.load(f32)
    embed = lambda: torch.tensor(llm.embed(ids, pooling="last"))  # noqa: E731
    return timed(embed, runs)


def run_transformers(
    hf_dir: str, ids: list[list[int]], runs: int, batch: int
) -> tuple[list[float], torch.Tensor]:
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))

    def embed() -> torch.Tensor:
        out = torch.empty((len(ids), model.config.hidden_size))
        with torch.inference_mode():
            for start in range(0, len(order), batch):
                group = order[start : start + batch]
                width = max(len(ids[i]) for i in group)
                inputs = torch.zeros((len(group), width), dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for row, i in enumerate(group):
                    inputs[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                states = model(input_ids=inputs, attention_mask=mask).last_hidden_state
                last = mask.sum(1) - 1
                out[group] = F.normalize(states[torch.arange(len(group)), last], dim=-1)
        return out

    return timed(embed, runs)


def run_llama_cpp(f32: str, ids: list[list[int]], runs: int, window: int) -> tuple[list[float], torch.Tensor]:
    import llama_cpp

    llama = llama_cpp.Llama(model_path=f32, embedding=True, n_ctx=window, n_batch=window, n_ubatch=window,
                            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_threads=torch.get_num_threads(),
                            verbose=False)  # fmt: skip
    texts = [llama.detokenize(x).decode("utf-8", "replace") for x in ids]  # its API takes text
    return timed(lambda: torch.tensor(llama.embed(texts, normalize=True)), runs)


def timed(embed, runs: int) -> tuple[list[float], torch.Tensor]:
    vectors = embed()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        embed()
        times.append(time.perf_counter() - start)
    return times, vectors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, default=32, help="transformers' batch size")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--llama-batch", type=int, default=1024, help="llama.cpp's n_ctx = n_batch = n_ubatch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=list(NAMES), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        work = Path(args.work)
        ids = json.loads((work / "ids.json").read_text())
        if args.child == "ours":
            times, vectors = run_ours(str(work / "f32.gguf"), ids, args.runs)
        elif args.child == "transformers":
            times, vectors = run_transformers(str(work / "hf"), ids, args.runs, args.batch)
        else:
            times, vectors = run_llama_cpp(str(work / "f32.gguf"), ids, args.runs, args.llama_batch)
        torch.save(vectors, work / f"{args.child}.pt")
        print(json.dumps({"times": times}))
        return
    prepare_and_compare(args)


def prepare_and_compare(args: argparse.Namespace) -> None:
    from weightsmith.checkpoint.gguf_write import export_gguf
    from weightsmith.checkpoint.pull import resolve

    print(f"cpu: {cpu_description()}, {args.threads} threads")
    work = Path(tempfile.mkdtemp(prefix="weightsmith-bench-embed-"))
    source = resolve("smollm2-135m-instruct")
    export_gguf(source, work / "f32.gguf", "f32")
    convert_for_transformers(work / "f32.gguf", work / "hf")
    import weightsmith

    tokenizer = weightsmith.load(work / "f32.gguf").tokenizer
    ids = corpus(tokenizer, args.texts, args.max_tokens)
    (work / "ids.json").write_text(json.dumps(ids))
    tokens = sum(map(len, ids))
    base = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--threads", str(args.threads),
            "--runs", str(args.runs), "--batch", str(args.batch), "--llama-batch", str(args.llama_batch)]  # fmt: skip
    times: dict[str, list[float]] = {who: [] for who in NAMES}
    for r in range(args.rounds):
        for who in NAMES:
            done = subprocess.run([*base, "--child", who], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"round {r + 1} {who}: failed: {done.stderr.strip()[-300:]}")
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])["times"]
            times[who] += got
            print(f"round {r + 1} {who:12s}: {statistics.median(got):.3f} s")
    ours = torch.load(work / "ours.pt")
    for who in NAMES:
        if times[who] and who != "ours":
            cosine = (torch.load(work / f"{who}.pt") * ours).sum(-1)
            print(f"{who}: cosine with ours min {float(cosine.min()):.6f}")
            if float(cosine.min()) < 0.999:
                print(f"{who}: the vectors disagree with ours; its times are not comparable")
                times[who] = []
    print(f"\n{args.texts} texts, {tokens} tokens (at most {args.max_tokens} each), last-token pooling, fp32, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'':28s}{'median s':>10s}{'tokens/s':>10s}{'vs ours':>9s}")
    best = statistics.median(times["ours"]) if times["ours"] else float("nan")
    for who, label in NAMES.items():
        if times[who]:
            t = statistics.median(times[who])
            print(f"{label:28s}{t:10.3f}{tokens / t:10.0f}{t / best:8.2f}x")


def convert_for_transformers(gguf_file: Path, hf_dir: Path) -> None:
    import transformers

    transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(
        hf_dir
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                              dtype=torch.float32)  # fmt: skip
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(hf_dir)


if __name__ == "__main__":
    main()
