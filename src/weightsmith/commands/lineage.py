"""The lineage command: an artifact's tree back to its base weights, every hash checked again.

`run_lineage(cfg)` returns the checked tree (`weightsmith.lineage.check_lineage`). When
anything changed since it was recorded (an input's hash, an output, a parent rebuilt), it
raises a `LineageError` that carries the tree, so the CLI prints it and exits 1.

Not here: reading and checking records (`weightsmith.lineage`), printing (`cli/lineage.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightsmith.config import opt
from weightsmith.lineage import LineageError, check_lineage


@dataclass(kw_only=True)
class LineageConfig:
    """Show where an artifact came from: its inputs, their own lineage, down to the base weights."""

    path: str = opt(help="an artifact folder (a run, a model, a report) or file (a .gguf, pairs.jsonl)",
                    positional=True)  # fmt: skip
    root: list[str] = opt(
        default_factory=lambda: ["."],
        help="folders whose files may be read (default: the current folder; the model store always)",
    )
    json: bool = opt(False, "print the tree as JSON")


def run_lineage(cfg: LineageConfig, progress: Any = None) -> dict[str, Any]:
    result = check_lineage(cfg.path, cfg.root)
    problems = result["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LineageError(f"{problems[0]}{more}", result=result)
    return result
