"""Importance matrices: llama.cpp's `imatrix` files, read, written and computed.

An importance matrix holds, for every matrix of the model's layers, the sum of the squares of
each input column over calibration text, and how many tokens went in (per expert for stacked
experts). Their ratio, the mean square of each input, is how much an error in that column of
the weight costs; `export --imatrix` weighs the quantizer's fits by it (quant/kquants.py), as
`llama-quantize --imatrix` does.

Files are llama.cpp's GGUF imatrix format (what `llama-imatrix` writes): `general.type` =
"imatrix", `imatrix.datasets` / `imatrix.chunk_count` / `imatrix.chunk_size`, and per matrix a
`<tensor>.in_sum2` F32 tensor (n_mat, K) and a `<tensor>.counts` F32 tensor (n_mat, 1) named
by the model's GGUF tensor names. The legacy `.dat` format of older llama.cpp is read too.

`collect` computes one with our model: forward hooks on every projection of the layers (routed
experts each on its own row), over text chunks of `chunk_size` tokens whose first token is BOS
where the vocabulary adds one, as `llama-imatrix -f TEXT -c N` does. Fused checkpoints (Phi-3's
attn_qkv, ffn_up) get the sums of the input their parts share.

Not here: quantizing with it (quant/kquants.py), the command (commands/imatrix.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from weightsmith.checkpoint.gguf import open_gguf
from weightsmith.checkpoint.gguf_experts import stacked_name
from weightsmith.checkpoint.gguf_write import ARCHITECTURES, gguf_tensor_name, write_out
from weightsmith.errors import CheckpointError
from weightsmith.files import atomic_file
from weightsmith.models.fused import fused_name

#: Largest legacy entry count / name length / value count read from an untrusted file.
_LEGACY_LIMITS = (1 << 20, 4096, 1 << 26)


@dataclass
class Imatrix:
    """Sums of squared inputs and token counts by GGUF tensor name."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # (n_mat, K) float64
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # (n_mat,) float64
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: str = ""  # the file it was read from

    def importance(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Mean squares for tensor `name` of `shape` (rows last), shaped to broadcast over it:
        (K,) for a matrix, (n_expert, 1, K) for stacked experts; None when it has no entry.
        A matrix (or expert) that saw no tokens gets ones, as llama-quantize gives it."""
        if name not in self.sums:
            return None
        sums, counts = self.sums[name], self.counts[name]
        n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if sums.shape != (n_mat, shape[-1]):
            raise CheckpointError(
                f"{self.path or 'imatrix'}: entry {name} has {sums.shape[0]} x {sums.shape[1]} values but the "
                f"tensor is {' x '.join(map(str, shape))}; the imatrix was computed for another model"
            )
        seen = counts > 0
        mean = np.where(seen[:, None], sums / np.where(seen, counts, 1)[:, None], 1.0)
        return mean[0] if len(shape) == 2 else mean[:, None, :]


# ---------------------------------------------------------------------------------------------
# Files


def read_imatrix(path: str | Path) -> Imatrix:
    """An imatrix file, GGUF or legacy; CheckpointError naming what is wrong with a bad one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such imatrix file; compute one with `weightsmith imatrix`")
    with open(path, "rb") as f:
        magic = f.read(4)
    found = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    found.path = str(path)
    return found


def _read_gguf(path: Path) -> Imatrix:
    reader = open_gguf(path)  # every way the file can be broken is one CheckpointError
    found: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        base, _, kind = tensor.name.rpartition(".")
        if kind not in ("in_sum2", "counts"):
            continue
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise CheckpointError(
                f"{path}: imatrix tensor {tensor.name} is {tensor.tensor_type.name}, not F32"
            )
        found.setdefault(base, {})[kind] = np.asarray(tensor.data, dtype=np.float64)
    if not found:
        raise CheckpointError(f"{path}: holds no imatrix entries (<tensor>.in_sum2 / .counts)")
    out = Imatrix()
    for base, parts in sorted(found.items()):
        if set(parts) != {"in_sum2", "counts"}:
            raise CheckpointError(
                f"{path}: imatrix entry {base} lacks its {'counts' if 'in_sum2' in parts else 'in_sum2'}"
            )
        n_mat = parts["counts"].size
        if n_mat == 0 or parts["in_sum2"].size % n_mat:
            raise CheckpointError(
                f"{path}: imatrix entry {base}: {parts['in_sum2'].size} values for {n_mat} counts"
            )
        out.sums[base] = parts["in_sum2"].reshape(n_mat, -1)
        out.counts[base] = parts["counts"].reshape(n_mat)
        _check_values(path, base, out.sums[base], out.counts[base])
    try:  # descriptive only: a malformed value is an error of the file, not a crash
        datasets = reader.fields.get("imatrix.datasets")
        out.datasets = [str(x) for x in datasets.contents()] if datasets is not None else []
        for key in ("chunk_count", "chunk_size"):
            value = reader.fields.get(f"imatrix.{key}")
            setattr(out, key, int(value.contents()) if value is not None else 0)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed imatrix metadata ({e})") from None
    return out


def _read_legacy(path: Path) -> Imatrix:
    """The old binary layout: int32 entries, then per entry int32 name length, name, int32 calls,
    int32 values, float32 values (mean * calls); then optionally int32 chunks, a dataset name."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CheckpointError(
                f"{path}: imatrix file ends early at byte {pos}; it is truncated or not an imatrix"
            )
        pos += size
        return struct.unpack_from(fmt, data, pos - size)

    max_entries, max_name, max_values = _LEGACY_LIMITS
    (n_entries,) = take("<i")
    if not 0 < n_entries <= max_entries:
        raise CheckpointError(f"{path}: not an imatrix file (GGUF or llama.cpp's legacy .dat)")
    out = Imatrix()
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= max_name:
            raise CheckpointError(f"{path}: bad imatrix entry name length {length} at byte {pos - 4}")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")
        calls, n_values = take("<ii")
        if not 0 < n_values <= max_values:
            raise CheckpointError(f"{path}: imatrix entry {name}: bad value count {n_values}")
        start = pos
        take(f"<{4 * n_values}x")  # bounds-checked skip over the values
        values = np.frombuffer(data, dtype="<f4", count=n_values, offset=start).astype(np.float64)
        # Stored as mean * calls; keep (sums, counts) whose ratio is the mean (counts = calls).
        out.sums[name] = values.reshape(1, -1)
        out.counts[name] = np.array([max(calls, 0)], dtype=np.float64)
        if calls <= 0:  # no calls: llama-quantize takes the values as they are
            out.counts[name][0] = 1.0
        _check_values(path, name, out.sums[name], out.counts[name])
    if pos + 4 <= len(data):
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= max_name and pos + length <= len(data):
                out.datasets = [bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")]
    return out


def _check_values(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
    if not (np.isfinite(sums).all() and np.isfinite(counts).all()) or (sums < 0).any() or (counts < 0).any():
        raise CheckpointError(f"{path}: imatrix entry {name} holds negative, NaN or infinite values")


def write_imatrix(path: str | Path, imatrix: Imatrix) -> Path:
    """The GGUF imatrix file at `path` (replaced atomically)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="")
        writer.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files have none
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", list(imatrix.datasets))
        writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
        writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
        for name in sorted(imatrix.sums):
            sums, counts = imatrix.sums[name], imatrix.counts[name]
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(sums, dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.ascontiguousarray(counts.reshape(-1, 1), dtype=np.float32))
        write_out(writer)
    return path


