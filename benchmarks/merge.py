"""Model merging: `weightsmith merge --fork` against mergekit, same forks, same method, same output.

The base is the default model (SmolLM2-135M-Instruct) saved as an fp32 HF folder; the forks are
two full fine-tunes of it made by moving every tensor by seeded noise (1% of each tensor's
spread), saved the same way. Each contender merges them into a new fp32 HF folder:

- ours: `python -m weightsmith merge BASE --fork A --fork B --method M ... --out DIR`;
- mergekit: `mergekit.merge.run_merge` on the configuration that says the same thing (its
  `mergekit-yaml` does exactly this), with its defaults (lazy loading, one thread).

Each run is a fresh process (imports, reading, merging, writing: what a user waits for), one
warm-up per contender and method, then `--runs` timed runs, the contenders alternating. Before
any time counts, the two outputs are compared tensor by tensor: at most one value in 100,000
may differ by more than 1e-5 (TIES' ties at its trim boundary, see `compare`). Printed:
median seconds, the peak resident memory of the process (ru_maxrss), and mergekit's time and
memory over ours.

    python benchmarks/merge.py [--runs 3] [--methods ties,slerp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402

#: method -> (our flags, mergekit's top-level parameters, each model's parameters)
METHODS = {
    "ties": (["--method", "ties", "--weights", "1,0.6", "--density", "0.5"], {}, [{"weight": 1.0, "density": 0.5},
             {"weight": 0.6, "density": 0.5}]),
    "task_arithmetic": (["--method", "task_arithmetic", "--weights", "0.7,0.5"], {}, [{"weight": 0.7}, {"weight": 0.5}]),
    "slerp": (["--method", "slerp", "--t", "self_attn=0,0.5,1", "--t", "mlp=1,0.5,0", "--t", "0.5"],
              {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]},
                     {"value": 0.5}]}, [{}, {}]),
}  # fmt: skip


def make_inputs(root: Path) -> tuple[Path, Path, Path]:
    """The default model as an fp32 HF folder, and two noisy full forks of it."""
    import weightsmith
    from weightsmith.checkpoint.save import save_hf_dir

    llm = weightsmith.load("smollm2-135m-instruct", device="cpu", dtype="fp32")
    base = save_hf_dir(llm.model, llm.tokenizer, root / "base")
    forks = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            moved = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
            for p in llm.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01 * p.float().std())
        forks.append(save_hf_dir(llm.model, llm.tokenizer, root / f"fork{seed}"))
        with torch.no_grad():
            for n, p in llm.model.named_parameters():
                p.copy_(moved[n])
    return base, forks[0], forks[1]


def command(who: str, method: str, base: Path, a: Path, b: Path, out: Path, root: Path) -> list[str]:
    flags, shared, per_model = METHODS[method]
    if who == "ours":
        return [sys.executable, "-m", "weightsmith", "merge", str(base), "--fork", str(a), "--fork", str(b),
                *flags, "--out", str(out)]  # fmt: skip
    config = {"merge_method": method, "dtype": "float32", "parameters": shared,
              "models": [{"model": str(p), "parameters": m} for p, m in zip((a, b), per_model, strict=True)],
              "base_model": str(a if method == "slerp" else base)}  # fmt: skip
    spec = root / f"{method}.json"
    spec.write_text(json.dumps(config))
    script = (
        "import json, sys\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import MergeOptions, run_merge\n"
        "conf = MergeConfiguration.model_validate(json.load(open(sys.argv[1])))\n"
        "run_merge(conf, sys.argv[2], MergeOptions(quiet=True, write_model_card=False))\n"
    )
    return [sys.executable, "-c", script, str(spec), str(out)]


def timed(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of one child process; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return seconds, usage.ru_maxrss / 2**20


def compare(x: Path, y: Path) -> tuple[float, int, int]:
    """The largest |difference| of two outputs, how many entries differ (> 1e-5), and how many
    there are. TIES keeps the top `density` of each delta by magnitude; where entries tie at
    that boundary, which ones stay is an arbitrary choice (mergekit's argsort, our topk)."""
    from safetensors.torch import load_file

    ref, got = load_file(x / "model.safetensors"), load_file(y / "model.safetensors")
    if set(ref) != set(got):
        raise SystemExit(f"different tensors: {sorted(set(ref) ^ set(got))[:4]}")
    diffs = [(ref[k].float() - got[k].float()).abs() for k in ref]
    return (
        max(d.max().item() for d in diffs),
        sum(int((d > 1e-5).sum()) for d in diffs),
        sum(d.numel() for d in diffs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="ties,slerp")
    args = parser.parse_args()
    print(f"cpu: {cpu_description()}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, a, b = make_inputs(root)
        print(
            "| method | ours s | mergekit s | mergekit / ours | ours peak GiB | mergekit peak GiB | values that differ |"
        )
        print("|---|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            results: dict[str, list[tuple[float, float]]] = {"ours": [], "mergekit": []}
            for run in range(args.runs + 1):
                for who in ("ours", "mergekit") if run % 2 == 0 else ("mergekit", "ours"):
                    out = root / f"{who}-{method}-{run}"
                    took = timed(command(who, method, base, a, b, out, root))
                    if run == 0:
                        continue  # warm-up (page cache, imports)
                    results[who].append(took)
                if run == 0:
                    diff, differ, total = compare(root / f"mergekit-{method}-0", root / f"ours-{method}-0")
                    if differ > total * 1e-5:
                        raise SystemExit(f"{method}: {differ} of {total} values differ; no timing counts")
            ours_s = statistics.median(t for t, _ in results["ours"])
            mk_s = statistics.median(t for t, _ in results["mergekit"])
            ours_m = max(m for _, m in results["ours"])
            mk_m = max(m for _, m in results["mergekit"])
            print(f"| {method} | {ours_s:.2f} | {mk_s:.2f} | {mk_s / ours_s:.2f}x | {ours_m:.2f} | {mk_m:.2f} "
                  f"| {differ} of {total} (max {diff:.1e}) |")  # fmt: skip


if __name__ == "__main__":
    main()
