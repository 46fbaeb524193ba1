"""Device and dtype choice: CPU, CUDA or MPS, picked automatically and overridable.

Defaults follow the device: fp32 on CPU, bf16 on a GPU that supports it, fp16 on
other GPUs. Nothing here assumes CUDA, and nothing assumes its absence.
"""

from __future__ import annotations

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


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`name` ("fp32", "bf16", "fp16", "auto") or the device's default."""
    if name and name != "auto":
        if name not in DTYPES:
            raise UsageError(f"--dtype {name!r} is not supported; use one of fp32, bf16, fp16, auto")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


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
