"""What every benchmark prints about the machine it ran on: the CPU model, the vector and
dot-product extensions that decide which kernels run, torch's kernel level and the load.

Figures measured on one CPU kind have not carried over to another, so a result without this
line cannot be compared with anything.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: The /proc/cpuinfo flags that pick our kernels (quant/cpu_*.c) and torch's.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_isa() -> str:
    """The extensions of ISA_FLAGS this CPU has, space-separated."""
    flags = _cpuinfo()[1]
    return " ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"


def cpu_description(torch_level: bool = True) -> str:
    """'MODEL (ARCH; ISA; torch kernels LEVEL), N CPUs, load L'."""
    parts = [platform.machine(), cpu_isa()]
    if torch_level:
        import torch

        parts.append(f"torch kernels {torch.backends.cpu.get_cpu_capability()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_model()} ({'; '.join(parts)}), {os.cpu_count()} CPUs, load {load:.1f}"


# ---- the read-bandwidth bound of a decode step ----------------------------------------------
#
# Decoding one token reads every weight once, so tokens/s can never beat (read bandwidth) /
# (weight bytes a token). `ReadSweep` measures that bound on this machine as it is now: it reads
# a buffer of the model's size with plain vector loads on `threads` threads, from memory that
# nothing else touches (2 MiB aligned, huge pages advised, as our decode layout holds weights).
# A buffer that fits the last-level cache is read from it, as the model's weights would be.

_SWEEP_C = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
typedef struct { const uint64_t *p; size_t n; uint64_t out; } part_t;
static void *run(void *arg) {
    part_t *t = arg;
    uint64_t a[8] = {0};
    size_t i = 0;
    for (; i + 8 <= t->n; i += 8)
        for (int j = 0; j < 8; j++) a[j] ^= t->p[i + j];
    for (; i < t->n; i++) a[0] ^= t->p[i];
    t->out = a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
    return NULL;
}
void *sweep_buffer(size_t bytes) {
    size_t huge = (size_t)2 << 20, size = (bytes + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, size);
    if (!p) return NULL;
    madvise(p, size, MADV_HUGEPAGE);
    memset(p, 1, size);
    return p;
}
uint64_t sweep(const uint64_t *p, size_t words, int times, int threads) {
    part_t parts[64];
    pthread_t ids[64];
    uint64_t x = 0;
    if (threads > 64) threads = 64;
    for (int r = 0; r < times; r++) {
        for (int t = 0; t < threads; t++) {
            parts[t].p = p + words / threads * t;
            parts[t].n = t == threads - 1 ? words - words / threads * t : words / threads;
            if (t && pthread_create(&ids[t], NULL, run, &parts[t])) return 0;
        }
        run(&parts[0]);
        x ^= parts[0].out;
        for (int t = 1; t < threads; t++) {
            pthread_join(ids[t], NULL);
            x ^= parts[t].out;
        }
    }
    return x;
}
"""


class ReadSweep:
    """Reads `nbytes` of memory `times` times over on `threads` threads (compiled with the
    system C compiler on first use). RuntimeError where no compiler can build it."""

    def __init__(self, nbytes: int, threads: int) -> None:
        import ctypes
        import shutil
        import subprocess
        import tempfile

        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (set CC)")
        folder = Path(tempfile.mkdtemp(prefix="ws-sweep-"))
        (folder / "sweep.c").write_text(_SWEEP_C)
        lib = folder / "sweep.so"
        cmd = [
            cc,
            "-O3",
            "-march=native",
            "-shared",
            "-fPIC",
            str(folder / "sweep.c"),
            "-o",
            str(lib),
            "-lpthread",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} could not build the read sweep: {proc.stderr.strip()[:200]}")
        self._lib = ctypes.CDLL(str(lib))
        shutil.rmtree(folder, ignore_errors=True)
        self._lib.sweep_buffer.argtypes = [ctypes.c_size_t]
        self._lib.sweep_buffer.restype = ctypes.c_void_p
        self._lib.sweep.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        self._lib.sweep.restype = ctypes.c_uint64
        self.nbytes, self.threads = nbytes, threads
        self._buffer = self._lib.sweep_buffer(nbytes)  # held for the process's life
        if not self._buffer:
            raise RuntimeError(f"cannot allocate {nbytes / 1e6:.0f} MB for the read sweep")

    def __call__(self, times: int = 1) -> None:
        self._lib.sweep(self._buffer, self.nbytes // 8, times, self.threads)


def timed_runs(work, runs: int) -> tuple[list[float], object]:
    """(seconds of each of `runs` calls of `work()` after a warm-up call, the warm-up's result)."""
    import time

    first = work()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return times, first


def alternate_children(
    script: str, contenders: list[str], argv: list[str], rounds: int
) -> dict[str, list[dict]]:
    """Run `python SCRIPT --child WHO *argv` for every contender, alternating over `rounds`; each
    child prints one JSON object as its last line. Returns {who: [that object, one per round]};
    a child that fails is reported on stdout and left out (a missing peer is not fatal)."""
    import json
    import subprocess
    import sys

    results: dict[str, list[dict]] = {who: [] for who in contenders}
    for _ in range(rounds):
        for who in contenders:
            done = subprocess.run(
                [sys.executable, script, "--child", who, *argv], capture_output=True, text=True
            )
            if done.returncode != 0 or not done.stdout.strip():
                print(f"{who}: failed or missing: {done.stderr.strip()[-300:]}")
                continue
            results[who].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results
