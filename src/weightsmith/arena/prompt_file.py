"""The arena's prompt list (`arena serve --prompts FILE`): JSON lines, one prompt each.

A line is ``{"prompt": "text"}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``
(ending with the user's turn), with an optional ``"category"``. Any other keys are the
prompt's reference fields (``"answer"``, ``"contains"``, ``"expect"``, ... as in `grpo`'s
prompt files), stored with it for `arena judge --reward`, which checks them; a key spelt
close to one of the three (``"promt"``) is an error, not a field. Blank lines are skipped.
The file is read whole at start-up and bounded (lines, bytes per line, characters per
prompt); the first bad line stops the start with one error, ``FILE:LINE: key: problem``.

Not here: storing the prompts (the store's `add_prompts`), choosing one (page.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.arena.records import Prompt
from weightsmith.config import BadField, load_record
from weightsmith.errors import ConfigError

#: Most prompts one file may hold, and most bytes on one line.
MAX_PROMPTS = 100_000
MAX_LINE_BYTES = 1 << 20
#: A category tag: a short label (the page's tag field has the same limit).
MAX_CATEGORY_CHARS = 40
ROLES = ("system", "user", "assistant")
#: Most reference fields (keys besides prompt, messages and category) on one line.
MAX_FIELDS = 32


@dataclass(frozen=True)
class PromptLine:
    """One line of a prompt file."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise BadField("prompt", "give exactly one of 'prompt' (text) or 'messages' (a chat)")
        if self.prompt is not None and not self.prompt.strip():
            raise BadField("prompt", "is empty; write the prompt's text")
        if self.messages is not None:
            check_messages(self.messages)
        if self.category is not None and not 0 < len(self.category.strip()) <= MAX_CATEGORY_CHARS:
            raise BadField("category", f"must be 1-{MAX_CATEGORY_CHARS} characters")

    def to_messages(self) -> list[dict[str, str]]:
        if self.prompt is not None:
            return [{"role": "user", "content": self.prompt}]
        return [{"role": m["role"], "content": m["content"]} for m in self.messages or []]


_KEYS = frozenset(f.name for f in dataclasses.fields(PromptLine))


def check_messages(messages: list[dict[str, Any]]) -> None:
    """BadField unless `messages` is a non-empty chat of {role, content} strings that ends
    with the user's turn."""
    if not messages:
        raise BadField("messages", "is empty; give at least the user's message")
    for i, m in enumerate(messages):
        if set(m) != {"role", "content"} or m["role"] not in ROLES or not isinstance(m["content"], str):
            raise BadField(
                "messages", f"each message is {{role: {'|'.join(ROLES)}, content: text}}, nothing else", i
            )
    if messages[-1]["role"] != "user":
        raise BadField("messages", "the last message must be the user's turn", len(messages) - 1)


def read_prompts(path: str | Path, *, max_chars: int, max_prompts: int = MAX_PROMPTS) -> list[Prompt]:
    """The prompts of `path`, each with its source ``FILE:LINE``; ConfigError at the first
    bad line (including a prompt over `max_chars` characters), before any is returned."""
    path = Path(path).expanduser()
    try:
        handle = path.open("rb")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the prompt file ({e.strerror}); check --prompts") from None
    prompts: list[Prompt] = []
    with handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise ConfigError(f"{path}:{number}: the line is over {MAX_LINE_BYTES} bytes; shorten it")
            if not raw.strip():
                continue
            if len(prompts) >= max_prompts:
                raise ConfigError(f"{path}:{number}: more than {max_prompts} prompts; split the file")
            prompts.append(_prompt(path, number, raw, max_chars))
    if not prompts:
        raise ConfigError(f"{path}:1: the file holds no prompts; write one JSON object per line")
    return prompts


def _prompt(path: Path, number: int, raw: bytes, max_chars: int) -> Prompt:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}:{number}: not a JSON object ({e}); write one object per line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:{number}: expected a JSON object with 'prompt' or 'messages'")
    known = {k: v for k, v in data.items() if k in _KEYS}
    fields = {k: v for k, v in data.items() if k not in _KEYS}
    for key in fields:  # a misspelt key is not a reference field
        near = difflib.get_close_matches(key, _KEYS, 1, 0.75)
        if near:
            raise ConfigError(f"{path}:{number}: {key}: unknown key; did you mean {near[0]!r}?")
    if len(fields) > MAX_FIELDS:
        raise ConfigError(f"{path}:{number}: {len(fields)} reference fields, over {MAX_FIELDS}; drop some")
    line = load_record(PromptLine, known, source=str(path), error=ConfigError, line=number)
    messages = line.to_messages()
    chars = sum(len(m["content"]) for m in messages)
    if chars > max_chars:
        raise ConfigError(
            f"{path}:{number}: the prompt holds {chars} characters, over --max-prompt-chars {max_chars}; "
            "shorten it or raise the limit"
        )
    category = line.category.strip() if line.category else None
    return Prompt(messages, category, f"{path.name}:{number}", fields=fields or None)
