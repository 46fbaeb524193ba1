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
