"""Device and dtype choice: CPU, CUDA or MPS, picked automatically and overridable.

Defaults follow the device: fp32 on CPU, bf16 on a GPU that supports it, fp16 on
other GPUs; for adapter training, bf16 also on a CPU with AMX (`train_dtype`). Nothing
here assumes CUDA, and nothing assumes its absence.
"""

from __future__ import annotations

import functools

import torch

from weightsmith.errors import UsageError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(name: str | None = None) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:1", "mps") or the best available device."""
    if name and name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise UsageError(
                f"--device {name!r} is not a device name ({e}); use cpu, cuda, cuda:N or mps"
            ) from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str | None, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """`name` ("fp32", "bf16", "fp16", "auto") or the device's default."""
    if name and name != "auto":
        if name not in DTYPES:
            raise UsageError(f"{flag} {name!r} is not supported; use one of fp32, bf16, fp16, auto")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@functools.cache  # the CPU's features do not change; asked once per training micro-batch
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512-BF16's dot products
    (vdpbf16ps), which torch's oneDNN matmuls use, with or without AMX-BF16 tiles. Training picks
    bf16 there by default: a LoRA step of the default model took 0.53x the fp32 step's time on a
    Xeon with AMX, and 0.59-0.72x on an AMD EPYC Zen 4 (AVX512-BF16, no AMX). Elsewhere (AVX2)
    bf16 is emulated, slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or non-x86 build
        return False


def train_dtype(name: str, device: torch.device, *, full: bool, autocast: bool) -> torch.dtype:
    """The base weights' dtype for training: `name`, or for "auto" the device's inference default,
    except fp32 for full fine-tuning (its weights are what the optimizer updates) and, on a CPU,
    bf16 for adapter training under bf16 autocast (what `use_bf16` picks where the CPU multiplies
    bf16 in hardware): the frozen weights are then not cast again at every matmul."""
    if name == "auto" and full:
        return torch.float32
    if name == "auto" and device.type == "cpu" and autocast:
        return torch.bfloat16
    return pick_dtype(name, device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed CPU tensor memory in the process for reuse (glibc only; once per process).

    A training step allocates and frees the same few-MB activation buffers again and
    again. glibc serves blocks that large with fresh mmap()s and returns them on free,
    so every step pays page faults on every buffer: a 6 MB elementwise op took ~5 ms
    inside a step against ~0.5 ms on reused memory. Raising the mmap and trim
    thresholds (to glibc's 32 MiB maximum, and 1 GiB) makes malloc reuse them instead.
    Returns whether the setting took effect.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, for one, has no mallopt)
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    )
    return _allocator_tuned
