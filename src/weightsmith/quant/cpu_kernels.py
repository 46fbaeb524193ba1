"""The C decode kernels (cpu_kernels.c, cpu_decode.c): built on first use, called through ctypes.

What it does: compiles them (and cpu_qdot.c, the int4/int8 kernels, and cpu_bf16.c, the bf16
ones, which pick their instruction set at run time: `select_isa` or ``WEIGHTSMITH_CPU_ISA``
forces one for both, `select_bf16_isa` for the bf16 ones alone) with the system C compiler
(``$CC`` or ``cc``, ``-O3 -march=native``, with OpenMP linked to the runtime torch already
loaded when the compiler supports it) into ``$WEIGHTSMITH_HOME/kernels/``, keyed by the
source, the compiler flags and the CPU, so it is built once per machine; loads it only after
checking it is the library it built (the folder is 0o700 and ours, and a sidecar holds the
library's sha256: a planted or changed file is rebuilt over, never loaded); and wraps its
matmuls (int4, int8, bf16) for float32 CPU inputs (the fused step is wrapped in
weightsmith/cpu_decode/fused.py).
Where no compiler is found or the build fails, `library()` returns None after one warning
and callers keep their PyTorch path.
``WEIGHTSMITH_CPU_KERNELS=0`` turns the kernels off.

Not here: deciding when the kernels are worth calling (weightsmith.quant.weight_only,
weightsmith.cpu_decode).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from weightsmith.errors import ConfigError
from weightsmith.files import write_text_atomic
from weightsmith.quant import iq_tables

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_kernels.c", HERE / "cpu_decode.c", HERE / "cpu_kquant.c")
#: Built apart, without -march=native: it holds a copy of its kernels per x86 instruction set
#: and picks one at run time (CPUID), so a forced AVX2 path is exactly AVX2 code.
QDOT = HERE / "cpu_qdot.c"
#: The bf16 weight matmuls, built and dispatched the same way.
BF16 = HERE / "cpu_bf16.c"
#: The GGUF block kernels (GGMLLinear), built and dispatched the same way.
GGML = HERE / "cpu_ggml.c"
_H = (
    "cpu_kernels.h",
    "cpu_x86_isas.h",
    "cpu_x86_common.h",
    "cpu_qdot_x86.h",
    "cpu_qtile_x86.h",
    "cpu_ggml_x86.h",
    "cpu_iquant.h",
)
HEADERS = tuple(HERE / name for name in _H)
#: Forces the int4/int8 kernels' instruction set (scalar, avx2, avxvnni, avx512vnni).
ISA_ENV = "WEIGHTSMITH_CPU_ISA"
X86 = platform.machine().lower() in ("x86_64", "amd64")
_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get("WEIGHTSMITH_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _torch_openmp() -> Path | None:
    """The OpenMP runtime torch ships (linking to it keeps one thread pool in the process)."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*")) + sorted(lib.glob("libiomp5*")) + sorted(lib.glob("libomp*"))
    return found[0] if found else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecar(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _ours(path: Path) -> bool:
    """Owned by this user and not writable by the group or others (never a symlink)."""
    st = path.lstat()
    owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return owner_ok and not stat.S_ISLNK(st.st_mode) and not st.st_mode & 0o022


def _private_dir(out_dir: Path) -> bool:
    """Create the kernel folder 0o700; refuse (warn, return False) one another user can write,
    since anything loaded from it runs in this process."""
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _ours(out_dir) and out_dir.is_dir():
            return True
    except OSError as exc:
        log.warning("cannot create the kernel folder %s (%s): decoding uses the PyTorch path", out_dir, exc)
        return False
    log.warning(
        "the kernel folder %s is writable by other users or not yours: its libraries are not loaded "
        "and decoding uses the PyTorch path; remove it, or chmod 700 it if it is yours",
        out_dir,
    )
    return False


def _verified(target: Path) -> bool:
    """Whether `target` is a library this package built: its sidecar holds its sha256 and both
    are ours. Anything else (planted, truncated, changed) is rebuilt over, never loaded."""
    try:
        if not (_ours(target) and _ours(_sidecar(target))):
            return False
        return _sidecar(target).read_text(encoding="ascii").strip() == _sha256(target)
    except (OSError, UnicodeDecodeError):
        return False


def _jobs(flags: list[str]) -> list[tuple[list[str], Path]]:
    """Each source with its compile flags, longest compile first: cpu_qdot.c, cpu_bf16.c and
    cpu_ggml.c without -march=native (x86: tuned for this CPU only, see QDOT)."""
    plain = [f for f in flags if f != "-shared"]
    qflags = [("-mtune=native" if f == "-march=native" and X86 else f) for f in plain]
    return [(qflags, QDOT), *((plain, s) for s in SOURCES), (qflags, GGML), (qflags, BF16)]


def _compile(flags: list[str], tmp: Path, out: Path) -> subprocess.CompletedProcess:
    """All sources to objects at once (a first build takes a core-count fraction of the serial
    time), then the library from them with `flags`."""
    jobs = _jobs(flags)
    objects = [str(tmp / f"{source.stem}.o") for _, source in jobs]
    cmds = [[*f, "-c", str(source), "-o", o] for (f, source), o in zip(jobs, objects, strict=True)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    done = [subprocess.CompletedProcess(c, 1, *p.communicate()) for c, p in zip(cmds, procs, strict=True)]
    failed = next((d for d, p in zip(done, procs, strict=True) if p.returncode != 0), None)
    link = [*flags, *objects, "-lm", "-o", str(out)]
    return failed or subprocess.run(link, capture_output=True, text=True, check=False)


def _build(out_dir: Path) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.warning("no C compiler found (set CC): int4/int8 decoding uses the slower PyTorch path")
        return None
    base = [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]
    omp = _torch_openmp()
    attempts = [base + ["-fopenmp"] + ([str(omp), f"-Wl,-rpath,{omp.parent}"] if omp else [])]
    attempts.append(base)  # no OpenMP: single-threaded, still far better than dequantizing
    source = b"".join(p.read_bytes() for p in (*SOURCES, QDOT, BF16, GGML, *HEADERS))
    if not _private_dir(out_dir):
        return None
    for flags in attempts:
        # The whole recipe (each source's flags, the link's), so that a changed build is rebuilt.
        recipe = repr([(f, s.name) for f, s in _jobs(flags)] + [flags]).encode()
        key = hashlib.sha256(source + recipe + _cpu_signature().encode()).hexdigest()[:16]
        target = out_dir / f"cpu_kernels-{key}.so"
        if _verified(target):
            return target
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            partial = Path(tmp) / target.name
            try:
                proc = _compile(flags, Path(tmp), partial)
            except OSError as exc:  # $CC names no runnable program
                log.warning(
                    "could not run the C compiler %s (%s): decoding uses the slower PyTorch path",
                    compiler,
                    exc,
                )
                return None
            if proc.returncode == 0:
                digest = _sha256(partial)
                os.replace(partial, target)  # atomic: a concurrent build writes the same bytes
                write_text_atomic(_sidecar(target), digest + "\n")  # what _verified checks
                return target
            log.debug("kernel build failed with %s: %s", " ".join(flags), proc.stderr.strip())
    log.warning("could not build the int4/int8 CPU kernels with %s (run with -v for the compiler's message): "
                "decoding uses the slower PyTorch path", compiler)  # fmt: skip
    return None


_P, _I64, _INT, _STR = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p
#: The library's functions: name -> (argument types, result type).
_SIGNATURES = {
    "ws_int4_matmul": ([_P, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _P], _INT),
    "ws_int8_matmul": ([_P, _I64, _I64, _I64, _P, _P, _P, _P], _INT), "ws_kernels_isa": ([], _STR),
    "ws_qdot_isa": ([], _STR), "ws_qdot_select": ([_STR], _INT),
    "ws_qdot_supported": ([], _INT), "ws_int4_dequantize": ([_P, _P, _P, _I64, _I64, _I64, _P], None),
    "ws_int4_tiled_dequantize": ([_P, _I64, _I64, _I64, _P], None),
    "ws_int8_tiled_dequantize": ([_P, _I64, _I64, _P, _P], None),
    "ws_tiled_matmuls": ([_P, _I64, _I64, _INT, _P, _I64, _P, _I64, _P, _P], _INT),
    "ws_bf16_matmul": ([_P, _I64, _I64, _I64, _P, _I64, _I64, _P, _P], _INT),
    "ws_bf16_select": ([_STR], _INT), "ws_bf16_supported": ([], _INT),
    "ws_bf16_isa": ([], _STR), "ws_ggml_matmul": ([_P, _I64, _I64, _I64, _I64, _P, _P, _P], _INT),
    "ws_ggml_dequantize": ([_I64, _P, _I64, _I64, _P], _INT), "ws_ggml_row_bytes": ([_I64, _I64], _I64),
    "ws_decode": ([_P, _I64, _P, _P, _P, _P, _P, _P], _INT), "ws_set_threads": ([_INT], None),
    "ws_iq_set_tables": ([_P, _I64], _INT),
}  # fmt: skip


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None where unavailable."""
    if not enabled():
        return None
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        try:
            from weightsmith.files import weightsmith_home

            path = _build(weightsmith_home() / "kernels")
            if path is not None:
                lib = ctypes.CDLL(str(path))
                for name, (args, result) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = args, result
                _select_from_env(lib)
                iq_tables.install(lib)
                log.info(
                    "CPU kernels: %s, int4/int8 %s, bf16 %s, OpenMP %s", lib.ws_kernels_isa().decode(),
                    lib.ws_qdot_isa().decode(), lib.ws_bf16_isa().decode(), bool(lib.ws_kernels_openmp()),
                )  # fmt: skip
        except OSError as exc:
            log.warning("could not load the int4/int8 CPU kernels (%s): decoding uses the PyTorch path", exc)
            lib = None
        _state["lib"] = lib
        return lib


def info() -> dict[str, object]:
    """What `library()` found: for benchmarks and `--json` outputs."""
    lib = library()
    if lib is None:
        return {"available": False}
    return {
        "available": True, "isa": lib.ws_kernels_isa().decode(), "int_isa": lib.ws_qdot_isa().decode(),
        "int_isas": supported_isas(lib), "bf16_isa": lib.ws_bf16_isa().decode(),
        "bf16_isas": supported_bf16_isas(lib), "openmp": bool(lib.ws_kernels_openmp()),
    }  # fmt: skip


#: The int4/int8 kernels' instruction sets, in the C library's bit order.
ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")


def supported_isas(lib: ctypes.CDLL) -> list[str]:
    """The int4/int8 instruction sets this CPU runs, slowest first."""
    return [name for i, name in enumerate(ISAS) if lib.ws_qdot_supported() >> i & 1]


#: The bf16 kernels' instruction sets, in the C library's bit order; and the one each int4/int8
#: choice gives them (avx512vnni: the best AVX-512 one, None).
BF16_ISAS = ("scalar", "avx2", "avx512", "avx512bf16")
BF16_FOR_ISA = {"scalar": "scalar", "avx2": "avx2", "avxvnni": "avx2", "avx512vnni": None}


def supported_bf16_isas(lib: ctypes.CDLL) -> list[str]:
    """The bf16 instruction sets this CPU runs, slowest first."""
    return [name for i, name in enumerate(BF16_ISAS) if lib.ws_bf16_supported() >> i & 1]


def select_isa(lib: ctypes.CDLL, name: str | None) -> None:
    """Make the int4/int8 kernels use instruction set `name` (None: the best this CPU has), and
    the bf16 kernels the one of the same width (avx2, avxvnni: AVX2 converted loads), for every
    caller in the process; ConfigError if this CPU lacks it."""
    if lib.ws_qdot_select((name or "").encode()) != 0:
        raise ConfigError(
            f"{ISA_ENV}={name!r}: this CPU runs the int4/int8 kernels with "
            f"{', '.join(supported_isas(lib))} only; use one of those, or unset it"
        )
    select_bf16_isa(lib, BF16_FOR_ISA.get(name or ""))


def select_bf16_isa(lib: ctypes.CDLL, name: str | None) -> None:
    """Make the bf16 kernels alone use instruction set `name` (None: the best this CPU has);
    ConfigError if this CPU lacks it."""
    if lib.ws_bf16_select((name or "").encode()) != 0:
        raise ConfigError(
            f"bf16 kernels: this CPU runs them with {', '.join(supported_bf16_isas(lib))} only, not {name!r}"
        )


def _select_from_env(lib: ctypes.CDLL) -> None:
    name = os.environ.get(ISA_ENV, "").strip().lower()
    if name:
        try:
            select_isa(lib, name)
        except ConfigError as exc:
            log.warning("%s: the best one is used instead", exc)


def use_threads(lib: ctypes.CDLL) -> None:
    """Run the kernels on as many threads as torch uses (checked per call: cheap)."""
    n = torch.get_num_threads()
    if getattr(lib, "ws_thread_count", None) != n:
        lib.ws_set_threads(n)
        lib.ws_thread_count = n


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError(
            f"the int4/int8 CPU kernel failed (status {status}: out of memory, a group size not 32, 64 or 128, "
            "or a GGUF block type or row length it does not take)"
        )


def int4_matmul(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., K) float32 CPU -> (..., N). qweight uint8 (N, K/2) as Int4Linear holds it (codes
    2j, 2j + 1 in byte j); scales/zeros fp16 (N, K/G). x is quantized to int8 per block of 32."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    # Contiguous copies held in locals: they must outlive the C call that reads them.
    flat, qweight = x.reshape(-1, k).contiguous(), qweight.contiguous()
    scales, zeros = (t.to(torch.float16).contiguous() for t in (scales, zeros))
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(flat.shape[0], n, dtype=torch.float32)
    use_threads(lib)
    _check(lib.ws_int4_matmul(
        flat.data_ptr(), flat.shape[0], k, n, qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        group_size, _ptr(bias), y.data_ptr(),
    ))  # fmt: skip
    return y.view(*x.shape[:-1], n)


def int8_tiled_dequantize(
    lib: ctypes.CDLL, tiles: torch.Tensor, n: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float32 (n, k), scales (n,)) of int8 16-row tiles."""
    tiles = tiles.contiguous()
    q, scales = torch.empty(n, k, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    use_threads(lib)
    lib.ws_int8_tiled_dequantize(tiles.data_ptr(), n, k, q.data_ptr(), scales.data_ptr())
    return q, scales


#: The tile layouts' kinds in the C kernels (cpu_kernels.h) by (bits, GGUF type or None for our
#: int4 / int8 tiles); the most projections `tiled_matmuls` takes at once (WS_MAX_PROJS).
TILE_KINDS = {(4, None): 5, (4, 2): 6, (4, 6): 12, (4, 7): 13, (4, 12): 7, (4, 13): 14, (4, 14): 11,
              (4, 10): 20, (4, 11): 19, (4, 20): 17, (4, 23): 18, (8, None): 9, (8, 8): 10}  # fmt: skip
MAX_PROJS = 3


def tiled_matmul(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    tiles: torch.Tensor,
    n: int,
    bits: int,
    group_size: int | None,
    bias: torch.Tensor | None,
    ggml: int | None = None,
) -> torch.Tensor:
    """x (..., K) float32 CPU -> (..., n) with the weight as int4 (`bits` 4, groups of
    `group_size`) or int8 16-row tiles (quant/tiles.py; `ggml`: the GGUF type of a Q4_0, Q5_*,
    Q4_K or Q6_K (bits 4, groups of 32) or Q8_0 matrix's tiles); x is quantized per block of 32."""
    return tiled_matmuls(lib, x, [(tiles, n, bias)], bits, group_size, ggml)[0]


def tiled_matmuls(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weights: list[tuple[torch.Tensor, int, torch.Tensor | None]],
    bits: int,
    group_size: int | None,
    ggml: int | None = None,
) -> list[torch.Tensor]:
    """`tiled_matmul` of one input with up to MAX_PROJS weights (tiles, n, bias), their tiles
    split among the threads in one parallel loop, as the fused decode step runs q/k/v, gate/up."""
    if not 1 <= len(weights) <= MAX_PROJS:
        raise ValueError(f"tiled_matmuls takes 1 to {MAX_PROJS} weights, not {len(weights)}")
    k = x.shape[-1]
    flat = x.reshape(-1, k).contiguous()
    kept = [(t.contiguous(), n, None if b is None else b.contiguous()) for t, n, b in weights]
    ys = [torch.empty(flat.shape[0], n, dtype=torch.float32) for _, n, _ in kept]
    arrays = lambda values: (ctypes.c_void_p * len(values))(*values)  # noqa: E731
    use_threads(lib)
    _check(lib.ws_tiled_matmuls(
        flat.data_ptr(), flat.shape[0], k, len(kept), (ctypes.c_int64 * len(kept))(*(n for _, n, _ in kept)),
        TILE_KINDS[bits, ggml], arrays([t.data_ptr() for t, _, _ in kept]), group_size or 0,
        arrays([_ptr(b) for _, _, b in kept]), arrays([y.data_ptr() for y in ys]),
    ))  # fmt: skip
    return [y.view(*x.shape[:-1], y.shape[1]) for y in ys]


def int4_tiled_dequantize(
    lib: ctypes.CDLL, tiles: torch.Tensor, n: int, k: int, group_size: int
) -> torch.Tensor:
    """The float32 weight (n, k) of int4 16-row tiles."""
    tiles = tiles.contiguous()
    w = torch.empty(n, k, dtype=torch.float32)
    use_threads(lib)
    lib.ws_int4_tiled_dequantize(tiles.data_ptr(), n, k, group_size, w.data_ptr())
    return w


def int8_matmul(
    lib: ctypes.CDLL, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) float32 CPU -> (..., N) with q int8 (N, K), scales fp32 (N,); x is quantized to
    int8 per block of 32."""
    n, k = q.shape
    flat, q, scales = (t.contiguous() for t in (x.reshape(-1, k), q, scales))  # kept alive past the call
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(flat.shape[0], n, dtype=torch.float32)
    use_threads(lib)
    _check(lib.ws_int8_matmul(
        flat.data_ptr(), flat.shape[0], k, n, q.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr()
    ))  # fmt: skip
    return y.view(*x.shape[:-1], n)


def bf16_matmul(
    lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) float32 CPU -> (..., N) = bf16(x) @ w.T (+ bias), with w bf16 (N, K) in either
    layout a model holds it in (rows contiguous, or columns: a transposed (K, N) buffer)."""
    n, k = w.shape
    cols = w.stride(1) != 1
    if cols and w.stride(0) != 1:
        w = w.contiguous()
        cols = False
    flat = x.reshape(-1, k).contiguous()  # kept alive past the call
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(flat.shape[0], n, dtype=torch.float32)
    use_threads(lib)
    _check(lib.ws_bf16_matmul(
        flat.data_ptr(), flat.shape[0], k, n, w.data_ptr(), w.stride(1 if cols else 0), int(cols), _ptr(bias),
        y.data_ptr(),
    ))  # fmt: skip
    return y.view(*x.shape[:-1], n)


def int4_dequantize(
    lib: ctypes.CDLL, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The float32 weight (N, K) of Int4Linear's qweight (N, K/2), scales and zeros fp16 (N, K/G)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    qweight = qweight.contiguous()  # kept alive past the call, as are:
    scales, zeros = (t.to(torch.float16).contiguous() for t in (scales, zeros))
    w = torch.empty(n, k, dtype=torch.float32)
    use_threads(lib)
    lib.ws_int4_dequantize(
        qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n, k, group_size, w.data_ptr()
    )
    return w


def ggml_matmul(
    lib: ctypes.CDLL, x: torch.Tensor, qtype: int, blocks: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) float32 CPU -> (..., N) with `blocks` uint8 (N, row bytes): each row the GGUF
    blocks of ggml type `qtype` (GGMLLinear's weight); x is quantized to int8 per block of 32."""
    n, k = blocks.shape[0], x.shape[-1]
    flat, blocks = x.reshape(-1, k).contiguous(), blocks.contiguous()  # kept alive past the call
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(flat.shape[0], n, dtype=torch.float32)
    use_threads(lib)
    _check(lib.ws_ggml_matmul(
        flat.data_ptr(), flat.shape[0], k, n, qtype, blocks.data_ptr(), _ptr(bias), y.data_ptr()
    ))  # fmt: skip
    return y.view(*x.shape[:-1], n)


def ggml_dequantize(lib: ctypes.CDLL, qtype: int, blocks: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 weight (N, K) of GGUF blocks (N, row bytes) of ggml type `qtype`: bit for bit
    gguf-py's `gguf.quants.dequantize`."""
    blocks = blocks.contiguous()
    w = torch.empty(blocks.shape[0], k, dtype=torch.float32)
    use_threads(lib)
    _check(lib.ws_ggml_dequantize(qtype, blocks.data_ptr(), blocks.shape[0], k, w.data_ptr()))
    return w
