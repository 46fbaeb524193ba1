"""How export shows itself: one line naming the file, its size and tensor types.

Not here: the command (`weightsmith.commands.export`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console


def print_export(result: dict[str, Any], console: Console) -> None:
    types = ", ".join(f"{n} {c}" for n, c in result["tensors"].items())
    console.print(
        f"wrote {result['path']} ({result['bytes'] / 1e6:,.1f} MB, {result['architecture']}, "
        f"tensors {types}) and {result['modelfile']}"
    )