# ---------------------------------------------------------------------------------------------
# Computing one


def _entry(cfg: Any, arch: str, module_name: str) -> tuple[str, int, int, bool] | None:
    """(GGUF tensor name, expert index, experts, whether it is a fused group's first part) of a
    layer projection, or None."""
    hf_name, expert, experts, first = f"{module_name}.weight", 0, 1, True
    fused = fused_name(cfg, hf_name)
    if fused is not None:
        hf_name, first = fused[0], fused[1] == 0
    stacked = stacked_name(hf_name)
    if stacked is not None:
        (hf_name, expert), experts = stacked, cfg.num_local_experts
    name = gguf_tensor_name(hf_name, arch)
    return (name, expert, experts, first) if name is not None and name.startswith("blk.") else None


def _projections(model: torch.nn.Module, cfg: Any) -> dict[str, tuple[str, int, int, bool]]:
    arch = ARCHITECTURES.get(cfg.model_type, "llama")
    out = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if module_name.startswith("model.layers.") and weight is not None and weight.dim() == 2:
            entry = _entry(cfg, arch, module_name)
            if entry is not None:
                out[module_name] = entry
    return out


def targets(model: torch.nn.Module, cfg: Any) -> dict[str, tuple[str, int, int]]:
    """{module name: (GGUF tensor name, expert index, experts)} of every projection to hook:
    the first part of a fused group stands for the group (the parts share their input)."""
    return {m: (name, e, n) for m, (name, e, n, first) in _projections(model, cfg).items() if first}


