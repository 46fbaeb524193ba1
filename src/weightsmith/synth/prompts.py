"""The prompt templates each recipe sends, as files a user can read and replace.

The package ships one Jinja2 file per prompt in `synth/prompts/`; `--templates DIR` replaces
any of them with a file of the same name in DIR (the others stay the shipped ones). Templates
render in the same sandbox as judge rubrics, with undefined names an error, so a typo in a
replaced file stops the run before any generation with the file and the name. Every file a
run uses is hashed into its lineage.

Not here: what goes into the templates (synth.recipes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import UsageError

PACKAGE_DIR = Path(__file__).resolve().parent / "prompts"
#: Every template, and the names it may use.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "self_instruct": ("examples",),
    "answer": ("instruction",),
    "evolve_deepen": ("instruction",),
    "evolve_broaden": ("instruction",),
    "evolve_concretise": ("instruction",),
    "grounded_question": ("chunk", "number"),
    "grounded_answer": ("chunk", "question"),
    "judge": ("question", "answer", "reference", "doc"),
}


@dataclass
class Prompts:
    """The loaded templates: name -> (source file, text, compiled template)."""

    files: dict[str, Path] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    _compiled: dict[str, Any] = field(default_factory=dict)

    def render(self, name: str, **values: Any) -> str:
        from jinja2 import UndefinedError
        from jinja2.exceptions import SecurityError

        try:
            return self._compiled[name].render(**values).strip()
        except (UndefinedError, SecurityError) as e:
            allowed = ", ".join(TEMPLATES[name])
            raise UsageError(f"{self.files[name]}: {e}; this template can use {allowed}") from None

    def hashes(self) -> dict[str, dict[str, str]]:
        return {
            name: {"file": str(self.files[name]), "sha256": hashlib.sha256(text.encode()).hexdigest()}
            for name, text in sorted(self.texts.items())
        }


def load_prompts(override: str | None, needed: tuple[str, ...]) -> Prompts:
    """The templates in `needed`, each from `override` when it has `NAME.txt`, else shipped."""
    from jinja2 import TemplateSyntaxError

    from weightsmith.eval.judge import rubric_environment

    folder = Path(override) if override else None
    if folder is not None:
        if not folder.is_dir():
            raise UsageError(f"--templates {folder}: not a folder; give a folder of NAME.txt prompt files")
        unknown = sorted(p.name for p in folder.glob("*.txt") if p.stem not in TEMPLATES)
        if unknown:
            raise UsageError(
                f"--templates {folder}: {', '.join(unknown)} is no prompt name; "
                f"the names are {', '.join(f'{n}.txt' for n in TEMPLATES)}"
            )
    env = rubric_environment()
    out = Prompts()
    for name in needed:
        path = folder / f"{name}.txt" if folder is not None and (folder / f"{name}.txt").is_file() else None
        path = path or PACKAGE_DIR / f"{name}.txt"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read the prompt template ({e})") from None
        if not text.strip():
            raise UsageError(f"{path}: the prompt template is empty")
        try:
            out._compiled[name] = env.from_string(text)
        except TemplateSyntaxError as e:
            raise UsageError(f"{path}:{e.lineno}: the template does not compile: {e.message}") from None
        out.files[name], out.texts[name] = path, text
    return out
