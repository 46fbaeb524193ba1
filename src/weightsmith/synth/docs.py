"""The user's documents for grounded Q&A: read a folder's .txt, .md and .jsonl files and cut
them into token chunks with overlap, each chunk knowing where it came from.

A file that cannot be read, is not UTF-8 text, holds a NUL byte (a binary file renamed) or is
a JSONL line without a string "text" field is named, counted and skipped; the run goes on
with the rest. Only files under the named folder are read (a symlink out of it is skipped),
and at most `max_bytes` of each.

A chunk has `chunk_tokens` tokens of the tokenizer the caller passes (the generating model's
own, or word tokens for an endpoint) and starts `chunk_tokens - overlap` tokens after the
previous one; its `location` names the file, the JSONL line, the character span and the
lines it covers, so every pair made from it can be traced back.

Not here: asking questions about chunks (synth.recipes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import UsageError
from weightsmith.files import is_inside

SUFFIXES = (".txt", ".md", ".jsonl")
#: Splits text into (start, end) character spans of tokens.
Spans = Callable[[str], list[tuple[int, int]]]

_WORD = re.compile(r"\S+")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Whitespace-separated words as token spans (for endpoints, whose tokenizer we lack)."""
    return [m.span() for m in _WORD.finditer(text)]


def tokenizer_spans(tokenizer: Any) -> Spans:
    """A model tokenizer's token spans (its `encode_offsets`)."""

    def spans(text: str) -> list[tuple[int, int]]:
        _, offsets = tokenizer.encode_offsets(text)
        return [(a, b) for a, b in offsets if b > a]

    return spans


@dataclass
class Text:
    """One document's text: a file, or one line of a JSONL file."""

    file: str  # relative to the documents folder
    text: str
    line: int | None = None


@dataclass
class Chunk:
    text: str
    location: dict[str, Any]


@dataclass
class DocSet:
    texts: list[Text] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    files: int = 0


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UsageError(f"--docs {root}: no such file or folder; name a folder of .txt, .md or .jsonl files")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def read_docs(root: Path, *, max_bytes: int = 20_000_000) -> DocSet:
    """Every readable document under `root` (a folder or one file), in path order."""
    out = DocSet()
    base = root if root.is_dir() else root.parent
    for path in _files(root):
        name = str(path.relative_to(base))
        out.files += 1
        if not is_inside(path, base):
            out.skipped.append({"file": name, "reason": "a link that leads outside the documents folder"})
            continue
        try:
            with open(path, "rb") as f:
                raw = f.read(max_bytes + 1)
        except OSError as e:
            out.skipped.append({"file": name, "reason": f"cannot be read ({e.strerror or e})"})
            continue
        reason = _binary_reason(raw, max_bytes)
        if reason:
            out.skipped.append({"file": name, "reason": reason})
            continue
        text = raw.decode("utf-8")
        if path.suffix.lower() == ".jsonl":
            _jsonl_texts(name, text, out)
        elif text.strip():
            out.texts.append(Text(name, text))
        else:
            out.skipped.append({"file": name, "reason": "empty"})
    return out


def _binary_reason(raw: bytes, max_bytes: int) -> str | None:
    if len(raw) > max_bytes:
        return f"larger than {max_bytes} bytes"
    if b"\0" in raw:
        return "binary (holds NUL bytes)"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start})"
    return None


def _jsonl_texts(name: str, text: str, out: DocSet) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.skipped.append({"file": f"{name}:{number}", "reason": f"invalid JSON ({e.msg})"})
            continue
        value = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(value, str) or not value.strip():
            out.skipped.append({"file": f"{name}:{number}", "reason": 'no string "text" field'})
            continue
        out.texts.append(Text(name, value, number))


def chunk_text(doc: Text, spans: Spans, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """`doc` cut into windows of `chunk_tokens` tokens, each `chunk_tokens - overlap` after the last."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise UsageError(
            f"--chunk-tokens must be at least 1 and --overlap between 0 and it, got {chunk_tokens} and {overlap}"
        )
    tokens = spans(doc.text)
    chunks = []
    step = chunk_tokens - overlap
    for start in range(0, max(len(tokens) - overlap, 1), step):
        window = tokens[start : start + chunk_tokens]
        if not window:
            break
        a, b = window[0][0], window[-1][1]
        location = {
            "file": doc.file,
            "chunk": len(chunks),
            "tokens": [start, start + len(window)],
            "chars": [a, b],
            "lines": [doc.text.count("\n", 0, a) + 1, doc.text.count("\n", 0, b) + 1],
        }
        if doc.line is not None:
            location["jsonl_line"] = doc.line
        chunks.append(Chunk(doc.text[a:b], location))
    return chunks
