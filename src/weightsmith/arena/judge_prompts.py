"""Prompts for `arena judge --prompts FILE`: JSON lines, `{"prompt": TEXT}` or
`{"messages": [...]}` (ending with the user's turn), with an optional `"category"`.

The whole file is read and checked before any battle is fought; it is bounded (lines, bytes
per line, characters per prompt), and the first bad line is one error `FILE:LINE: problem`.

Not here: storing prompts (the store's `add_prompts`).
"""

from __future__ import annotations

import json
from pathlib import Path

from weightsmith.arena.records import Prompt
from weightsmith.errors import ConfigError

MAX_PROMPTS = 100_000
MAX_LINE_BYTES = 1 << 20
MAX_PROMPT_CHARS = 20_000
_ROLES = ("system", "user", "assistant")


def load_prompt_file(path: str | Path, *, max_chars: int = MAX_PROMPT_CHARS) -> list[Prompt]:
    """Every prompt of `path` (source `NAME:LINE`); ConfigError at the first bad line."""
    path = Path(path).expanduser()
    try:
        handle = path.open("rb")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the prompts ({e.strerror}); check --prompts") from None
    out: list[Prompt] = []
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise ConfigError(f"{where}: the line is longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            if len(out) >= MAX_PROMPTS:
                raise ConfigError(f"{where}: more than {MAX_PROMPTS} prompts; split the file")
            messages, category = _line(where, raw)
            if sum(len(m["content"]) for m in messages) > max_chars:
                raise ConfigError(f"{where}: the prompt is longer than {max_chars} characters; shorten it")
            out.append(Prompt(messages, category, f"{path.name}:{number}"))
    if not out:
        raise ConfigError(f"{path}:1: no prompts; write one JSON object per line with 'prompt' or 'messages'")
    return out


def _line(where: str, raw: bytes) -> tuple[list[dict], str | None]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{where}: not JSON ({e}); write one object per line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object with 'prompt' or 'messages'")
    unknown = sorted(set(data) - {"prompt", "messages", "category"})
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key; expected prompt, messages or category")
    category = data.get("category")
    if category is not None and (not isinstance(category, str) or not 0 < len(category.strip()) <= 40):
        raise ConfigError(f"{where}: category: expected a label of 1-40 characters")
    if ("prompt" in data) == ("messages" in data):
        raise ConfigError(f"{where}: give exactly one of 'prompt' (text) or 'messages' (a chat)")
    if "prompt" in data:
        text = data["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: prompt: expected non-empty text")
        return [{"role": "user", "content": text}], category and category.strip()
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: messages: expected a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in _ROLES:
            raise ConfigError(f"{where}: messages[{i}]: expected {{role: {'|'.join(_ROLES)}, content: text}}")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{where}: messages[{i}].content: expected text")
    if messages[-1]["role"] != "user":
        raise ConfigError(f"{where}: messages: the last message must be the user's turn")
    return messages, category and category.strip()


__all__ = ["load_prompt_file"]
