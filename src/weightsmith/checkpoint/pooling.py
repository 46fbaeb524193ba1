"""How a checkpoint turns its hidden states into one embedding, where it says so.

Embedding models built on a decoder (Qwen3-Embedding, gte-Qwen2, E5-Mistral) read one vector per
text off the last layer's normed hidden states: the last token's, the first token's, or the mean
over the tokens. The checkpoint says which:

- a GGUF file in `{arch}.pooling_type` (llama.cpp's enum: 0 none, 1 mean, 2 cls, 3 last,
  4 rank);
- an HF folder laid out for sentence-transformers in its Pooling module's `config.json`
  (`modules.json` names the module's folder, usually `1_Pooling`): the `pooling_mode_*` flag
  that is true (`pooling_mode_lasttoken`, `pooling_mode_mean_tokens`, `pooling_mode_cls_token`).

The names here are "last", "mean" and "first" (the CLS position of an encoder is a decoder's
first token). Anything else a file says (max or weighted-mean pooling, a reranker's "rank") is
kept as the file's own word, so that asking for an embedding names it instead of pooling
another way. Both files are shared files: their sizes are bounded and a Pooling folder outside
the checkpoint's folder is not read.

Not here: the pooling itself (weightsmith.embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError

#: The poolings `weightsmith.embeddings` computes.
POOLINGS = ("last", "mean", "first")
#: llama.cpp's `llama_pooling_type` values in a GGUF file's `{arch}.pooling_type`.
GGUF_POOLING = {0: "none", 1: "mean", 2: "first", 3: "last", 4: "rank"}
#: The value `export` writes for each pooling computed here.
POOLING_IDS = {name: value for value, name in GGUF_POOLING.items() if name in POOLINGS}
#: sentence-transformers' Pooling flags, in the order they are looked at.
ST_FLAGS = {
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "first",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weighted_mean",
}
#: Most bytes of modules.json or a Pooling config.json that are read.
MAX_JSON_BYTES = 1 << 16


def gguf_pooling(reader: Any, arch: str) -> str | None:
    """The pooling a GGUF file's `{arch}.pooling_type` names; None when absent or "none"."""
    from weightsmith.checkpoint.gguf import meta, reader_path

    value = meta(reader, f"{arch}.pooling_type")
    if value is None:
        return None
    if not isinstance(value, int) or value not in GGUF_POOLING:
        raise CheckpointError(
            f"{reader_path(reader)}: {arch}.pooling_type is {value!r}, not one of llama.cpp's "
            f"{sorted(GGUF_POOLING)}; fix the file's metadata"
        )
    name = GGUF_POOLING[value]
    return None if name == "none" else name


def folder_pooling(folder: Path) -> str | None:
    """The pooling of an HF folder laid out for sentence-transformers; None when it is not."""
    modules = _json(folder / "modules.json", folder)
    if modules is None:
        return None
    entries = modules if isinstance(modules, list) else []
    pooling = [
        m for m in entries if isinstance(m, dict) and str(m.get("type", "")).endswith("models.Pooling")
    ]
    if not pooling:
        return None
    where = (folder / str(pooling[0].get("path", ""))).resolve()
    if not where.is_relative_to(folder.resolve()) or where == folder.resolve():
        raise CheckpointError(
            f"{folder / 'modules.json'}: the Pooling module's path {pooling[0].get('path')!r} is not a "
            "folder inside the checkpoint; fix the file"
        )
    config = _json(where / "config.json", folder)
    if not isinstance(config, dict):
        raise CheckpointError(f"{where / 'config.json'}: missing or not a JSON object; sentence-transformers "
                              "writes the Pooling module's settings there")  # fmt: skip
    chosen = [name for flag, name in ST_FLAGS.items() if config.get(flag) is True]
    if len(chosen) != 1:
        raise CheckpointError(
            f"{where / 'config.json'}: {'no' if not chosen else 'several'} pooling_mode_* flags are true "
            f"({', '.join(chosen) or 'none'}); exactly one must be"
        )
    return chosen[0]


def _json(path: Path, folder: Path) -> Any:
    if not path.is_file():
        return None
    if not path.resolve().is_relative_to(folder.resolve()):  # a link out of the checkpoint
        raise CheckpointError(
            f"{path}: links outside the checkpoint's folder; replace the link with the file"
        )
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: over {MAX_JSON_BYTES} bytes, too large for this file's purpose")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
