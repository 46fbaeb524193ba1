"""GPU checks and figures in one run: correctness on CUDA, and speed against transformers.

Made for a GPU machine that cannot download anything and cannot take the default
model's 94 MB GGUF file: `--kit DIR` holds the default model's config and tokenizer
(`python benchmarks/gpu_check.py --make-kit DIR` writes it here), and the weights are
random with that exact shape (speed does not depend on the values; greedy
equality checks compare two implementations on the same weights). Sections:

1. parity: our logits vs transformers' on CUDA (fp32 with TF32 off, and bf16);
2. generate: decode (batch 1 and 16) and 512-token prefill tokens/s, ours vs
   transformers eager (dynamic cache) and static cache, bf16;
3. eval: multiple-choice scoring requests/s, our shared-prefix scorer vs full-sequence
   scoring as lm-eval's HF backend does it, and the largest log-likelihood difference;
4. scheduler: 16 requests through the continuous-batching scheduler equal solo runs
   (fp32, greedy);
5. finetune: LoRA steps on CUDA in bf16, loss before and after;
6. dist (gpu_speed.py): FSDP2 full fine-tuning and DDP LoRA through `--nproc-per-node`
   on NCCL, losses against one plain process;
7. packed (gpu_speed.py): LoRA steps on packed rows, attention one example at a time with the
   causal kernel against SDPA over the row with the block-diagonal mask;
8. grpo: LoRA GRPO on the device in bf16 (two updates a sampling, GSPO, batch scaling): it
   runs and its loss stays finite, with the metrics of each step;
9. profile (gpu_profile.py): torch.profiler over the LoRA step (ours, peft, ours compiled)
   and batch-1 decode (eager, graphs, compiled + graphs): device busy time against wall
   time, kernels per step, the top ops; `--trace-dir DIR` keeps gzipped Chrome traces.

Each section reports its own failure and the run goes on. Medians of --runs after a
warm-up; read ratios, not lone figures.

    python benchmarks/gpu_check.py --kit gpu_kit [--device cuda] [--runs 5] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

KIT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def make_kit(out: Path) -> None:
    """The default model's config and tokenizer, without weights."""
    import shutil
    import tempfile

    from weightsmith import load
    from weightsmith.checkpoint.save import save_hf_dir

    llm = load("smollm2-135m-instruct", dtype="fp32", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = llm.checkpoint
        save_hf_dir(ckpt.model, ckpt.tokenizer, Path(tmp) / "m", generation_config=ckpt.generation_config)
        out.mkdir(parents=True, exist_ok=True)
        for name in KIT_FILES:
            if (Path(tmp) / "m" / name).exists():
                shutil.copy(Path(tmp) / "m" / name, out / name)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


#: SmolLM2-1.7B's shape (24 layers, hidden 2048, MLP 8192, 32 heads, no GQA) on the kit's vocabulary.
LARGE = dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
             num_key_value_heads=32, head_dim=64)  # fmt: skip


def random_checkpoint(kit: Path, out: Path, shape: dict | None = None, device: str = "cpu") -> Path:
    """Random weights of the kit's config (with `shape` overrides), saved as an HF directory."""
    import shutil

    import transformers

    if (out / "config.json").exists():
        return out
    cfg = transformers.AutoConfig.from_pretrained(str(kit))
    for key, value in (shape or {}).items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if shape else torch.float32  # a large shape is only measured in bf16
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    del model
    for name in KIT_FILES[1:]:
        if (kit / name).exists():
            shutil.copy(kit / name, out / name)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn, device: str, runs: int) -> float:
    fn()
    return statistics.median(timed(fn, device) for _ in range(runs))


