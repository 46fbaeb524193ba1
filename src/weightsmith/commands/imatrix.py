"""The `imatrix` command: an importance matrix from calibration text, for `export --imatrix`.

It runs the model (in fp32, HF layout, on `--device`) over the text cut into chunks as `llama-imatrix
-f TEXT -c CHUNK` does and writes llama.cpp's GGUF imatrix file, which `export --imatrix` and
llama.cpp's `llama-quantize --imatrix` both read. The format and the hooks are in
`weightsmith.checkpoint.imatrix`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.lineage import write_lineage

#: Largest calibration text read (the chunks it yields are what costs time, not the bytes).
MAX_TEXT_BYTES = 64 << 20


@dataclass(kw_only=True)
class ImatrixConfig:
    """Compute an importance matrix (llama.cpp's imatrix GGUF file) from calibration text."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    text: str | None = opt(None, "calibration text, a UTF-8 plain-text file (llama-imatrix -f)")
    data: str | None = opt(
        None,
        "calibration examples instead: a finetune JSONL file (text, or messages rendered with the chat template)",
    )
    out: str = opt("imatrix.gguf", "output file (.gguf)")
    chunk_size: int = opt(512, "tokens a chunk, the first replaced by BOS (llama-imatrix -c)")
    chunks: int | None = opt(None, "use at most this many chunks (default: every whole chunk)")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto (the model runs in fp32)")
    overwrite: bool = opt(False, "replace an existing output file")
    allow_pickle: bool = opt(False, "allow pickle weights (.bin/.pt), loaded with weights_only=True")
    json: bool = opt(False, "print the result as JSON")


def _check(cfg: ImatrixConfig) -> tuple[Path, Path]:
    if (cfg.text is None) == (cfg.data is None):
        raise UsageError("pass the calibration as --text FILE.txt or --data FILE.jsonl (one of them)")
    out, text = Path(cfg.out), Path(cfg.text or cfg.data or "")
    if out.suffix.lower() != ".gguf":
        raise UsageError(f"--out {out}: an imatrix file name must end in .gguf")
    if out.exists() and not cfg.overwrite:
        raise UsageError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")
    if cfg.chunk_size < 16:
        raise UsageError(f"--chunk-size {cfg.chunk_size}: must be at least 16 tokens")
    if cfg.chunks is not None and cfg.chunks < 1:
        raise UsageError(f"--chunks {cfg.chunks}: must be at least 1")
    flag = "--text" if cfg.text is not None else "--data"
    if not text.is_file():
        raise UsageError(f"{flag} {text}: no such file")
    if text.stat().st_size > MAX_TEXT_BYTES:
        raise UsageError(f"{flag} {text}: larger than {MAX_TEXT_BYTES >> 20} MiB; pass a sample of it")
    return out, text


def _calibration_ids(cfg: ImatrixConfig, path: Path, tokenizer: Any) -> list[int]:
    """The calibration tokens: the text file tokenized whole, or the JSONL's examples tokenized
    as finetune does and laid end to end."""
    if cfg.data is not None:
        from weightsmith.train.data import read_records, tokenize_record

        return [i for record in read_records(path) for i in tokenize_record(record, tokenizer).ids]
    try:
        return tokenizer.encode(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"--text {path}: not UTF-8 text (byte {e.start}); pass a plain-text file") from None


def run_imatrix(cfg: ImatrixConfig, progress: Any = None) -> dict[str, Any]:
    import torch

    from weightsmith.checkpoint import imatrix
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.device import pick_device

    out, text_path = _check(cfg)
    started = time.time()
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(
        resolve(cfg.model),
        device=device,
        dtype=torch.float32,
        allow_pickle=cfg.allow_pickle,
        decode_layout=False,
    )
    tok = ckpt.tokenizer
    ids = _calibration_ids(cfg, text_path, tok)
    bos = tok.bos_token_id if tok.add_bos_token else None
    chunks = imatrix.text_chunks(ids, cfg.chunk_size, bos, cfg.chunks)
    if not chunks:
        raise UsageError(
            f"{'--text' if cfg.text is not None else '--data'} {text_path}: {len(ids)} tokens, fewer than "
            f"one chunk of {cfg.chunk_size}; pass more text or a smaller --chunk-size"
        )
    tick = progress("imatrix") if progress else None
    found = imatrix.collect(
        ckpt.model, ckpt.config, chunks, on_chunk=(lambda done: tick(done, len(chunks))) if tick else None
    )
    found.datasets, found.chunk_size = [text_path.name], cfg.chunk_size
    imatrix.write_imatrix(out, found)
    write_lineage(
        out, kind="imatrix", config=cfg, inputs={"model": cfg.model, "calibration": str(text_path)}, started=started,
        metrics={"chunks": len(chunks), "tokens": len(chunks) * cfg.chunk_size, "entries": len(found.sums)},
    )  # fmt: skip
    return {
        "model": cfg.model,
        "path": str(out),
        "chunks": len(chunks),
        "chunk_size": cfg.chunk_size,
        "tokens": len(chunks) * cfg.chunk_size,
        "entries": len(found.sums),
        "text_tokens": len(ids),
    }
