"""A LoRA DPO step needs no more than 1.15x the peak memory of an SFT LoRA step on the same
batch (prompt + chosen and prompt + rejected rows, loss on the answers): the reference is the
same model with its adapters off (no second copy), run under no_grad before the policy
forward, and the LM head runs only at answer tokens, chunked. (DPO holds each pair's prompt
once, so it needs less than SFT on those rows; the limit is what the issue asks.)

How it is measured, and why: each variant runs in a fresh Python process (this file run as a
script), which builds the same random model (a 32k vocabulary, so a head over every position,
a second copy of the weights or full (tokens, vocab) logits would all show) and the same batch
of 4 pairs x 256 tokens. Then it hands freed heap memory back to the OS (`malloc_trim`), so
what is resident is what is live, resets the kernel's peak-RSS mark (`/proc/self/clear_refs`),
runs one forward + backward, and reports the peak RSS (`VmHWM`) minus the RSS before. RSS
counts what the allocator really touched, in any part of torch or glibc, where a tensor-level
tracer (torch.profiler's memory events) misses allocator caching and buffers it does not
attribute; a fresh process per variant keeps one variant's freed-but-kept memory from hiding
another's peak, and the trim keeps the set-up's freed memory from hiding the step's (the
training loop tells glibc to keep freed memory, so a plain `ru_maxrss` difference can read
near zero). Where /proc is not Linux's, it falls back to `ru_maxrss`. A third variant, DPO
with a deep copy of the model as its reference, shows the measurement can tell the
difference the limit guards against.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

VOCAB, HIDDEN, PAIRS, PROMPT, ANSWER = 32000, 256, 4, 96, 160


def _grow(variant: str) -> int:
    """Peak RSS growth (KiB) of one training step of `variant` in this process."""
    import copy
    import gc

    import torch

    from weightsmith.device import tune_cpu_allocator
    from weightsmith.lora import LoraConfig, apply_lora
    from weightsmith.models import CausalLM, ModelConfig
    from weightsmith.train.data import Row, collate
    from weightsmith.train.dpo import PreferenceObjective
    from weightsmith.train.losses import PREFERENCE_LOSSES, sft_loss
    from weightsmith.train.preference_data import PairExample, PairSource

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tune_cpu_allocator()  # as the training loop does
    cfg = ModelConfig.from_hf(
        {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        }
    )
    model = CausalLM(cfg)
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    ids = torch.randint(VOCAB, (PAIRS, PROMPT + 2 * ANSWER)).tolist()
    pairs = [PairExample(r[:PROMPT], r[PROMPT : PROMPT + ANSWER], r[PROMPT + ANSWER :]) for r in ids]
    batch = PairSource(pairs, pad_id=0).batch(range(PAIRS))  # a row a pair: prompt, chosen, rejected
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    rows = [
        Row(p.prompt + a, [False] * PROMPT + [True] * ANSWER, [PROMPT + ANSWER])
        for p, a in zip(pairs * 2, answers, strict=True)
    ]
    sft_batch = collate(rows, pad_id=0)  # prompt + chosen, prompt + rejected: 8 rows of 256 tokens
    gc.collect()
    before = _start_peak()
    if variant == "sft":  # cross-entropy on the same answer tokens
        loss, n = sft_loss(model, sft_batch)
        (loss / n).backward()
    else:
        reference = copy.deepcopy(model).requires_grad_(False) if variant == "dpo-copy" else None
        loss, n, _ = PreferenceObjective(PREFERENCE_LOSSES["dpo"], 0.1, reference=reference)(model, batch)
        (loss / n).backward()
    return _peak() - before


def _status_kib(key: str) -> int | None:
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_peak() -> int:
    """Free what is free, reset the peak-RSS mark, and return the RSS now (KiB)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak() -> int:
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(variant: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, variant], check=True, capture_output=True, text=True, env=env, timeout=300
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_kib"]


def test_lora_dpo_step_peaks_within_115_percent_of_an_sft_step():
    sft, dpo, copied = (_measure(v) for v in ("sft", "dpo", "dpo-copy"))
    assert sft > 50 * 1024, f"the SFT step grew only {sft} KiB: too small to compare"
    assert dpo <= 1.15 * sft, f"DPO step grew {dpo / 1024:.0f} MiB vs SFT {sft / 1024:.0f} MiB"
    assert copied > 1.15 * sft, f"a second model did not show: {copied / 1024:.0f} vs {sft / 1024:.0f} MiB"


if __name__ == "__main__":
    print(json.dumps({"growth_kib": _grow(sys.argv[1])}))