def module_importance(imatrix: Imatrix, model: torch.nn.Module, cfg: Any) -> dict[str, torch.Tensor]:
    """Each layer projection's importance row (K,) by module name, where `imatrix` has its
    matrix (`weightsmith quantize --imatrix`); the parts of a fused group share the group's."""
    out = {}
    for module_name, (name, expert, experts, _) in _projections(model, cfg).items():
        k = model.get_submodule(module_name).weight.shape[1]
        shape = (experts, 1, k) if experts > 1 else (1, k)
        rows = imatrix.importance(name, shape)
        if rows is not None:
            out[module_name] = torch.from_numpy(rows.reshape(experts, k)[expert].astype("float32"))
    return out


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    cfg: Any,
    chunks: Iterable[list[int]],
    *,
    on_chunk: Callable[[int], None] | None = None,
) -> Imatrix:
    """Run every chunk (a list of token ids) through `model` and sum each hooked projection's
    squared inputs; `on_chunk(done)` after each."""
    hooked = targets(model, cfg)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(module_name: str) -> Callable[..., None]:
        name, expert, experts = hooked[module_name]

        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if name not in sums:
                sums[name] = torch.zeros(experts, x.shape[-1], dtype=torch.float64)
                counts[name] = torch.zeros(experts, dtype=torch.float64)
            # a chunk's sum on the model's device in fp32 (MPS has no fp64), the chunks' in fp64
            sums[name][expert] += x.float().square().sum(0).to("cpu", torch.float64)
            counts[name][expert] += x.shape[0]

        return record

    handles = [modules[m].register_forward_pre_hook(hook(m)) for m in hooked]
    done = 0
    try:
        device = next(model.parameters()).device
        forward = getattr(model, "hidden_states", model)  # the LM head is not hooked: skip it
        for chunk in chunks:
            forward(torch.tensor([chunk], device=device))
            done += 1
            if on_chunk is not None:
                on_chunk(done)
    finally:
        for handle in handles:
            handle.remove()
    return Imatrix(
        sums={k: v.numpy() for k, v in sums.items()},
        counts={k: v.numpy() for k, v in counts.items()},
        chunk_count=done,
    )


def text_chunks(
    ids: list[int], chunk_size: int, bos: int | None, limit: int | None = None
) -> list[list[int]]:
    """`llama-imatrix`'s chunks: whole runs of `chunk_size` tokens of the tokenized text, the
    first of each replaced by BOS where the vocabulary adds one; at most `limit`."""
    n = len(ids) // chunk_size if limit is None else min(limit, len(ids) // chunk_size)
    out = []
    for i in range(n):
        chunk = list(ids[i * chunk_size : (i + 1) * chunk_size])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out