def hf_model(path: Path, dtype, device: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def section_parity(path: Path, device: str, runs: int) -> dict:
    from weightsmith import load

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    vocab = hf_model(path, torch.float32, "cpu").config.vocab_size
    ids = torch.randint(0, vocab, (2, 96), generator=torch.Generator().manual_seed(1)).to(device)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = load(str(path), device=device, dtype=name).model
        ref = hf_model(path, dtype, device)
        with torch.inference_mode():
            a, b = ours(ids).float(), ref(ids).logits.float()
        out[name] = {
            "max_abs_diff": (a - b).abs().max().item(),
            "logit_scale": b.abs().max().item(),
            "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        }
        del ours, ref
    return out


def section_generate(path: Path, device: str, runs: int, new_tokens: int = 128) -> dict:
    from weightsmith import load
    from weightsmith.generate import TokenGenerator
    from weightsmith.sampling import SamplingParams

    ours = load(str(path), device=device, dtype="bf16").model
    ref = hf_model(path, torch.bfloat16, device)
    vocab = ours.config.vocab_size
    prompt = [(1000 + i) % vocab for i in range(32)]
    long_prompt = [(1000 + i) % vocab for i in range(512)]
    out = {}
    for batch in (1, 16):

        def ours_gen(n: int, batch=batch) -> None:
            g = TokenGenerator(
                ours,
                [prompt] * batch,
                [SamplingParams(max_tokens=n, temperature=0)] * batch,
                eos_token_ids=set(),
            )
            for _ in g:
                pass

        def hf_gen(n: int, cache: str | None, batch=batch) -> None:
            ids = torch.tensor([prompt] * batch, device=device)
            extra = {"cache_implementation": cache} if cache else {}
            with torch.inference_mode():
                ref.generate(
                    ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra
                )

        contenders = {"weightsmith": ours_gen, "transformers eager": lambda n, b=batch: hf_gen(n, None, b)}
        if batch == 1:
            contenders["transformers static"] = lambda n: hf_gen(n, "static", 1)
        for name, gen in contenders.items():
            try:
                full = median_time(lambda g=gen: g(new_tokens + 1), device, runs)
                one = median_time(lambda g=gen: g(1), device, runs)
                out[f"decode b{batch} {name}"] = batch * new_tokens / (full - one)
            except Exception as exc:  # noqa: BLE001 - a peer's failure is a finding, not the end
                out[f"decode b{batch} {name}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    with torch.inference_mode():
        ids = torch.tensor([long_prompt], device=device)
        last = torch.tensor([511], device=device)
        out["prefill512 weightsmith"] = 512 / median_time(lambda: ours(ids, logits_at=last), device, runs)
        out["prefill512 transformers"] = 512 / median_time(lambda: ref(ids, logits_to_keep=1), device, runs)
    for a, b in [("decode b1 weightsmith", "decode b1 transformers eager"),
                 ("decode b1 weightsmith", "decode b1 transformers static"),
                 ("decode b16 weightsmith", "decode b16 transformers eager"),
                 ("prefill512 weightsmith", "prefill512 transformers")]:  # fmt: skip
        if isinstance(out.get(a), float) and isinstance(out.get(b), float):
            out[f"ratio {a} / {b}"] = out[a] / out[b]
    return out


def full_sequence_scores(model, requests, batch_size: int, device: str) -> list[float]:
    """lm-eval's HF way: each (context + continuation) in full, right-padded, all logits."""
    out = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        seqs = [list(c) + list(x) for c, x in chunk]
        t = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (t - len(s)) for s in seqs], device=device)
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
        for row, (c, x) in enumerate(chunk):
            pos = torch.arange(len(c) - 1, len(c) + len(x) - 1, device=device)
            out.append(logp[row, pos, torch.tensor(x, device=device)].sum().item())
    return out


def section_eval(path: Path, device: str, runs: int) -> dict:
    from weightsmith import load
    from weightsmith.eval.scorer import Scorer, TokenRequest

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(2)

    def tokens(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    reqs = []
    for _ in range(100):
        ctx = tokens(120, 200)
        reqs.extend((ctx, tokens(2, 7)) for _ in range(4))
    out = {"requests": len(reqs)}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        llm = load(str(path), device=device, dtype=dtype_name)
        scorer = Scorer(llm.model, llm.tokenizer, batch_size=64)
        ref = hf_model(path, dtype, device)
        token_reqs = [TokenRequest(tuple(c), tuple(x)) for c, x in reqs]
        ours_t = median_time(lambda s=scorer, r=token_reqs: s.score(r), device, runs)
        peer_t = median_time(lambda m=ref: full_sequence_scores(m, reqs, 16, device), device, runs)
        ours_ll = [r[0] for r in scorer.score(token_reqs)]
        peer_ll = full_sequence_scores(ref, reqs, 16, device)
        out[dtype_name] = {
            "weightsmith req/s": len(reqs) / ours_t,
            "full-sequence HF req/s": len(reqs) / peer_t,
            "ratio": peer_t / ours_t,
            "max |dll|": max(abs(a - b) for a, b in zip(ours_ll, peer_ll, strict=True)),
        }
        del llm, scorer, ref
    return out


def section_scheduler(path: Path, device: str, runs: int) -> dict:
    from weightsmith import load
    from weightsmith.sampling import SamplingParams
    from weightsmith.serve.scheduler import Request, Scheduler

    torch.backends.cuda.matmul.allow_tf32 = False
    llm = load(str(path), device=device, dtype="fp32")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    vocab = llm.model.config.vocab_size
    prompts = [[(500 + i + j) % vocab for j in range(8 + 5 * i)] for i in range(16)]
    solo = [llm.engine.generate([p], params)[0].token_ids for p in prompts]
    sched = Scheduler(llm.model, llm.tokenizer, llm.engine.eos_token_ids, max_batch=16, max_len=256)
    got: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        sched.submit(Request([p], [params], emit=lambda ev, i=i: got[i].extend(ev.tokens)))
    steps = 0
    start = time.perf_counter()
    while not sched.idle:
        sched.step()
        steps += 1
    seconds = time.perf_counter() - start
    same = sum(a == b for a, b in zip(got, solo, strict=True))
    return {"requests": len(prompts), "equal_to_solo": same, "steps": steps, "tokens/s": 16 * 24 / seconds}


def section_finetune(path: Path, device: str, runs: int) -> dict:
    import tempfile

    from weightsmith.config import config_from_dict
    from weightsmith.datasets import sample_path
    from weightsmith.train.sft import FinetuneConfig, run_finetune

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(
            FinetuneConfig,
            {"model": str(path), "data": str(sample_path("kettlebird/train.jsonl")), "out": f"{tmp}/run",
             "method": "lora", "max_seq_len": 160, "device": device, "dtype": "bf16",
             "train": {"max_steps": 20, "batch_size": 8, "lr": 2e-3, "eval_every": 0, "save_every": 0}},
        )  # fmt: skip
        result = run_finetune(cfg)
    return {k: result.get(k) for k in ("initial_val_loss", "seconds")} | {"metrics": result.get("metrics")}


def section_grpo(path: Path, device: str, runs: int) -> dict:
    """LoRA GRPO on the device in bf16 (sampling through the engine, each sampling serving two
    updates, GSPO's ratio, batch-scaled advantages): it runs, the loss stays finite, and the
    metrics of its steps; a reward that varies within a group even on random weights (the share
    of vowels: random weights never end an answer early, so a length reward would not)."""
    import math
    import tempfile

    from weightsmith.config import config_from_dict
    from weightsmith.train.grpo import GrpoConfig, run_grpo
    from weightsmith.train.rewards import Reward

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        rows = [
            {"prompt": [{"role": "user", "content": f"Say something short, number {i}."}]} for i in range(16)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = config_from_dict(
            GrpoConfig,
            {"model": str(path), "data": str(data), "out": f"{tmp}/run", "method": "lora", "max_seq_len": 128,
             "device": device, "dtype": "bf16", "reward": [], "num_generations": 8, "max_completion_len": 32,
             "num_iterations": 2, "importance_sampling": "sequence", "loss": "grpo", "scale_rewards": "batch",
             "valid_fraction": 0.0, "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "eval_every": 0,
                                               "save_every": 0}},
        )  # fmt: skip
        vowels = Reward("vowels", lambda texts, rows, lengths: [sum(c in "aeiou" for c in t) / max(len(t), 1)
                                                                 for t in texts])  # fmt: skip
        start = time.perf_counter()
        result = run_grpo(cfg, rewards=[vowels])
        seconds = time.perf_counter() - start
        steps = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "reward", "entropy", "clip_low", "clip_high", "completion_len")
    table = [{k: round(m[k], 4) for k in keys if k in m} for m in steps if "loss" in m]
    return {"seconds": round(seconds, 1), "finite": all(math.isfinite(m["loss"]) for m in table),
            "steps": table, "final": {k: result["metrics"].get(k) for k in keys}}  # fmt: skip


def section_quant(path: Path, device: str, runs: int, new_tokens: int = 128) -> dict:
    """int8 / int4 (g32) weight-only layers on the device: each layer's output against
    F.linear on its dequantized weight, logits against bf16, and decode speed."""
    import torch.nn.functional as F

    from weightsmith import load
    from weightsmith.generate import TokenGenerator
    from weightsmith.quant.weight_only import Int4Linear, Int8Linear, quantize_model
    from weightsmith.sampling import SamplingParams

    base = load(str(path), device=device, dtype="bf16").model
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.inference_mode():
        ref_logits = base(ids).float()
    prompt = [(1000 + i) % vocab for i in range(32)]
    out: dict = {}

    def decode_rate(model, batch: int) -> float:
        def gen(n: int) -> None:
            g = TokenGenerator(model, [prompt] * batch, [SamplingParams(max_tokens=n, temperature=0)] * batch,
                               eos_token_ids=set())  # fmt: skip
            for _ in g:
                pass

        full = median_time(lambda: gen(new_tokens + 1), device, runs)
        one = median_time(lambda: gen(1), device, runs)
        return batch * new_tokens / (full - one)

    out["decode b1 bf16"] = decode_rate(base, 1)
    out["decode b16 bf16"] = decode_rate(base, 16)
    for bits, group in ((8, None), (4, 32)):
        name = f"int{bits}" + (f" g{group}" if group else "")
        model = load(str(path), device=device, dtype="bf16").model
        quantize_model(model, bits, group)
        layer = next(m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
        x = torch.randn(5, layer.in_features, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            y = layer(x).float()
            y_ref = F.linear(x.float(), layer.dequantize(torch.float32).to(device))
            logits = model(ids).float()
        out[name] = {
            "layer rel err vs dequantized": ((y - y_ref).norm() / y_ref.norm()).item(),
            "logits cosine vs bf16": F.cosine_similarity(
                logits.flatten(), ref_logits.flatten(), dim=0
            ).item(),
            "argmax agree vs bf16": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "decode b1 tok/s": decode_rate(model, 1),
            "decode b16 tok/s": decode_rate(model, 16),
        }
        del model
    return out


SECTIONS = {
    "parity": section_parity,
    "generate": section_generate,
    "eval": section_eval,
    "scheduler": section_scheduler,
    "finetune": section_finetune,
    "quant": section_quant,
    "grpo": section_grpo,
}
#: Seconds a fixed section needs at least (it is skipped with less left on the clock).
NEEDS = {"grpo": 40}
#: Sections that take the time left (gpu_speed.py; profile: gpu_profile.py), by name.
TIMED = ("decode", "server", "lora", "packed", "exact", "dist", "profile")
DEFAULT = "decode@large,server@large,lora@large,exact@small,decode@small,dist@small,packed@large,grpo@small,profile@large"


def run_section(spec: str, paths: dict, args, clock) -> dict:
    import gpu_speed

    name, _, shape = spec.partition("@")
    path = paths[shape or "small"]
    if name == "profile":
        import gpu_profile

        gpu_profile.TRACE_DIR = args.trace_dir
        return gpu_profile.section_profile(path, clock, args.runs)
    if name in TIMED:
        small = {"batch": 2, "seq": 64} if args.dry and name in ("lora", "packed") else {}  # CPU steps
        return getattr(gpu_speed, f"section_{name}")(path, clock, args.runs, **small)
    if clock.left() < NEEDS.get(name, 0):
        return {"skipped": f"{clock.left():.0f} s left, it needs about {NEEDS[name]}"}
    return SECTIONS[name](path, args.device, args.runs)


def main() -> None:
    import gpu_speed  # beside this file, so on the path when run as a script

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, help="folder with the model's config and tokenizer")
    parser.add_argument("--make-kit", type=Path, help="write the kit for the default model here and exit")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sections", default=DEFAULT, help=f"NAME@SHAPE,... (shapes: small, large; names: "
                        f"{', '.join([*TIMED, *SECTIONS])})")  # fmt: skip
    parser.add_argument(
        "--budget", type=float, default=330, help="seconds; later contenders are skipped past it"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trace-dir", type=Path, help="the profile section's gzipped Chrome traces go here")
    parser.add_argument(
        "--dry", action="store_true", help="a quick run on the CPU with a small 'large' shape"
    )
    args = parser.parse_args()
    if args.dry:
        args.device = "cpu"
        LARGE.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=64)  # fmt: skip
    if args.make_kit:
        make_kit(args.make_kit)
        return
    clock = gpu_speed.Clock(args.budget)
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    paths = {"small": random_checkpoint(args.kit, Path("/tmp/gpu-check-model"))}
    results: dict = {}
    for spec in args.sections.split(","):
        start = time.perf_counter()
        try:
            if spec.endswith("@large") and "large" not in paths:
                paths["large"] = random_checkpoint(args.kit, Path("/tmp/gpu-check-large"), LARGE, args.device)
            results[spec] = run_section(spec, paths, args, clock)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next section
            results[spec] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        print(f"== {spec} ({time.perf_counter() - start:.0f} s, {clock.left():.0f} s left)")
        print(json.dumps(results[spec], indent=1, default=str), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None


if __name__ == "__main__":
    main()
