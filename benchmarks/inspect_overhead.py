"""What hook points cost: decode speed of the default model untouched, after a trace has come and
gone, and while hooked (a steering edit on), in one run.

"No cost when unused" means the first two columns are the same (the trace's class swap is undone,
so the decode layout and the fused C step are back); the third is the price of steering (every
forward on the PyTorch path, the C step set aside). Each contender is warmed up, the runs are
interleaved and medians taken (benchmarks/generate.py's method and timing helpers); read the
ratios, the machines are shared and noisy.

    python benchmarks/inspect_overhead.py [--threads 2] [--new-tokens 48] [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import interleaved_rates  # noqa: E402  (the same measurement as generate.py)


def contender(path, prompt_ids, prefill_ids, mode: str, stack: ExitStack):
    """(gen, prefill) for one model: mode "untouched", "after trace" or "hooked"."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.engine import Engine
    from weightsmith.generate import TokenGenerator
    from weightsmith.inspect import Add, HookState, hooked, run_hooked
    from weightsmith.sampling import SamplingParams

    ckpt = load_checkpoint(path)
    model = ckpt.model
    engine = Engine(model, ckpt.tokenizer)
    if mode == "after trace":
        run_hooked(model, torch.tensor([prompt_ids]), keep="all")  # every hook point, then undone
    if mode == "hooked":  # a steering edit that changes nothing, so every contender decodes the same
        zero = torch.zeros(model.config.hidden_size)
        stack.enter_context(hooked(model, HookState({"blocks.10.hook_resid_pre": [Add(zero)]})))

    def gen(n: int) -> None:
        params = [SamplingParams(max_tokens=n, temperature=0)]
        g = TokenGenerator(model, [prompt_ids], params, eos_token_ids=set(), decode=engine.decode_step())
        for _ in g:
            pass

    def prefill() -> None:
        with torch.inference_mode():
            model(torch.tensor([prefill_ids]), logits_at=torch.tensor([len(prefill_ids) - 1]))

    return gen, prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from machine import cpu_description

    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.quant import cpu_kernels

    path = resolve(args.model)
    tok = load_checkpoint(path).tokenizer
    prompt_ids = tok.encode("The history of open-weight language models began when")
    prefill_ids = tok.encode("Open models let people study their own machines. " * 40)[: args.prefill_tokens]
    print(f"CPU: {cpu_description()}")
    print(f"C decode kernels: {cpu_kernels.info()}")
    with ExitStack() as stack:
        modes = ("untouched", "after trace", "hooked")
        contenders = {m: contender(path, prompt_ids, prefill_ids, m, stack) for m in modes}
        results = interleaved_rates(contenders, args.new_tokens, len(prefill_ids), args.runs)
    print(
        f"model {args.model}, {args.threads} threads, batch 1, greedy, medians of {args.runs} interleaved runs"
    )
    print(f"{'':16}{'decode tok/s':>14}{'prefill tok/s':>15}")
    for name, r in results.items():
        print(f"{name:16}{r['decode_tok_s']:14.1f}{r['prefill_tok_s']:15.1f}")
    base = results["untouched"]
    for name in modes[1:]:
        r = results[name]
        print(
            f"ratio {name} / untouched: decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x, "
            f"prefill {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
