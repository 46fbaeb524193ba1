"""Where the time goes on the GPU: torch.profiler over the LoRA step and the decode step.

The speed sections (gpu_speed.py) say how fast; this says why, in the same device run, so a
session with a few minutes of GPU time can act on the answer without another start-up:

- lora: one LoRA r=16 training step on the shape of gpu_speed's lora section (batch 8 x 512,
  bf16, AdamW), ours, transformers + peft, and ours with --train.compile;
- decode: batch-1 greedy decode, ours eager, replayed from CUDA graphs, and compiled then
  captured.

For each: the step's wall time under the profiler, the device's busy time (kernel time summed)
and their ratio (well under 1 means the host cannot feed the GPU: launch overhead or syncs),
kernels launched per step, and the ops with the most device time (on a CPU dry run: the most
CPU time). With `gpu_check.py --trace-dir DIR`, each profile is also written there as a
gzipped Chrome trace (chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import gzip
import re
import shutil
import time
from pathlib import Path

import torch
from gpu_speed import DEVICE, Clock, _lora_ours, _lora_peft, _ours, sync  # beside this file

#: Where gzipped Chrome traces go (gpu_check.py --trace-dir), or None.
TRACE_DIR: Path | None = None
#: Ops listed per profile.
TOP = 12


def _profile(name: str, step, steps: int, unit: str = "step", per_call: int = 1) -> dict:
    """Profile `steps` calls of `step` (already warm) and sum up what the device did, per
    `unit` (`per_call` of them in each call: a decode call's tokens, say)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - start
    units = steps * per_call
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:TOP]
    out = {
        f"wall ms/{unit} (profiled)": 1e3 * wall / units,
        f"device busy ms/{unit}": 1e3 * busy / units,
        "busy / wall": busy / wall if cuda else None,
        f"kernels/{unit}": len(kernels) / units,
        f"top ops (ms/{unit}, calls/{unit}, op)": [
            f"{getattr(e, key) / 1e3 / units:8.3f} {e.count / units:7.1f}  {e.key[:80]}" for e in rows
        ],
    }
    if TRACE_DIR is not None:
        TRACE_DIR.mkdir(parents=True, exist_ok=True)
        raw = TRACE_DIR / f"{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return out


def section_profile(path: Path, clock: Clock, runs: int, batch: int = 8, seq: int = 512) -> dict:
    """The LoRA step (ours, peft, ours compiled) and batch-1 decode (eager, graphs, compiled +
    graphs), profiled; each skipped once under 40 s are left."""
    import gc

    out: dict = {}
    lora = {
        "lora ours": lambda: _lora_ours(path, batch, seq),
        "lora peft": lambda: _lora_peft(path, batch, seq),
        "lora ours --train.compile": lambda: _lora_ours(path, batch, seq, compile_layers=True),
    }
    for name, make in lora.items():
        if clock.left() < 40:
            out[name] = f"skipped: {clock.left():.0f} s left"
            continue
        try:
            step, _ = make()
            for _ in range(2):  # warm-up (and the compile, for the compiled one)
                step()
            out[name] = _profile(name, step, 2)
        except Exception as exc:  # noqa: BLE001 - a failure is a finding; go on
            out[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            step = None
            gc.collect()
            torch.cuda.empty_cache() if DEVICE == "cuda" else None
    if clock.left() >= 40:
        out.update(_profile_decode(path, clock))
    return out


def _profile_decode(path: Path, clock: Clock, tokens: int = 32) -> dict:
    from weightsmith import load
    from weightsmith.cuda_graphs import GraphDecode
    from weightsmith.generate import decode_one_token

    model = load(str(path), device=DEVICE, dtype="bf16").model
    prompt = [(1000 + i) % model.config.vocab_size for i in range(32)]
    out: dict = {}
    decoders = {
        "decode b1 eager": lambda: decode_one_token,
        "decode b1 graphs": lambda: GraphDecode(model, decode_one_token, compile=False),
        "decode b1 compiled+graphs": lambda: GraphDecode(model, decode_one_token, compile=True),
    }
    for name, make in decoders.items():
        if clock.left() < 30:
            out[name] = f"skipped: {clock.left():.0f} s left"
            continue
        try:
            gen = _ours(model, 1, prompt, make())
            gen(tokens)  # warm-up: captures (and compiles) here
            out[name] = _profile(name, lambda g=gen: g(tokens), 1, "token", tokens)
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out
