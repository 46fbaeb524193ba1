"""The Ollama `Modelfile` written beside an exported GGUF file.

`modelfile_path` picks the file name (`Modelfile`, or `<stem>.Modelfile` when the folder
already holds one for another model); `modelfile_text` says what goes in it (export builds
it before writing the GGUF file, so nothing fails after that file is in place): the FROM line (and
ADAPTER, for a LoRA adapter on a GGUF base), sampling PARAMETERs from generation_config.json, stop tokens, and
for ChatML models a TEMPLATE (and SYSTEM prompt) in Ollama's Go template language.

Not here: the GGUF file itself (checkpoint/gguf_write.py).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.tokenizer import Tokenizer

# Ollama passes the whole conversation (its SYSTEM prompt included, as a system message) in
# .Messages, so one loop renders ChatML; the trailing header asks for the assistant's turn.
_CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
# A default system prompt written literally in a ChatML Jinja template (SmolLM2 has one).
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^{}<>'\"\\\n]+)<\|im_end\|>")
# generation_config key -> Ollama PARAMETER name.
_OLLAMA_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}


def modelfile_text(
    gguf_name: str, tokenizer: Tokenizer, generation_config: dict[str, Any], *, base: str | None = None
) -> str:
    """An Ollama Modelfile for `gguf_name` (a file in the same directory); with `base` (the base
    model's GGUF file), `gguf_name` is a LoRA adapter on it (Ollama's ADAPTER)."""
    lines = ["# Ollama Modelfile written by weightsmith export; use: ollama create NAME -f THIS_FILE"]
    if base is None:
        lines.append(f"FROM ./{gguf_name}")
    else:
        lines += [f"FROM {base}", f"ADAPTER ./{gguf_name}"]
    for key, parameter in _OLLAMA_PARAMETERS.items():
        value = generation_config.get(key)
        if value is not None and not isinstance(value, bool):
            lines.append(f"PARAMETER {parameter} {value:g}")
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else (template or {}).get("default", "")
    stops = [tokenizer.id_to_token(i) for i in sorted(tokenizer.eos_token_ids)]
    chatml = "<|im_start|>" in text and "<|im_end|>" in text
    if chatml:
        stops.append("<|im_end|>")
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    if chatml:
        system = _DEFAULT_SYSTEM.search(text)
        if system:
            lines.append(f'SYSTEM """{system.group(1)}"""')
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
    else:
        lines.append("# No TEMPLATE: Ollama uses the chat template stored in the GGUF metadata.")
    return "\n".join(lines) + "\n"


def modelfile_path(out: Path) -> Path:
    """`Modelfile` beside `out`, unless one exists for another file: then `<stem>.Modelfile`.

    A Modelfile whose FROM (or ADAPTER) line names `out` is ours to replace; one for another model stays.
    """
    default = out.parent / "Modelfile"
    if not default.exists():
        return default
    with contextlib.suppress(OSError, UnicodeDecodeError):
        lines = default.read_text(encoding="utf-8").splitlines()
        if f"FROM ./{out.name}" in lines or f"ADAPTER ./{out.name}" in lines:
            return default
    return out.parent / f"{out.stem}.Modelfile"
