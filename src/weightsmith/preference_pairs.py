"""Preference-pair files: TRL's conversational preference JSONL plus a provenance file beside it
(or, for KTO, TRL's unpaired rows: prompt, one completion, and a boolean label).

One JSON object a line, TRL's preference format in its conversational form::

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

A row may carry more keys (the red-team pairs add ``meta``); TRL's chat-template helpers look
only at the three above. Beside ``NAME.jsonl`` goes ``NAME.meta.json``: the format, the
pairs file's name, row count and sha256, then whatever provenance the writer passes (the
arena's source database and filters, the red-team's packs, split and model). Both files are
written atomically, the pairs first, and the meta file names the pairs file's sha256, so a
meta file that does not match its pairs (a crash between the two renames) can be detected.

Used by the arena export (`weightsmith.arena.battles`) and the red-team pairs
(`weightsmith.safety.redteam_pairs`). Not here: deciding which answer is chosen.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightsmith.errors import UsageError
from weightsmith.files import atomic_file

__all__ = [
    "FORMAT", "UNPAIRED_FORMAT", "check_pairs_path", "meta_path", "pair_row", "pairs_text", "unpaired_row",
    "write_pairs",
]  # fmt: skip

FORMAT = "trl-preference (conversational: prompt, chosen, rejected)"
UNPAIRED_FORMAT = "trl-unpaired-preference (conversational: prompt, completion, label)"


def meta_path(path: str | Path) -> Path:
    """``NAME.meta.json`` beside ``NAME.jsonl``."""
    path = Path(path)
    return path.with_name((path.stem if path.suffix == ".jsonl" else path.name) + ".meta.json")


def pair_row(prompt: Sequence[dict], chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    """One TRL conversational preference row: the prompt's messages (ending with a user turn,
    which the caller has checked), then one assistant turn each for the chosen and the rejected
    answer; `extra` keys (``meta=...``) follow them."""
    return {
        "prompt": [dict(m) for m in prompt],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **extra,
    }


def unpaired_row(prompt: Sequence[dict], completion: str, label: bool) -> dict[str, Any]:
    """One TRL conversational unpaired preference row (KTO's): the prompt's messages, one
    assistant turn, and whether it is desirable."""
    return {
        "prompt": [dict(m) for m in prompt],
        "completion": [{"role": "assistant", "content": completion}],
        "label": label,
    }


def pairs_text(rows: Sequence[dict]) -> str:
    """The JSONL text of `rows` (UTF-8, one object a line, "" for no rows)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def check_pairs_path(path: str | Path, flag: str = "--pairs") -> Path:
    """`path` if a pairs file (and its meta file) can be written there, else a one-line
    UsageError; nothing is created. Run it before any slow work starts."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name such as {path / 'pairs.jsonl'}")
    parent = path.parent
    while not parent.exists():  # the first folder that exists: the rest can be created below it
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: cannot create its folder, {parent} is a file; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {parent} (permission denied); choose another path")
    return path


def write_pairs(
    path: str | Path, rows: Sequence[dict], provenance: dict[str, Any], row_format: str = FORMAT
) -> dict[str, Any]:
    """Write `rows` to `path` and ``NAME.meta.json`` beside it; returns the meta record.

    The meta record is {"format" (`row_format`), "file", "sha256", "rows"} followed by `provenance`. Rows are
    serialised before either file is touched; each file is replaced atomically."""
    path = Path(path)
    text = pairs_text(rows)
    info = {
        "format": row_format,
        "file": path.name,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "rows": len(rows),
        **provenance,
    }
    meta_text = json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n"
    # Nested: the inner (pairs) file is renamed into place first, then the meta file.
    with atomic_file(meta_path(path)) as tmp_meta, atomic_file(path) as tmp_rows:
        tmp_rows.write_text(text, encoding="utf-8", newline="\n")
        tmp_meta.write_text(meta_text, encoding="utf-8")
    return info
